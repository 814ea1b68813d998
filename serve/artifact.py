"""What to serve: a bare ``.gguf`` file, or an artifact folder whose ``manifest.json`` names the
format (which picks the backend), the task (prompt template for /v1/predict) and the calibration.

Files listed in the manifest are checked against their sha256 before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedistill.runtimes.registry import FORMATS

from edgedistill.errors import UserError
from edgedistill.manifest import MANIFEST, read_manifest
from edgedistill.task import Task

BACKENDS = {name: f.backend for name, f in FORMATS.items()}


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


def load_artifact(path: str | Path) -> Artifact:
    """Resolve a .gguf file or a manifest folder (hash-verified) into what the engine needs."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"artifact {p} does not exist; pass an artifact folder or a .gguf file")
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
