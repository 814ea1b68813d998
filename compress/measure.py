"""Measure an artifact that compress built, again, on the held-out test set: the same runtime
(the format's own ``load``), prompts, constraint and scoring as compress's quality gate
(``evaluate.measure``), keeping the parsed answers so that two artifacts can be compared row by row
(``edgedistill retrain``'s promotion). The tokenizer is the artifact's source checkpoint's, as in
compress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgedistill.compress import pipeline
from edgedistill.compress.calibration import prompt_ids
from edgedistill.compress.evaluate import measure, task_constraint

from edgedistill.errors import UserError
from edgedistill.manifest import read_manifest
from edgedistill.spec import TaskSpec


def source_checkpoint(folder: Path, manifest: dict[str, Any]) -> Path:
    """The student checkpoint an artifact was built from (its manifest's ``source.checkpoint``)."""
    src = (manifest.get("source") or {}).get("checkpoint")
    if not src or not (Path(src) / "config.json").exists():
        raise UserError(f"{folder}: its source checkpoint {src!r} is gone; the artifact cannot be measured again (rebuild it)")
    return Path(src)


def measure_artifact(folder: Path, spec: TaskSpec, eval_limit: int | None = None) -> dict[str, Any]:
    """``{"scores", "preds", "golds", "constrained"}`` of the artifact in ``folder`` on the spec's test set."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    manifest = read_manifest(folder, verify=True)
    ckpt = source_checkpoint(folder, manifest)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    test = spec.load_test_set()
    if eval_limit:
        test = spec.task.stratified(test, eval_limit)
    prompts = [prompt_ids(tokenizer, spec.task.student_messages(r.input)) for r in test]
    golds = [r.output for r in test]
    constraint = task_constraint(spec.task, tokenizer, pipeline._logits_width(ckpt, tokenizer))
    rt = pipeline._module(_format_of(manifest)).load(folder, manifest)
    try:
        # no reference tokens: token agreement is compress's business; one prompt for the speed line
        m = measure(rt, tokenizer, spec, prompts, golds, prompts[:1], None, None, 1, constraint)
    finally:
        rt.close()
    return {"scores": m["scores"], "preds": m["_preds"], "golds": golds, "constrained": m["constrained"]}


def _format_of(manifest: dict[str, Any]) -> Any:
    """The manifest's format as the FormatSpec-like object ``pipeline._module`` takes (its family)."""
    from edgedistill.compress.formats import parse_formats

    return parse_formats(f"{manifest['format']}:{manifest['variant']}")[0]
