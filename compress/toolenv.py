"""Converters that cannot share our environment run in their own virtual environment, as a subprocess.

The tools disagree on transformers (llama.cpp's converter needs <5, llm-compressor 5.15-5.17, our
training stack 5.x), so each gets a venv made from pinned requirements, keyed by their hash, under
``$EDGEDISTILL_TOOLS`` (default ``~/.cache/edgedistill/tools``). A venv is created once and reused;
its package versions go into every artifact manifest it helped make.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

from edgedistill.errors import UserError

# torch from the CPU wheel on disk; an unpinned torch would pull several GB of CUDA wheels
TORCH_CPU = "torch==2.13.0"


def tools_home() -> Path:
    return Path(os.environ.get("EDGEDISTILL_TOOLS") or Path.home() / ".cache" / "edgedistill" / "tools").expanduser()


def ensure_venv(name: str, requirements: list[str], *, log_path: Path | None = None) -> Path:
    """Return the python of a venv holding exactly ``requirements`` (created on first use)."""
    key = hashlib.sha256(json.dumps(requirements).encode()).hexdigest()[:10]
    root = tools_home() / f"{name}-{key}"
    py = root / "bin" / "python"
    stamp = root / ".installed"
    if stamp.exists() and py.exists():
        return py
    root.parent.mkdir(parents=True, exist_ok=True)
    # one installer at a time (a background preparation, another process): the others wait, then reuse it
    with (root.parent / f"{name}-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and py.exists():
            return py
        log_path = log_path or root.parent / f"{name}-{key}.install.log"
        venv.EnvBuilder(with_pip=True, clear=True).create(root)
        # --no-compile: bytecode is written on first import, for the modules a tool actually imports
        cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "--no-compile", *requirements]
        run_tool(cmd, log_path=log_path, what=f"installing the {name} tool environment")
        stamp.write_text(json.dumps(requirements) + "\n")
    return py


def run_tool(cmd: list[str], *, log_path: Path, what: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    """Run a tool, its output appended to log_path; failure -> one-line UserError naming the log."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(map(str, cmd))}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=full_env, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout)
        except FileNotFoundError:
            raise UserError(f"{what}: {cmd[0]} not found") from None
        except subprocess.TimeoutExpired:
            raise UserError(f"{what}: timed out after {timeout:.0f} s; see {log_path}") from None
        log.write(proc.stdout)
    if proc.returncode != 0:
        last = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.strip()), "")
        raise UserError(f"{what} failed (exit {proc.returncode}): {last[:200]}; full log: {log_path}")
    return proc.stdout


def package_versions(python: Path | str, packages: list[str]) -> dict[str, str]:
    """Installed versions of packages in the environment of ``python`` (missing ones are left out)."""
    code = (
        "import json,sys,importlib.metadata as m\n"
        "out={}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p]=m.version(p)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run([str(python), "-c", code, *packages], check=False, capture_output=True, text=True)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {}


def here_versions(packages: list[str]) -> dict[str, str]:
    return package_versions(sys.executable, packages)
