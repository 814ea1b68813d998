"""What to serve: a bare ``.gguf`` file, or an artifact folder whose ``manifest.json`` names the
format (which picks the backend), the task (prompt template for /v1/predict) and the calibration,
or the folder of an ``edgedistill run`` (``run_artifact``: the artifact its ``serving.json`` points
at after a promotion by ``edgedistill retrain``, else its ``report.json``'s cascade artifact).

Files listed in the manifest are checked against their sha256 before anything is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedistill.runtimes.registry import FORMATS

from edgedistill.errors import UserError
from edgedistill.manifest import MANIFEST, read_manifest
from edgedistill.task import Task

BACKENDS = {name: f.backend for name, f in FORMATS.items()}
SERVING = "serving.json"  # written by `edgedistill retrain` at each promotion (run.promote)
RUN_REPORT = "report.json"  # written by `edgedistill run`


@dataclass
class Artifact:
    name: str
    format: str
    model_path: Path
    task: Task | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None

    @property
    def backend(self) -> str:
        return BACKENDS.get(self.format, self.format)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); fix or delete it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; fix or delete it")
    return data


def run_artifact(run: str | Path) -> tuple[Path, str] | None:
    """(the artifact folder, where it came from) when ``run`` is the folder of an ``edgedistill run``
    (no manifest.json of its own, but a serving.json or report.json), else None. serving.json's
    ``artifact`` wins (the promoted one); else report.json's ``cascade.artifact``, the artifact the
    run served its cascade on (its ``artifacts`` row's path, else ``RUN/artifacts/<name>``)."""
    p = Path(run).expanduser()
    if not p.is_dir() or (p / MANIFEST).exists() or not ((p / SERVING).exists() or (p / RUN_REPORT).exists()):
        return None
    if (p / SERVING).exists():
        target = _read_json(p / SERVING).get("artifact")
        if not isinstance(target, str) or not target:
            raise UserError(f"{p / SERVING} has no artifact path; delete it to serve {p / RUN_REPORT}'s cascade artifact")
        art = Path(target).expanduser()
        if not art.is_dir():
            raise UserError(f"{p / SERVING} points at {art}, which does not exist; delete {p / SERVING} to serve the run's own artifact")
        return art, f"{p / SERVING}"
    rep = _read_json(p / RUN_REPORT)
    name = (rep.get("cascade") or {}).get("artifact") if isinstance(rep.get("cascade"), dict) else None
    if not isinstance(name, str) or not name:
        raise UserError(f"{p / RUN_REPORT} names no cascade artifact (the run stopped before bench?); pass an artifact folder")
    row = next((a for a in rep.get("artifacts") or [] if isinstance(a, dict) and a.get("name") == name), {})
    candidates = [p / "artifacts" / name] + ([Path(row["path"])] if isinstance(row.get("path"), str) else [])
    art = next((c for c in candidates if (c / MANIFEST).exists()), None)
    if art is None:
        raise UserError(f"{p / RUN_REPORT}: the cascade artifact {name} is not in {p / 'artifacts'}; pass an artifact folder")
    return art, f"{p / RUN_REPORT} (cascade artifact)"


def load_artifact(path: str | Path) -> Artifact:
    """Resolve a .gguf file, a manifest folder (hash-verified) or a run folder (``run_artifact``)
    into what the engine needs."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"artifact {p} does not exist; pass an artifact folder, a .gguf file or a run folder")
    if (resolved := run_artifact(p)) is not None:
        p = resolved[0]
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserError(f"{p} is a file but not a .gguf; pass a .gguf file or an artifact folder with {MANIFEST}")
        _check_gguf_magic(p)
        return Artifact(name=p.stem, format="gguf", model_path=p)
    manifest = read_manifest(p, verify=True)
    fmt = str(manifest.get("format", ""))
    if fmt not in BACKENDS:
        raise UserError(
            f"{p}: format {fmt!r} has no backend here (served: {', '.join(sorted(BACKENDS))}); "
            "for other engines put vLLM behind the same API (see README: Serving beyond one machine)"
        )
    files = manifest.get("files") or {}
    if fmt == "gguf":
        ggufs = sorted(n for n in files if n.lower().endswith(".gguf"))
        if not ggufs:
            raise UserError(f"{p}: a gguf artifact whose manifest lists no .gguf file; rebuild the artifact")
        name = manifest.get("model_file") or ggufs[0]
        if name not in files:  # only a file whose hash was just checked is ever loaded
            raise UserError(f"{p}: model_file {name!r} is not one of the manifest's hashed files; rebuild the artifact")
        model = p / name
        _check_gguf_magic(model)
    else:
        needed = "genai_config.json" if fmt == "onnx" else "config.json"
        if needed not in files:
            raise UserError(f"{p}: a {fmt} artifact whose manifest does not list {needed}; rebuild the artifact")
        model = p
    task = Task.from_manifest(manifest["task"]) if manifest.get("task") else None
    calibration = manifest.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise UserError(f"{p}: manifest calibration must be a mapping like {{'temperature': 1.3}}")
    name = str(manifest.get("name") or (task.name if task else None) or p.name)
    return Artifact(name=name, format=fmt, model_path=model, task=task, calibration=calibration, manifest=manifest)


def _check_gguf_magic(p: Path) -> None:
    # llama.cpp aborts the process on some malformed files; refuse anything that is not GGUF up front
    with p.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{p} is not a GGUF file (bad magic); re-export or re-download it")
