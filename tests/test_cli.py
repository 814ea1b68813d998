"""The CLI: every user mistake is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.test_spec import base_spec, write

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # timeout: a guard against a hang, not a measurement (a loaded 2-core machine starts Python slowly)
    return subprocess.run([sys.executable, "-m", "edgedistill.cli", *args], check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def assert_one_line_error(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_help_lists_every_stage():
    p = run_cli("--help")
    assert p.returncode == 0
    for stage in ("distill", "compress", "serve", "bench", "run"):
        assert stage in p.stdout


def test_bad_spec(tmp_path):
    raw = base_spec(tmp_path)
    raw["type"] = "sorting"
    assert_one_line_error(run_cli("distill", str(write(tmp_path, raw))), "task.yaml", "type")


def test_missing_spec_file(tmp_path):
    assert_one_line_error(run_cli("distill", str(tmp_path / "nope.yaml")), "does not exist")


def test_missing_data_file(tmp_path):
    raw = base_spec(tmp_path)
    raw["seeds"] = {"path": "gone.jsonl"}
    assert_one_line_error(run_cli("distill", str(write(tmp_path, raw)), "--out", str(tmp_path / "run")), "seeds", "gone.jsonl")


def test_unreachable_teacher(tmp_path):
    # A closed local port refuses at once, so the timeout does not make this test faster; a short one
    # (it was 2 s) only let a machine stalled under load turn "refused" into "timed out".
    raw = base_spec(tmp_path)
    raw["teacher"].update(base_url="http://127.0.0.1:9/v1", max_retries=1, timeout_s=60)
    p = run_cli("distill", str(write(tmp_path, raw)), "--out", str(tmp_path / "run"))
    assert_one_line_error(p, "unreachable", "127.0.0.1:9")


def test_run_and_compress_bad_input_are_one_line_errors(tmp_path):
    assert_one_line_error(run_cli("run", str(tmp_path / "missing.yaml")), "does not exist")
    assert_one_line_error(run_cli("run", str(tmp_path / "missing.yaml"), "--force", "train"), "not a stage")
    assert_one_line_error(run_cli("compress", str(tmp_path)), "not an HF checkpoint")


def test_spec_yaml_roundtrip_is_plain(tmp_path):
    # the helper used by these tests writes what load_spec reads
    raw = base_spec(tmp_path)
    assert yaml.safe_load(write(tmp_path, raw).read_text())["name"] == "t1"
