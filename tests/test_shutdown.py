"""Graceful shutdown, as an orchestrator does it: a real server process under load, then SIGTERM.

Every request in flight either completes (200, the whole answer) or is answered 503 in OpenAI's
error shape with Retry-After (a live stream already sent its 200: it ends with that error as an
event, then [DONE]); never a 500, no traceback in the log. /ready is 503 right after the signal and
new requests get 503; the flush hooks (``State.on_shutdown``) run after the last request, before
the engine closes; the process exits 0.

The fast tests run the fake byte-level model (tests/serve_fakes.py, 10 ms a decode step) behind the
same ``serve_app`` that `edgedistill serve` runs; the slow one runs `edgedistill serve` on the
SmolLM2 GGUF, the scenario of the issue (eight 160-token chat requests).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from edgedistill.serve.settings import Settings

from tests.serve_fakes import free_port

ROOT = Path(__file__).resolve().parents[1]
LONG = 160  # tokens: 1.6 s of 10 ms steps at least, far past a 0.5 s grace
SERVER = """
import sys
from pathlib import Path
from edgedistill.serve.app import create_app
from edgedistill.serve.artifact import Artifact
from edgedistill.serve.engine import Engine
from edgedistill.serve.settings import Settings
from edgedistill.serve.shutdown import serve_app
from tests.serve_fakes import FakeRunner

