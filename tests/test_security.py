"""Security: no way in without the key, no way out of the artifact folder, no key anywhere it
could leak, no unbounded request.

- With an API key set, every route but /health answers 401 without it (docs, OpenAPI document,
  metrics, readiness, unknown routes, wrong methods), checked in constant time (SHA-256 digests
  compared with hmac.compare_digest) before the body is read.
- Model names are names, never paths: no file is opened for any ``model`` a client sends; an
  artifact's manifest cannot point outside its folder (tests/test_faults.py has the tampering cases).
- Neither the server's key, nor the teacher's, nor distill's teacher key ends up in logs, responses,
  error messages, manifests, reports or the teacher cache; the client's key is never sent to the teacher.
- Request size: a body over ``max_body_bytes`` is refused with 413 on a real socket without being
  read, whether it declares its length or streams it in chunks.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
from edgedistill.distill.cache import ResponseCache
from edgedistill.distill.pipeline import build_dataset, teacher_gate
from edgedistill.distill.teacher import ChatRequest, make_teacher
from edgedistill.distill.teacher_api import OpenAITeacher
from edgedistill.serve.settings import Settings
from fastapi.testclient import TestClient

from edgedistill.errors import UserError
from edgedistill.spec import load_spec
from tests.serve_fakes import send_json, start_http, stop_http
from tests.test_faults import generation_spec
from tests.test_load import serve_in_thread
from tests.test_serve_api import MODEL, chat_body, classification_task, make_app

KEY = "sk-server-3f9a7c2e1b"
TEACHER_KEY = "sk-teacher-8d6e4a0c5f"


class EchoTeacher:
    """An OpenAI-compatible teacher that records the headers and bodies it gets and, with
    ``status`` != 200, fails with an error body that echoes the Authorization header back (as some
    proxies do): the worst case for a key leaking into an error message."""

    def __init__(self, status: int = 200, reply: str = "card_linking"):
        self.status, self.reply = status, reply
        self.seen: list[str] = []
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fake.seen.append(str(dict(self.headers)) + body.decode())
                if fake.status == 200:
                    data = {"choices": [{"message": {"content": fake.reply}, "text": fake.reply}], "usage": {"prompt_tokens": 1}}
                else:
                    data = {"error": {"message": f"bad credentials: {self.headers.get('Authorization')}"}}
                raw = json.dumps(data).encode()
                send_json(self, raw, fake.status)

        self.server, self.url = start_http(H)

    def close(self):
        stop_http(self.server)


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("EDGE_SEC_KEY", KEY)
    monkeypatch.setenv("EDGE_SEC_TEACHER_KEY", TEACHER_KEY)


@pytest.fixture
def keyed(keys):
    with TestClient(make_app(task=classification_task(), api_key_env="EDGE_SEC_KEY", threshold=0.0)) as c:
        yield c


AUTH = {"Authorization": f"Bearer {KEY}"}


def every_route(app) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or []):
            if method != "HEAD":
                out.append((method, route.path))
    return out


def test_every_route_but_health_needs_the_key(keyed):
    routes = every_route(keyed.app)
    assert {p for _, p in routes} >= {"/docs", "/openapi.json", "/metrics", "/ready", "/v1/models", "/v1/predict"}
    routes += [("GET", "/v1/nothing"), ("DELETE", "/v1/chat/completions"), ("GET", "/metrics/../ready")]
    wrong = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer " + "x" * 10_000},
        {"X-API-Key": KEY},
    ]
    tried = 0
    for method, path in routes:
        if path == "/health":
            assert keyed.request(method, path).status_code == 200
            continue
        for headers in wrong:
            r = keyed.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
            tried += 1
        r = keyed.request(method, path, headers=AUTH)
        assert r.status_code != 401, (method, path)
    assert keyed.get(f"/v1/models?api_key={KEY}").status_code == 401  # only the header counts
    assert keyed.get("/v1/models", headers={"Authorization": f"bearer  {KEY} "}).status_code == 200
    assert tried >= 80
    print(f"\napi key: {tried} requests without the right key on {len(routes) - 1} routes, all 401")


def test_key_is_checked_before_the_body_is_read(keyed):
    r = keyed.post("/v1/chat/completions", content=b"x" * 3_000_000, headers={"content-type": "application/json"})
    assert r.status_code == 401  # not 413: nothing of the body was read for a caller without the key


def test_key_comparison_is_constant_time(keyed, monkeypatch):
    """Whatever is sent, the comparison is hmac.compare_digest of two SHA-256 digests: the same
    length and the same work for a wrong key of any length or with any common prefix."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr("edgedistill.serve.middleware.hmac.compare_digest", spy)
    for token in ("", "x", KEY[:-1], KEY + "x", "y" * 5000, KEY):
        keyed.get("/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert calls == [(32, 32)] * 6


SNEAKY_MODELS = [
    "../../../../etc/passwd",
    "/etc/passwd",
    "..\\..\\windows\\win.ini",
    "file:///etc/passwd",
    "x/../../manifest.json",
    "\x00",
]


def test_model_names_are_never_paths(keyed):
    """No file is opened while the server handles any of these model names (an audit hook sees
    every open() in the process)."""
    opened: list[str] = []
    watching = threading.Event()

    def hook(event, args):
        if watching.is_set() and event == "open":
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # cannot be removed; inert once the event is cleared
    try:
        watching.set()
        for name in SNEAKY_MODELS:
            for route, body in (
                ("/v1/chat/completions", {**chat_body(), "model": name}),
                ("/v1/completions", {"model": name, "prompt": "x"}),
            ):
                r = keyed.post(route, json=body, headers=AUTH)
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    finally:
        watching.clear()
    assert not [p for p in opened if "passwd" in p or "win.ini" in p or "manifest" in p], opened


def test_no_key_in_logs_responses_or_metrics(keys, caplog):
    caplog.set_level(logging.DEBUG)
    failing = EchoTeacher(status=401)
    try:
        app = make_app(
            task=classification_task(),
            api_key_env="EDGE_SEC_KEY",
            teacher_url=failing.url,
            teacher_model="big",
            teacher_api_key_env="EDGE_SEC_TEACHER_KEY",
            threshold=1.0,
            breaker_failures=100,
        )
        texts = []
        with TestClient(app) as c:
            for r in (
                c.post("/v1/chat/completions", json=chat_body(), headers=AUTH),
                c.post("/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=AUTH),
                c.post("/v1/predict", json={"input": "x"}, headers=AUTH),
                c.post("/v1/predict", json={"input": "x"}, headers={"Authorization": f"Bearer {KEY}x"}),
                c.post("/v1/predict", json={"inputt": KEY}, headers=AUTH),  # a key pasted into a field name
                c.get("/metrics", headers=AUTH),
                c.get("/openapi.json", headers=AUTH),
                c.get("/v1/models", headers=AUTH),
            ):
                texts.append(r.text + str(dict(r.headers)))
            assert (
                c.post("/v1/chat/completions", json=chat_body(), headers=AUTH).json()["edgedistill"]["teacher_error"]
                == "http_401"
            )
        everything = (
            "\n".join(texts) + caplog.text + repr(app.state.st.settings) + repr(app.state.st.teacher.__dict__.get("model"))
        )
        assert TEACHER_KEY not in everything
        assert KEY not in "\n".join(texts[:4] + texts[5:]) + caplog.text  # (the 5th echoes the client's own field name)
        teacher_saw = "\n".join(failing.seen)
        assert TEACHER_KEY in teacher_saw and KEY not in teacher_saw  # the client's key never reaches the teacher
    finally:
        failing.close()


def test_distill_never_stores_or_prints_the_teacher_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGE_SEC_TEACHER_KEY", TEACHER_KEY)
    teacher_server = EchoTeacher(status=200)
    try:
        spec_path = generation_spec(tmp_path, teacher_server.url)
        spec = load_spec(spec_path)
        spec.teacher.api_key_env = "EDGE_SEC_TEACHER_KEY"
        out = tmp_path / "run"
        cache = ResponseCache(out / "cache" / "teacher.sqlite")
        teacher = make_teacher(spec.teacher, spec.base_dir, cache)
        test = spec.load_test_set()
        teacher_gate(spec, teacher, test, out, skip_gate=True)
        build_dataset(spec, teacher, spec.load_seeds(), test, cache, out / "data")
        cache.close()
        assert all(TEACHER_KEY in s for s in teacher_server.seen)  # it was sent, as a header
        assert repr(teacher).count(TEACHER_KEY) == 0
    finally:
        teacher_server.close()

    # an API that echoes the key in its error body: the error message has it scrubbed
    echo = EchoTeacher(status=401)
    try:
        t = OpenAITeacher(echo.url, "m", "EDGE_SEC_TEACHER_KEY", max_retries=0, cache=ResponseCache(tmp_path / "c.sqlite"))
        with pytest.raises(UserError) as e:
            t.run_chat_many([ChatRequest(messages=[{"role": "user", "content": "hi"}])])
        assert TEACHER_KEY not in str(e.value) and "***" in str(e.value)
    finally:
        echo.close()

    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"teacher.sqlite", "gate.json", "raw.jsonl", "report.json", "manifest.json"}
    leaks = [str(p) for p in files if TEACHER_KEY.encode() in p.read_bytes()]
    printed = capsys.readouterr()
    assert not leaks and TEACHER_KEY not in printed.out + printed.err
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["teacher"]["api_key_env"] == "EDGE_SEC_TEACHER_KEY"  # the variable's name, never its value


def test_settings_hold_variable_names_not_keys(keys):
    s = Settings.load(artifact="x.gguf", api_key_env="EDGE_SEC_KEY", teacher_api_key_env="EDGE_SEC_TEACHER_KEY")
    dumped = s.model_dump_json() + repr(s)
    assert KEY not in dumped and TEACHER_KEY not in dumped
    assert s.read_api_key() == KEY


# ---- request size on a real socket ------------------------------------------------------------------


@pytest.fixture
def small_server():
    app = make_app(max_body_bytes=4096)
    with serve_in_thread(app) as base:
        yield int(base.rsplit(":", 1)[1])
    app.state.st.engine.close()


def _status_of(sock: socket.socket, timeout: float = 3.0) -> int:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_declared_huge_body_is_refused_before_it_is_sent(small_server):
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", small_server)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n{"
        )
        assert _status_of(s) == 413
    took = time.perf_counter() - t0
    assert took < 10  # answered at once, not after a gigabyte (a bound a loaded machine keeps)
    print(f"\nContent-Length 1e9: 413 after {took * 1000:.0f} ms")


def test_endless_chunked_body_is_cut_off_at_the_limit(small_server):
    """No Content-Length, a body that never ends: the server answers 413 once it has read past the
    limit, while the client is still sending (the client looks for the answer every 64 KiB)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", small_server)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sent = 0
        try:
            while sent < 50_000_000:  # would go on forever; the server must answer long before
                s.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
                sent += 1024
                if sent % (64 * 1024) == 0:
                    s.setblocking(False)
                    try:
                        if s.recv(1, socket.MSG_PEEK):
                            break
                    except BlockingIOError:
                        pass
                    s.setblocking(True)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.setblocking(True)
        assert _status_of(s) == 413
    took = time.perf_counter() - t0
    assert sent < 5_000_000
    print(f"\nendless chunked body: 413 after {took * 1000:.0f} ms, {sent // 1024} KiB sent by then (limit 4 KiB)")


def test_oversized_headers_are_refused(small_server):
    with socket.create_connection(("127.0.0.1", small_server)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        try:
            status = _status_of(s)
        except (ConnectionResetError, ValueError, IndexError):
            status = 431  # closed without a response: refused all the same
    assert 400 <= status < 500
