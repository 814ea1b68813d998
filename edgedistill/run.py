"""`edgedistill run task.yaml --out DIR`: teacher gate -> data -> student -> artifacts -> serve -> bench.

Each stage is the same code as its own command, and talks to the next through artifacts on disk
(manifests) and HTTP. ``DIR/run.json`` records, per stage, the hash of its inputs and settings and
of what it produced. A stage whose record matches (and whose outputs still verify) is skipped; a
changed stage reruns, and so does everything after it (its inputs include the previous stage's
output hash). Inside a stage, work already paid for is kept too: the teacher's answers are cached
(SQLite), training resumes from its last checkpoint, unchanged artifacts are reused.

The serve+bench stage starts one ``edgedistill serve`` per artifact that passed the quality gate
(student only), one for the teacher (a local teacher checkpoint through the transformers backend,
or the teacher's API as it is), the cascade (the spec's cascade artifact with the teacher behind
it), and the peer ``python -m llama_cpp.server`` on the same GGUF; then measures them all with
``edgedistill bench`` and stops them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from edgedistill.errors import UserError
from edgedistill.manifest import MANIFEST, hash_files, read_manifest, sha256_file, sha256_json, write_json_atomic
from edgedistill.spec import TaskSpec, load_spec

console = Console(stderr=True)
STAGES = ("distill", "compress", "bench")


def _prepare_tools(formats: str, errors: list[str]) -> None:
    from edgedistill.compress.pipeline import prepare_tools

    try:
        prepare_tools(formats)
    except Exception as e:  # noqa: BLE001 -- compress retries the same step and reports it itself
        errors.append(str(e) or type(e).__name__)


def run_all(spec_path: Path, out: Path | None = None, *, skip_gate: bool = False, force: list[str] | None = None) -> dict[str, Any]:
    spec = load_spec(spec_path)
    out = Path(out or Path("runs") / spec.name)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "run.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}
    force = set(force or [])
    timings: dict[str, float] = {}
    rerun_rest = False

    def stage(name: str, inputs: dict[str, Any], check, do) -> Any:
        nonlocal rerun_rest
        key = sha256_json(inputs)
        rec = state["stages"].get(name)
        t = time.time()
        if not rerun_rest and name not in force and rec and rec.get("inputs") == key and rec.get("status") == "done":
            produced = _safe(check)
            if produced is not None and produced == rec.get("outputs"):
                console.print(f"[green]{name}[/]: inputs and settings unchanged, outputs verified -- skipped")
                timings[name] = 0.0
                return rec
        rerun_rest = True  # this stage reruns: so does every stage after it
        console.rule(f"[bold]{name}")
        state["stages"][name] = {"inputs": key, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(state_path, state)
        do()
        seconds = round(time.time() - t, 1)
        state["stages"][name] = {"inputs": key, "status": "done", "outputs": check(), "seconds": seconds}
        write_json_atomic(state_path, state)
        timings[name] = seconds
        return state["stages"][name]

    student = out / "student"
    data = out / "data"
    artifacts = out / "artifacts"
    bench_dir = out / "bench"

    # 1. distill: gate, data, student, evaluation
    from edgedistill.distill.pipeline import run_distill

    prep: list[threading.Thread] = []
    prep_errors: list[str] = []

    def do_distill() -> None:
        # compress's converter venvs are installed by pip while distill runs (mostly downloads and
        # disk); compress waits for them (a lock) and reports any failure itself
        t = threading.Thread(target=_prepare_tools, args=(spec.compress.formats, prep_errors), daemon=True, name="prepare-tools")
        t.start()
        prep.append(t)
        run_distill(spec_path, out, skip_gate=skip_gate)

    stage("distill", _distill_inputs(spec), lambda: _outputs(student, data), do_distill)
    for t in prep:
        t.join()
    for e in prep_errors:
        console.print(f"[yellow]preparing compress's tools in the background failed ({e}); compress tries again")

    # 2. compress: every format, gated
    from edgedistill.compress.pipeline import run_compress

    def do_compress() -> None:
        run_compress(student, calibration=data, task=spec_path, out=artifacts, strict=False)

    stage(
        "compress",
        {"student": state["stages"]["distill"]["outputs"], "compress": spec.compress.model_dump(mode="json"), "task": _task_core(spec)},
        lambda: _artifact_outputs(artifacts),
        do_compress,
    )

    # 3. serve + bench
    stage(
        "bench",
        {"artifacts": state["stages"]["compress"]["outputs"], "bench": spec.bench.model_dump(mode="json"), "task": _task_core(spec)},
        lambda: {"report": sha256_file(bench_dir / "report.json")} if (bench_dir / "report.json").exists() else None,
        lambda: serve_and_bench(spec, spec_path, out, artifacts, bench_dir),
    )

    report = write_report(spec, out, timings, state)
    console.print(f"[bold]done[/]: {out / 'report.md'} ({out / 'report.json'}, {out / 'pareto.png'})")
    return report


# --- what each stage depends on -----------------------------------------------------------------


def _task_core(spec: TaskSpec) -> dict[str, Any]:
    d = spec.spec_dict()
    d.pop("compress", None)
    d.pop("bench", None)
    return d


def _distill_inputs(spec: TaskSpec) -> dict[str, Any]:
    """The spec (without later stages' sections) and the content of every file it points at."""
    files: dict[str, str] = {}
    sources = [("seeds", spec.seeds), ("test_set", spec.test_set), ("pool", spec.pool)]
    for name, src in sources:
        if src is not None and not isinstance(src, list):
            files[name] = sha256_file(spec.resolve(src.path))
    for name, model in (("teacher", spec.teacher), ("generator", spec.generation.generator)):
        if model is not None and model.kind == "local" and model.path:
            files[name] = _model_hash(spec.resolve(model.path))
    files["student"] = _model_hash(spec.resolve(spec.student.path))
    return {"task": _task_core(spec), "files": files}


def _model_hash(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    if (path / MANIFEST).exists():  # a folder we made: its manifest already lists its files' hashes
        return sha256_json(read_manifest(path).get("files"))
    if path.is_dir():
        return sha256_json(hash_files(path))
    raise UserError(f"model {path} does not exist; fix the spec's path (relative paths start at the spec's folder)")


def _outputs(*folders: Path) -> dict[str, str]:
    """Hashes of the manifests' file lists, after checking the files against them."""
    return {f.name: sha256_json(read_manifest(f, verify=True)["files"]) for f in folders}


def _artifact_outputs(artifacts: Path) -> dict[str, str]:
    if not (artifacts / "compress.json").exists():
        raise UserError(f"{artifacts}/compress.json is missing")
    summary = json.loads((artifacts / "compress.json").read_text())
    out = {}
    for row in summary["artifacts"]:
        if row.get("passed"):
            out[row["name"]] = sha256_json(read_manifest(Path(row["path"]), verify=True)["files"])
    return out


def _safe(check) -> Any:
    try:
        return check()
    except (UserError, OSError, KeyError, json.JSONDecodeError):
        return None


# --- serve + bench -------------------------------------------------------------------------------


def serve_and_bench(spec: TaskSpec, spec_path: Path, out: Path, artifacts: Path, bench_dir: Path) -> dict[str, Any]:
    from edgedistill.bench.config import build_config
    from edgedistill.bench.run import run_bench

    b = spec.bench
    summary = json.loads((artifacts / "compress.json").read_text())
    passed = [r for r in summary["artifacts"] if r.get("passed")]
    if not passed:
        raise UserError(f"no artifact passed the quality gate (see {artifacts / 'compress.md'}); nothing to serve")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(b.threads or os.cpu_count() or 1)
    endpoints, prices, servers = [], [], []
    teacher_url, key_env = None, []
    try:
        if spec.teacher.kind == "local":
            teacher_dir = _served_teacher(spec, out)
            port = _free_port()
            servers.append(_start("teacher", [*_serve_cmd(teacher_dir, port, threads), "--model-alias", "teacher"], logs))
            teacher_url = f"http://127.0.0.1:{port}/v1"
            prices.append(f"teacher={b.machine_usd_per_hour}/h")
        else:
            teacher_url = spec.teacher.base_url
            prices.append(f"teacher={spec.teacher.prices.input_per_1m},{spec.teacher.prices.output_per_1m}")
            if spec.teacher.api_key_env:
                key_env.append(f"teacher={spec.teacher.api_key_env}")
        endpoints.append(f"teacher={teacher_url}" + (f"#{spec.teacher.model}" if spec.teacher.kind != "local" else ""))

        for row in passed:
            port = _free_port()
            servers.append(_start(row["name"], _serve_cmd(Path(row["path"]), port, threads), logs))
            endpoints.append(f"{row['name']}=http://127.0.0.1:{port}/v1")
            prices.append(f"{row['name']}={b.machine_usd_per_hour}/h")

        by_name = {r["name"]: r for r in passed}
        cascade = by_name.get(b.cascade_artifact) or passed[0]
        port = _free_port()
        cmd = [*_serve_cmd(Path(cascade["path"]), port, threads), "--teacher-url", teacher_url, "--teacher-model",
               spec.teacher.model_id if spec.teacher.kind != "local" else "teacher", "--threshold", str(b.cascade_threshold)]
        if spec.teacher.api_key_env and spec.teacher.kind != "local":
            cmd += ["--teacher-api-key-env", spec.teacher.api_key_env]
        servers.append(_start("cascade", cmd, logs))
        endpoints.append(f"cascade=http://127.0.0.1:{port}/v1")
        prices.append(f"cascade={b.machine_usd_per_hour}/h")

        ceiling = []
        gguf = next((r for r in passed if r["format"] == "gguf" and r["name"] == cascade["name"]), None) or next(
            (r for r in passed if r["format"] == "gguf"), None)
        if gguf is not None:
            gguf_file = Path(gguf["path"]) / read_manifest(Path(gguf["path"]))["model_file"]
            names = [gguf["name"]]
            if b.peer and _has_llama_server():
                port = _free_port()
                servers.append(_start("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_file),
                                                           "--host", "127.0.0.1", "--port", str(port), "--n_threads", threads,
                                                           "--n_ctx", "2048", "--interrupt_requests", "false"], logs))
                endpoints.append(f"llama_cpp.server=http://127.0.0.1:{port}/v1")
                prices.append(f"llama_cpp.server={b.machine_usd_per_hour}/h")
                names.append("llama_cpp.server")
            ceiling.append(",".join(names) + f"={gguf_file}")

        for s in servers:
            _wait_ready(s)
        cfg = build_config(
            endpoints, out=bench_dir, task=spec_path, concurrency=b.concurrency, rate=b.rate, requests=b.requests,
            price=prices, teacher="teacher", api_key_env=key_env or None, ceiling=ceiling or None, threads=int(threads),
            target=b.target, eval_limit=b.eval_limit,
        )
        return run_bench(cfg)
    finally:
        for s in servers:
            _stop(s)


def _served_teacher(spec: TaskSpec, out: Path) -> Path:
    """A local teacher as a servable artifact: its HF checkpoint (with a manifest and the task spec)."""
    from edgedistill.manifest import write_manifest

    src = spec.resolve(spec.teacher.path)
    if src.is_file():
        return src  # a .gguf: served by llama.cpp as it is
    dst = out / "work" / "teacher_artifact"
    key = _model_hash(src)
    if (dst / MANIFEST).exists() and read_manifest(dst).get("inputs", {}).get("teacher") == key:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(MANIFEST, "checkpoints", "README.md"))
    write_manifest(dst, kind="artifact", format="hf", stage="run/teacher", inputs={"teacher": key}, task=spec.spec_dict(),
                   name="teacher", model_file=".", bits=32)
    return dst


