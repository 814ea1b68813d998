"""Artifact manifests: the small JSON file beside every artifact saying what made it, from what,
with which settings and data hash. Stages talk through these, not through each other's code.

``manifest.json`` fields (schema ``edgedistill.manifest/v1``):

- ``kind``: ``dataset`` | ``checkpoint`` | ``artifact`` | ``eval``
- ``format``: ``jsonl`` | ``hf`` | ``gguf`` | ``onnx`` | ``gptq`` ...
- ``created_by`` / ``created_at``: tool, version, stage; UTC ISO time
- ``inputs``: name -> content hash of what it was made from
- ``settings``: the settings that made it (no secrets: API keys are never stored)
- ``files``: file name (relative) -> sha256, checked when loaded (tampering/truncation)
- ``task``: the task spec it serves (so a server needs no further arguments), or null
- anything stage-specific (``calibration``, ``metrics`` ...)

Torch-free.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgedistill import __version__
from edgedistill.errors import UserError

MANIFEST = "manifest.json"
SCHEMA = "edgedistill.manifest/v1"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def compact_json(obj: Any) -> str:
    """JSON independent of dict key order and whitespace, so equal requests hash equally (the
    teacher cache's keys). Not ``edgedistill.metrics.canonical_json``, which also folds case to
    compare answers."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def hash_files(folder: Path, names: list[str] | None = None) -> dict[str, str]:
    """sha256 of every regular file in folder (recursively) except the manifest itself."""
    folder = Path(folder)
    if names is None:
        names = sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and "checkpoints" not in p.parts
        )
    return {n: sha256_file(folder / n) for n in names}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so a reader never sees half a file (write to a temp name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_manifest(
    folder: Path,
    *,
    kind: str,
    format: str,
    stage: str,
    inputs: dict[str, str] | None = None,
    settings: dict[str, Any] | None = None,
    task: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    folder = Path(folder)
    manifest = {
        "schema": SCHEMA,
        "kind": kind,
        "format": format,
        "created_by": f"edgedistill {__version__} {stage}",
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "inputs": inputs or {},
        "settings": settings or {},
        "files": files if files is not None else hash_files(folder),
        "task": task,
        **extra,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path, verify: bool = False) -> dict[str, Any]:
    """Read folder/manifest.json; with verify, check every listed file's sha256."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise UserError(f"{folder} has no {MANIFEST}; pass a folder made by edgedistill (or a .gguf file)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; the artifact is damaged, rebuild it") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is not a JSON object; the artifact is damaged, rebuild it")
    if verify:
        files = manifest.get("files", {})
        if not isinstance(files, dict):
            raise UserError(f"{path}: files must map file names to sha256; the artifact is damaged, rebuild it")
        for name in [*files, *([manifest["model_file"]] if manifest.get("model_file") is not None else [])]:
            _check_inside(folder, name)
        for name, digest in files.items():
            f = Path(folder) / name
            if not f.is_file():
                raise UserError(f"{folder}: file {name} listed in the manifest is missing; rebuild the artifact")
            if sha256_file(f) != digest:
                raise UserError(f"{folder}: file {name} does not match its manifest hash (truncated or modified); rebuild the artifact")
    return manifest


def _check_inside(folder: Path, name: Any) -> None:
    """A name in a manifest is a relative path inside its folder: never absolute, never up through
    ``..`` (a tampered manifest must not make a server read, hash or load files elsewhere)."""
    p = Path(str(name))
    if not isinstance(name, str) or not name or p.is_absolute() or ".." in p.parts:
        raise UserError(f"{folder}: manifest names {name!r}, which is not a path inside the artifact folder; rebuild the artifact")
