"""The shared OpenAI-compatible client against a real HTTP server on 127.0.0.1 (in a thread):
retries and backoff, Retry-After, error reasons, key scrubbing, usage, and SSE streaming."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from edgedistill.openai_client import (
    OpenAIClient,
    OpenAIError,
    backoff_delay,
    is_retryable_status,
    retry_after_s,
)
from tests.serve_fakes import LocalHTTPServer

SECRET = "sk-client-SECRET-0123456789"
ANSWER = {"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


class FakeAPI(LocalHTTPServer):
    """Answers each request by the next entry of ``plan`` (then ``("json", 200, ANSWER)``):
    ``("json", status, body, headers)``, ``("raw", status, bytes)``, ``("sse", [lines])``, ``("slow", s)``."""

    def __init__(self):
        self.plan: list[tuple] = []
        self.hits = 0
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, status: int, data: bytes, ctype: str = "application/json", headers: dict | None = None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _handle(self):
                length = int(self.headers.get("Content-Length", 0) or 0)
                self.rfile.read(length)
                with fake.lock:
                    fake.hits += 1
                    fake.auth.append(self.headers.get("Authorization"))
                    step = fake.plan.pop(0) if fake.plan else ("json", 200, ANSWER)
                kind = step[0]
                if kind == "json":
                    return self._reply(step[1], json.dumps(step[2]).encode(), headers=step[3] if len(step) > 3 else None)
                if kind == "raw":
                    return self._reply(step[1], step[2])
                if kind == "slow":
                    time.sleep(step[1])
                    return self._reply(200, json.dumps(ANSWER).encode())
                if kind == "sse":
                    data = "".join(line + "\n" for line in step[1]).encode()
                    return self._reply(200, data, ctype="text/event-stream", headers={"X-Answered-By": "student"})
                raise AssertionError(kind)

            do_POST = _handle
            do_GET = _handle

        self.bind(Handler)


@pytest.fixture
def api():
    with FakeAPI() as s:
        yield s


def run(coro):
    return asyncio.run(coro)


async def post(url: str, **kw):
    async with OpenAIClient(url, **kw) as c:
        return await c.post_json("/chat/completions", {"messages": []}), c


def test_retry_statuses_and_backoff():
    assert all(is_retryable_status(s) for s in (408, 409, 425, 429, 500, 502, 503, 599))
    assert not any(is_retryable_status(s) for s in (400, 401, 403, 404, 422))
    for attempt in range(4):  # base * 2**attempt, plus up to 50 % jitter
        d = backoff_delay(attempt, None, 0.1, 100.0)
        assert 0.1 * 2**attempt <= d <= 0.15 * 2**attempt
    assert backoff_delay(10, None, 0.1, 2.0) == 2.0  # capped
    assert backoff_delay(0, 3600.0, 0.1, 2.0) == 2.0  # Retry-After capped the same way
    assert backoff_delay(0, 0.25, 0.1, 2.0) == 0.25 and backoff_delay(0, -5.0, 0.1, 2.0) == 0.0


def test_retry_after_seconds_and_http_date():
    assert retry_after_s("2.5") == 2.5 and retry_after_s(None) is None and retry_after_s("soon") is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_s(when) <= 31
    assert retry_after_s(email.utils.formatdate(time.time() - 30, usegmt=True)) == 0.0


def test_429_retried_with_retry_after_then_success(api):
    api.plan = [("json", 429, {"error": {"message": "slow down"}}, {"Retry-After": "0.01"}), ("json", 503, {"detail": "busy"})]
    seen = []
    body, c = run(post(api.base_url, max_retries=3, retry_base_delay_s=0.001, on_retry=lambda e, d: seen.append((e.reason, d))))
    assert body == ANSWER and api.hits == 3
    assert [r for r, _ in seen] == ["http_429", "http_503"] and seen[0][1] == pytest.approx(0.01)
    assert (c.usage.retries, c.usage.responses, c.usage.prompt_tokens, c.usage.completion_tokens) == (2, 1, 7, 3)


def test_retries_exhausted_raise_the_last_error(api):
    api.plan = [("json", 500, {"error": {"message": "boom"}})] * 5
    with pytest.raises(OpenAIError) as e:
        run(post(api.base_url, max_retries=2, retry_base_delay_s=0.001))
    err = e.value
    assert (err.reason, err.status, err.message, err.attempts, err.retryable) == ("http_500", 500, "boom", 3, True)
    assert api.hits == 3


def test_client_error_is_not_retried(api):
    api.plan = [("json", 404, {"error": {"message": "no such model"}})]
    with pytest.raises(OpenAIError) as e:
        run(post(api.base_url, max_retries=5, retry_base_delay_s=0.001))
    assert (e.value.reason, e.value.status, e.value.attempts, e.value.retryable) == ("http_404", 404, 1, False)
    assert e.value.message == "no such model" and api.hits == 1


def test_ok_statuses(api):
    api.plan = [("json", 201, ANSWER), ("json", 201, ANSWER)]
    assert run(post(api.base_url))[0] == ANSWER  # any 2xx by default
    with pytest.raises(OpenAIError) as e:
        run(post(api.base_url, ok_statuses={200}))
    assert e.value.reason == "http_201"


def test_not_json_is_bad_json(api):
    api.plan = [("raw", 200, b"<html>not json</html>")]
    with pytest.raises(OpenAIError) as e:
        run(post(api.base_url, max_retries=3))
    assert e.value.reason == "bad_json" and e.value.message == "<html>not json</html>" and api.hits == 1


def test_timeout_and_unreachable_reasons(api):
    api.plan = [("slow", 1.0)]
    with pytest.raises(OpenAIError) as e:
        run(post(api.base_url, timeout_s=0.1))
    assert e.value.reason == "timeout" and e.value.cause == "ReadTimeout" and e.value.retryable
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    seen = []
    with pytest.raises(OpenAIError) as e:
        run(post(f"http://127.0.0.1:{port}/v1", max_retries=1, retry_base_delay_s=0.001, on_retry=lambda e, d: seen.append(e)))
    assert e.value.reason == "unreachable" and e.value.cause == "ConnectError" and e.value.attempts == 2 and len(seen) == 1


def test_api_key_sent_and_scrubbed(api):
    api.plan = [("json", 401, {"error": {"message": f"Incorrect API key provided: Bearer {SECRET}"}})]
    with pytest.raises(OpenAIError) as e:
        run(post(api.base_url, api_key=SECRET))
    assert api.auth == [f"Bearer {SECRET}"]
    assert SECRET not in str(e.value) and SECRET not in e.value.message and "***" in e.value.message
    assert SECRET not in repr(OpenAIClient(api.base_url, SECRET))


def test_a_shared_httpx_client_is_used_not_closed(api):
    async def go():
        async with httpx.AsyncClient() as http:
            async with OpenAIClient(api.base_url, http=http) as c:
                await c.get_json("/models")
            assert not http.is_closed
            return await OpenAIClient(api.base_url, http=http).post_json("/chat/completions", {})

    assert run(go()) == ANSWER and api.hits == 2


def chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"delta": {"content": text}}]})


async def stream_all(url: str):
    counter = iter(range(100))
    c = OpenAIClient(url, clock=lambda: float(next(counter)))
    async with c, c.stream("/chat/completions", {"stream": True}) as s:
        got = [(ch.data, ch.received_at) async for ch in s]
        return s.headers.get("x-answered-by"), got, c.usage


def test_stream_parses_sse_until_done(api):
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    lines = [": keep-alive", "", chunk("Hel"), "event: x", chunk("lo"), "data: " + json.dumps(usage), "data: [DONE]", chunk("late")]
    api.plan = [("sse", lines)]
    answered_by, got, u = run(stream_all(api.base_url))
    assert answered_by == "student"
    assert [d["choices"][0]["delta"]["content"] for d, _ in got[:2]] == ["Hel", "lo"] and len(got) == 3
    assert [t for _, t in got] == [0.0, 1.0, 2.0]  # each chunk stamped by the clock as it arrives
    assert (u.prompt_tokens, u.completion_tokens, u.responses) == (5, 2, 1)


def test_stream_error_and_bad_chunks(api):
    api.plan = [("sse", [chunk("a"), 'data: {"error": {"message": "overloaded"}}'])]
    with pytest.raises(OpenAIError) as e:
        run(stream_all(api.base_url))
    assert e.value.reason == "stream_error" and "overloaded" in e.value.message
    api.plan = [("sse", ["data: {not json"])]
    with pytest.raises(OpenAIError) as e:
        run(stream_all(api.base_url))
    assert e.value.reason == "bad_json"
    api.plan = [("sse", ["data: [1, 2]"])]
    with pytest.raises(OpenAIError) as e:
        run(stream_all(api.base_url))
    assert e.value.reason == "bad_response"


def test_stream_status_error_keeps_headers_and_json_body_is_one_chunk(api):
    api.plan = [("json", 503, {"error": {"message": "busy"}}, {"X-Answered-By": "teacher"})]
    with pytest.raises(OpenAIError) as e:
        run(stream_all(api.base_url))
    assert e.value.reason == "http_503" and e.value.message == "busy" and e.value.headers["x-answered-by"] == "teacher"
    api.plan = [("json", 200, ANSWER)]  # a server that ignored "stream"
    _, got, u = run(stream_all(api.base_url))
    assert got == [(ANSWER, 0.0)] and u.completion_tokens == 3
