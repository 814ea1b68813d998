"""Load on a real uvicorn server on 127.0.0.1 (the fake numpy model: the server's own code, seconds).

- Twice the server's capacity, a few thousand requests: every accepted request succeeds with the
  right answer, every other one is a 429 with Retry-After, nothing else; the server's memory stays
  flat; afterwards it is healthy, idle and answers again. The server runs in its own process so its
  RSS is its own (``pytest tests/test_load.py -s`` prints the numbers).
- A client that disconnects, streaming or not, frees its slot at once: the request queued behind it
  starts right away instead of waiting for the abandoned answer to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from tests.serve_fakes import FakeRunner, free_port
from tests.test_serve_api import MODEL, chat_body, make_app

ROOT = Path(__file__).resolve().parents[1]
SLOTS, QUEUE = 4, 4
CAPACITY = SLOTS + QUEUE  # requests the server holds at once: decoding + waiting
CLIENTS = 2 * CAPACITY
TOTAL = int(os.environ.get("EDGEDISTILL_LOAD_REQUESTS", "3000"))
WARMUP = 300

SERVER = f"""
import sys, uvicorn
from tests.serve_fakes import FakeRunner
from tests.test_serve_api import make_app
app = make_app(runner=FakeRunner(n_slots={SLOTS}, delay_s=0.002), max_queue={QUEUE})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def server_process():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.1)
        yield proc, base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def hammer(base: str, total: int) -> dict:
    """CLIENTS closed-loop clients until ``total`` requests: each sends its next request when answered
    (20 ms after a 429, as a client honouring back-off a little would)."""
    counts: dict = {"sent": 0, "status": {}, "wrong": [], "no_retry_after": 0}
    body = chat_body(temperature=0, max_tokens=4)

    async def client(c: httpx.AsyncClient) -> None:
        while counts["sent"] < total:
            counts["sent"] += 1
            r = await c.post("/v1/chat/completions", json=body)
            counts["status"][r.status_code] = counts["status"].get(r.status_code, 0) + 1
            if r.status_code == 200:
                if r.json()["choices"][0]["message"]["content"] != "Hell":
                    counts["wrong"].append(r.text)
            elif r.status_code == 429:
                if int(r.headers.get("retry-after", "0")) < 1 or r.json()["error"]["code"] != "rate_limit_exceeded":
                    counts["no_retry_after"] += 1
                await asyncio.sleep(0.02)
            else:
                counts["wrong"].append(f"{r.status_code} {r.text}")

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(CLIENTS)])
        counts["seconds"] = time.perf_counter() - t0
    return counts


@pytest.mark.slow
def test_twice_capacity_accepted_succeed_rest_429_memory_flat():
    with server_process() as (proc, base):
        warm = asyncio.run(hammer(base, WARMUP))  # allocator, caches and metric series reach their steady state
        before = rss_mb(proc.pid)
        res = asyncio.run(hammer(base, TOTAL))
        after = rss_mb(proc.pid)
        ok, busy = res["status"].get(200, 0), res["status"].get(429, 0)
        print(
            f"\nload: {CLIENTS} clients on {CAPACITY} places ({SLOTS} slots + {QUEUE} queued), {ok + busy} requests in "
            f"{res['seconds']:.1f} s: {ok} ok ({ok / res['seconds']:.0f}/s), {busy} x 429 ({busy / (ok + busy):.0%}); "
            f"server RSS {before:.1f} -> {after:.1f} MB"
        )
        assert not res["wrong"], res["wrong"][:3]  # every accepted request got the right answer; nothing but 200/429
        assert res["no_retry_after"] == 0
        assert ok + busy >= TOTAL and ok > TOTAL / 10 and busy > 0  # overloaded, yet serving
        assert after - before < 10, (before, after)  # flat: no per-request leak

        health = httpx.get(base + "/health").json()
        ready = httpx.get(base + "/ready").json()
        assert health == {"status": "ok"} and ready["waiting"] == 0 and ready["active"] == 0
        r = httpx.post(base + "/v1/chat/completions", json=chat_body(temperature=0))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello from the student."
        metrics = httpx.get(base + "/metrics").text
        rejected = busy + warm["status"].get(429, 0)
        assert f'edgedistill_rejected_total{{reason="queue_full"}} {float(rejected)}' in metrics


# ---- disconnects ---------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_in_thread(app):
    """The app behind a real uvicorn on 127.0.0.1 (a socket: disconnects are real)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def one_slot():
    """One slot, answers of 1000 tokens at ~10 ms each: an abandoned answer would hold it ~10 s.

    The bounds below (5 s) sit halfway between "freed at once" and that, so a loaded machine keeps them."""
    runner = FakeRunner(script=lambda p: ("x" * 1000, 20.0), n_slots=1, ctx_per_slot=2048, delay_s=0.01)
    app = make_app(runner=runner, max_tokens_limit=1024, max_queue=4)
    with serve_in_thread(app) as base:
        yield base, app.state.st.engine


def freed_within(engine, seconds: float) -> float:
    t0 = time.perf_counter()
    while engine.active or engine.waiting:
        if time.perf_counter() - t0 > seconds:
            raise AssertionError(f"slot still busy after {seconds} s")
        time.sleep(0.005)
    return time.perf_counter() - t0


def test_stream_client_that_disconnects_frees_its_slot_at_once(one_slot):
    base, engine = one_slot
    body = chat_body(stream=True, max_tokens=1000)
    with httpx.Client(base_url=base, timeout=30) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any('"content": "x"' in ln for ln in got) and engine.active == 1
    took = freed_within(engine, 5.0)
    t0 = time.perf_counter()
    r = httpx.post(base + "/v1/chat/completions", json=chat_body(max_tokens=5, temperature=0), timeout=30)
    assert r.status_code == 200 and time.perf_counter() - t0 < 5  # not behind ~10 s of abandoned decoding
    print(f"\nstream disconnect: slot free after {took * 1000:.0f} ms")


def test_client_that_gives_up_on_a_plain_request_frees_its_slot_at_once(one_slot):
    base, engine = one_slot
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions", json=chat_body(max_tokens=1000), timeout=0.3)
    took = freed_within(engine, 5.0)
    print(f"\nnon-stream disconnect: slot free after {took * 1000:.0f} ms")
    r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5}, timeout=30)
    assert r.status_code == 200


def test_queued_clients_that_disconnect_leave_the_queue(one_slot):
    base, engine = one_slot

    async def go():
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            tasks = [asyncio.ensure_future(c.post("/v1/chat/completions", json=chat_body(max_tokens=1000))) for _ in range(4)]
            await asyncio.sleep(0.3)
            assert engine.active == 1 and engine.waiting == 3
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(go())
    freed_within(engine, 5.0)