port, hook_file = int(sys.argv[1]), Path(sys.argv[2])
s = Settings.load(artifact="unused.gguf", model_alias="student", port=port, n_threads=1, threshold=0)
runner = FakeRunner(lambda prompt: ("x" * 400, 20.0), n_slots=4, ctx_per_slot=1024, delay_s=0.01)
art = Artifact(name="student", format="gguf", model_path=Path("unused.gguf"))
app = create_app(s, engine=Engine(runner, max_queue=s.max_queue), artifact=art)
drain = app.state.drain
app.state.st.on_shutdown.append(
    lambda: hook_file.write_text(f"in_flight={drain.in_flight} engine_closed={runner.closed}")
)
serve_app(app, s)
"""


class FakeServer:
    """The fake-model server in its own process; its log (stdout and stderr) goes to a file."""

    def __init__(self, tmp: Path, grace_s: float):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.hook_file = tmp / "hook.txt"
        self.log_path = tmp / "server.log"
        env = {**os.environ, "EDGEDISTILL_CONFIG": "", "EDGEDISTILL_SHUTDOWN_GRACE_S": str(grace_s)}
        self.log = self.log_path.open("wb")
        cmd = [sys.executable, "-c", SERVER, str(self.port), str(self.hook_file)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_ready(self)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def wait_ready(server, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited: {server.output()}")
        try:
            if httpx.get(server.base + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


@pytest.fixture
def fake_server(request, tmp_path):
    servers = []

    def start(grace_s: float) -> FakeServer:
        servers.append(FakeServer(tmp_path, grace_s))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def chat(max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": "student",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


async def ask(c: httpx.AsyncClient, body: dict) -> dict:
    """One request's outcome: status, headers, and the JSON body or the stream's data lines."""
    if not body["stream"]:
        r = await c.post("/v1/chat/completions", json=body)
        return {"status": r.status_code, "headers": r.headers, "json": r.json(), "stream": False}
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [line.removeprefix("data: ") async for line in r.aiter_lines() if line.startswith("data: ")]
        return {"status": r.status_code, "headers": r.headers, "events": events, "stream": True}


def outcome(res: dict, max_tokens: int) -> str:
    """ "completed" (the whole answer) or "503" (in OpenAI's error shape, with Retry-After when the
    status could still say it); anything else fails the test."""
    if not res["stream"]:
        if res["status"] == 200:
            assert res["json"]["usage"]["completion_tokens"] == max_tokens
            return "completed"
        assert res["status"] == 503, res
        assert_shutdown_error(res["json"])
        assert int(res["headers"]["retry-after"]) >= 1
        return "503"
    assert res["status"] == 200 and res["events"][-1] == "[DONE]", res
    events = [json.loads(e) for e in res["events"][:-1]]
    if "error" in events[-1]:
        assert_shutdown_error(events[-1])
        return "503"
    text = "".join(ch["delta"].get("content") or "" for e in events for ch in e.get("choices", []))
    assert text == "x" * max_tokens
    return "completed"


def assert_shutdown_error(body: dict) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "server_shutting_down" and err["type"] == "server_error" and "shutting down" in err["message"]


async def load_then_sigterm(server, bodies: list[dict], in_flight: int) -> tuple[list[dict], dict]:
    """Send ``bodies`` at once; when the server holds ``in_flight`` of them (decoding or queued),
    SIGTERM it, then look at /ready and a new request. Returns the outcomes and those two answers."""
    async with httpx.AsyncClient(base_url=server.base, timeout=60) as c:
        tasks = [asyncio.ensure_future(ask(c, b)) for b in bodies]
        deadline = time.time() + 30
        while True:
            r = (await c.get("/ready")).json()
            if r["waiting"] + r["active"] >= in_flight:
                break
            assert time.time() < deadline, f"the server never held {in_flight} requests: {r}"
            await asyncio.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        after = {"ready": await c.get("/ready"), "new": await c.post("/v1/chat/completions", json=chat(5))}
        return list(await asyncio.gather(*tasks)), after


def assert_clean_exit(server, timeout_s: float) -> None:
    assert server.proc.wait(timeout=timeout_s) == 0, server.output()
    log = server.output()
    assert "Traceback" not in log and "CancelledError" not in log and '" 500 ' not in log, log


def test_sigterm_finishes_what_is_in_flight_and_refuses_new_work(fake_server):
    server = fake_server(30)
    bodies = [chat(LONG, stream=i % 2 == 1) for i in range(8)]  # 4 slots: four decode, four wait
    results, after = asyncio.run(load_then_sigterm(server, bodies, in_flight=8))

    assert after["ready"].status_code == 503 and after["ready"].json()["error"]["code"] == "server_shutting_down"
    assert after["new"].status_code == 503 and int(after["new"].headers["retry-after"]) >= 1
    assert_shutdown_error(after["new"].json())
    assert [outcome(r, LONG) for r in results] == ["completed"] * 8  # queued ones too, within the grace
    assert_clean_exit(server, 15)
    # the flush hooks ran after the last answer, before the engine closed
    assert server.hook_file.read_text() == "in_flight=0 engine_closed=False"


def test_sigterm_past_the_grace_answers_503_never_500(fake_server):
    server = fake_server(0.5)
    short = [chat(5), chat(5, stream=True)]  # done well within the grace
    long = [chat(LONG, stream=i % 2 == 1) for i in range(6)]  # cannot finish in 0.5 s: two decoding, four queued
    t0 = time.time()
    results, after = asyncio.run(load_then_sigterm(server, short + long, in_flight=6))

    assert after["ready"].status_code == 503
    counts = [outcome(r, 5 if i < 2 else LONG) for i, r in enumerate(results)]
    assert counts[:2] == ["completed"] * 2 and counts[2:] == ["503"] * 6, counts
    assert any(r["stream"] for r in results[2:]) and any(not r["stream"] for r in results[2:])
    assert_clean_exit(server, 15)
    assert time.time() - t0 < 15  # the grace bounds it, not the 160-token answers
    assert server.hook_file.read_text() == "in_flight=0 engine_closed=False"


def test_grace_setting_flag_env_and_default(monkeypatch):
    assert Settings.load(artifact="a.gguf").shutdown_grace_s == 30
    monkeypatch.setenv("EDGEDISTILL_SHUTDOWN_GRACE_S", "7.5")
    assert Settings.load(artifact="a.gguf").shutdown_grace_s == 7.5
    assert Settings.load(artifact="a.gguf", shutdown_grace_s=2).shutdown_grace_s == 2
    from edgedistill.serve.cli import serve_cli

    assert "shutdown_grace_s" in serve_cli.__signature__.parameters  # the --shutdown-grace-s flag


def test_shutdown_hooks_run_in_order_and_a_failing_one_does_not_stop_the_rest(caplog):
    from fastapi.testclient import TestClient

    from tests.test_serve_api import make_app

    app = make_app()
    ran: list[str] = []

    def broken() -> None:
        raise OSError("disk full")

    async def flush() -> None:
        ran.append("async")

    app.state.st.on_shutdown += [lambda: ran.append("first"), broken, flush]
    with TestClient(app) as c:
        assert c.get("/ready").status_code == 200
        assert ran == []
    assert ran == ["first", "async"]
    assert "disk full" in caplog.text and "Traceback" not in caplog.text
