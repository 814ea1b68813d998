"""The serve + bench stage of ``edgedistill run``: one ``edgedistill serve`` per artifact that passed
compress's gate, the teacher, the cascade and the peer server, measured by bench, then stopped.

The servers are separate processes (the same command a user runs) and bench talks to them over
HTTP; bench's configuration is built as typed objects (``make_config``), not as CLI strings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from edgedistill.errors import UserError
from edgedistill.manifest import MANIFEST, read_manifest, write_manifest
from edgedistill.spec import TaskSpec

QUANTIZED_TEACHER = "teacher-{}"  # the endpoint name of the quantized-teacher baseline, e.g. teacher-gguf-q4_k_m


def serve_and_bench(
    spec: TaskSpec, spec_path: Path, out: Path, passed: list[dict[str, Any]], bench_dir: Path,
    quantized_teacher: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Serve each artifact in ``passed`` (compress's rows that passed the gate), the teacher, the
    quantized teacher (the baseline, ``quantized_teacher``: compress's rows for the teacher), the
    cascade and the peer; measure them with bench into ``bench_dir``; stop them. Returns bench's report."""
    from edgedistill.bench.config import Ceiling, Endpoint, make_config, parse_list
    from edgedistill.bench.cost import Price

    b = spec.bench
    if not passed:
        raise UserError(f"no artifact passed the quality gate (see {out / 'artifacts' / 'compress.md'}); nothing to serve")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(b.threads or os.cpu_count() or 1)
    machine = Price(usd_per_hour=b.machine_usd_per_hour)
    endpoints: list[Endpoint] = []
    servers: list[_Server] = []

    def local(name: str, cmd: list[str]) -> Endpoint:
        s = _start(name, cmd, logs)
        servers.append(s)
        ep = Endpoint(name=name, url=s.url + "/v1", price=machine)
        endpoints.append(ep)
        return ep

    try:
        if spec.teacher.kind == "local":
            teacher_model = "teacher"
            teacher = local("teacher", [*_serve_cmd(_served_teacher(spec, out), _free_port(), threads), "--model-alias", "teacher"])
        else:
            teacher_model = spec.teacher.model_id
            key = None
            if spec.teacher.api_key_env:
                key = os.environ.get(spec.teacher.api_key_env)
                if not key:
                    raise UserError(f"teacher.api_key_env: the environment variable {spec.teacher.api_key_env} is not set")
            p = spec.teacher.prices
            teacher = Endpoint(name="teacher", url=_api_base(spec.teacher.base_url), model=spec.teacher.model, api_key=key,
                               price=Price(input_per_1m=p.input_per_1m, output_per_1m=p.output_per_1m))
            endpoints.append(teacher)

        for row in passed:
            local(row["name"], _serve_cmd(Path(row["path"]), _free_port(), threads))
        for row in quantized_teacher or []:
            local(QUANTIZED_TEACHER.format(row["name"]), _serve_cmd(Path(row["path"]), _free_port(), threads))

        cascade = cascade_row(spec, passed)
        cmd = [*_serve_cmd(Path(cascade["path"]), _free_port(), threads), "--teacher-url", teacher.url, "--teacher-model", teacher_model]
        if b.cascade_threshold is not None:  # set in the spec: it wins; else serve's default, the artifact's recommended threshold
            cmd += ["--threshold", str(b.cascade_threshold)]
        if spec.teacher.api_key_env and spec.teacher.kind != "local":
            cmd += ["--teacher-api-key-env", spec.teacher.api_key_env]
        local("cascade", cmd)

        ceilings = []
        gguf = next((r for r in passed if r["format"] == "gguf" and r["name"] == cascade["name"]), None) or next(
            (r for r in passed if r["format"] == "gguf"), None)
        if gguf is not None:
            gguf_file = Path(gguf["path"]) / read_manifest(Path(gguf["path"]))["model_file"]
            names = [gguf["name"]]
            if b.peer and _has_llama_server():
                local("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_file), "--host", "127.0.0.1",
                                           "--port", str(_free_port()), "--n_threads", threads, "--n_ctx", "2048",
                                           "--interrupt_requests", "false"])
                names.append("llama_cpp.server")
            ceilings.append(Ceiling(names, str(gguf_file)))

        folders = {r["name"]: r["path"] for r in passed} | {"cascade": cascade["path"]}
        folders |= {QUANTIZED_TEACHER.format(r["name"]): r["path"] for r in quantized_teacher or []}
        for ep in endpoints:  # bench's reliability.png shows each artifact's calibration from its manifest
            ep.artifact = str(folders[ep.name]) if ep.name in folders else None
        for s in servers:
            _wait_ready(s)
        from edgedistill.bench.run import run_bench

        cfg = make_config(
            endpoints, out=bench_dir, task=spec_path, concurrency=parse_list("bench.concurrency", b.concurrency, int),
            rates=parse_list("bench.rate", b.rate, float), requests=b.requests, teacher="teacher", ceilings=ceilings,
            threads=int(threads), target=b.target, eval_limit=b.eval_limit,
        )  # fmt: skip
        return run_bench(cfg)
    finally:
        for s in servers:
            _stop(s)


def cascade_row(spec: TaskSpec, passed: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The compress row of the artifact the cascade serves: ``bench.cascade_artifact``, else the first that passed."""
    return next((r for r in passed if r["name"] == spec.bench.cascade_artifact), None) or (passed[0] if passed else None)


def cascade_threshold(spec: TaskSpec, row: dict[str, Any] | None) -> tuple[float, str]:
    """The threshold the cascade is served at and where it came from (serve's own rule): the spec's
    ``bench.cascade_threshold`` when set, else the artifact's recommended one (compress's
    calibration), else 0.9."""
    from edgedistill.serve.settings import resolve_threshold

    return resolve_threshold(spec.bench.cascade_threshold, None, (row or {}).get("calibration"))


def _served_teacher(spec: TaskSpec, out: Path) -> Path:
    """A local teacher as a servable artifact: its HF checkpoint (with a manifest and the task spec)."""
    from edgedistill.run.stages import model_hash

    src = spec.resolve(spec.teacher.path)
    if src.is_file():
        return src  # a .gguf: served by llama.cpp as it is
    dst = out / "work" / "teacher_artifact"
    key = model_hash(src)
    if (dst / MANIFEST).exists() and read_manifest(dst).get("inputs", {}).get("teacher") == key:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(MANIFEST, "checkpoints", "README.md"))
    write_manifest(dst, kind="artifact", format="hf", stage="run/teacher", inputs={"teacher": key}, task=spec.spec_dict(),
                   name="teacher", model_file=".", bits=32)  # fmt: skip
    return dst


def _api_base(url: str) -> str:
    """The base URL as bench's --endpoint reads it: no trailing slash, ``/v1`` when it has no path."""
    base = url.strip().rstrip("/")
    return base + "/v1" if urlsplit(base).path in ("", "/") else base


def _serve_cmd(artifact: Path, port: int, threads: str) -> list[str]:
    return [sys.executable, "-m", "edgedistill.serve.cli", str(artifact), "--host", "127.0.0.1", "--port", str(port),
            "--n-threads", threads, "--log-level", "warning"]  # fmt: skip


def _has_llama_server() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("sse_starlette") is not None


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Server:
    name: str
    proc: subprocess.Popen
    log: Path
    url: str


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
