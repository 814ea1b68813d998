"""``edgedistill run``: the orchestrator, the one layer above the four stages.

``stages`` chains distill -> compress -> serve + bench with per-stage input/output hashes,
``servers`` starts and measures the servers, ``report`` writes ``report.json`` / ``report.md``.
The stages never import this package.
"""

from edgedistill.run.stages import STAGES, run_all

__all__ = ["STAGES", "run_all"]