def _serve_cmd(artifact: Path, port: int, threads: str) -> list[str]:
    return [sys.executable, "-m", "edgedistill.serve.cli", str(artifact), "--host", "127.0.0.1", "--port", str(port), "--n-threads", threads,
            "--log-level", "warning"]


def _has_llama_server() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("sse_starlette") is not None


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, name: str, proc: subprocess.Popen, log: Path, url: str):
        self.name, self.proc, self.log, self.url = name, proc, log, url


def _start(name: str, cmd: list[str], logs: Path) -> _Server:
    log = logs / f"{name}.log"
    port = cmd[cmd.index("--port") + 1]
    fh = log.open("w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return _Server(name, proc, log, f"http://127.0.0.1:{port}")


def _wait_ready(s: _Server, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if s.proc.poll() is not None:
            tail = s.log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"server {s.name} exited (code {s.proc.returncode}): {tail[0][:200]}; log: {s.log}")
        try:
            r = httpx.get(s.url + "/v1/models", timeout=2)
            if r.status_code == 200:
                ready = httpx.get(s.url + "/ready", timeout=2)
                if ready.status_code in (200, 404):
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise UserError(f"server {s.name} was not ready after {timeout:.0f} s; log: {s.log}")


def _stop(s: _Server) -> None:
    if s.proc.poll() is None:
        s.proc.terminate()
        try:
            s.proc.wait(10)
        except subprocess.TimeoutExpired:
            s.proc.kill()


# --- the summary --------------------------------------------------------------------------------


def write_report(spec: TaskSpec, out: Path, timings: dict[str, float], state: dict[str, Any]) -> dict[str, Any]:
    from edgedistill.report import build_report, report_markdown

    rep = build_report(spec, out, state)
    rep["timings_s"] = {name: state["stages"].get(name, {}).get("seconds") for name in STAGES}
    rep["this_run_s"] = timings
    write_json_atomic(out / "report.json", rep)
    (out / "report.md").write_text(report_markdown(rep), encoding="utf-8")
    if (out / "bench" / "pareto.png").exists():
        shutil.copyfile(out / "bench" / "pareto.png", out / "pareto.png")
    return rep
