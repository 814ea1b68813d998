"""The layout the README's table draws: which folder may import which, and one namespace.

A stage talks to another only through artifacts on disk and HTTP; what they share lives in the core
(``edgedistill/``) or in ``runtimes/``; only the orchestrator (``run/``) and the CLI see every stage.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("distill", "compress", "serve", "bench")
CORE_ENTRY = {"cli.py", "__main__.py"}  # the command line: wires every stage (lazily)

# folder -> the edgedistill subpackages its modules may import (the core modules are always allowed)
ALLOWED = {
    "edgedistill": set(),
    "runtimes": {"runtimes"},
    **{s: {"runtimes", s} for s in STAGES},
    "run": {"runtimes", "run", *STAGES},
}
SUBPACKAGES = {"runtimes", "run", *STAGES}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module == "edgedistill":
                out |= {f"edgedistill.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def _violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        if folder == "edgedistill" and path.name in CORE_ENTRY:
            continue
        for mod in _imports(path):
            parts = mod.split(".")
            if parts[0] in STAGES or parts[0] in ("runtimes", "run"):
                bad.append(f"{folder}/{path.name} imports top-level {mod!r}: everything is edgedistill.<...>")
            if parts[0] == "edgedistill" and len(parts) > 1 and parts[1] in SUBPACKAGES and parts[1] not in ALLOWED[folder]:
                bad.append(f"{folder}/{path.name} imports {mod}")
    return bad


@pytest.mark.parametrize("folder", list(ALLOWED))
def test_each_folder_imports_only_what_the_layout_allows(folder):
    assert _violations(folder) == []


def test_the_check_sees_a_cross_stage_import(tmp_path, monkeypatch):
    fake = tmp_path / "compress"
    fake.mkdir()
    (fake / "x.py").write_text("from edgedistill.distill.evaluate import stratified\nimport serve.app\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert len(_violations("compress")) == 2


def test_one_namespace_in_the_package_list():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "edgedistill" or p.startswith("edgedistill.") for p in cfg["packages"])
    # every package folder is mapped, and every mapped folder exists
    assert {p.removeprefix("edgedistill.") for p in cfg["packages"]} - {"edgedistill"} == SUBPACKAGES
    assert all((ROOT / d / "__init__.py").is_file() for d in cfg["package-dir"].values())


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="setuptools not installed in this environment")
def test_a_built_wheel_holds_only_edgedistill(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info/ into the source tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("edgedistill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"edgedistill", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "edgedistill/serve/app.py" in names and "edgedistill/run/stages.py" in names and "edgedistill/task.py" in names
