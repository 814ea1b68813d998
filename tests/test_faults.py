"""Faults, injected for real, and what must survive them.

- The teacher behind the server is down, slow past the timeout, drips its answer, answers garbage,
  429 or 5xx: every request is still answered (by the student, flagged with ``teacher_error``) in a
  response that matches the documented schema, and the circuit breaker opens and closes again.
- ``distill`` data generation killed with SIGKILL and started again: no answer that reached the
  cache is asked for again, and the dataset is exactly the one of a run never killed (no row lost
  or duplicated).
- Training killed with SIGKILL: the rerun resumes from its last complete checkpoint and ends with
  the weights of a run never killed.
- An artifact truncated or tampered with (file bytes, manifest hashes, paths in the manifest): refused
  with a message that says what is wrong, before anything is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import uvicorn
import yaml
from edgedistill.distill.cache import ResponseCache
from edgedistill.serve.artifact import load_artifact
from edgedistill.serve.fallback import CircuitBreaker, FallbackTeacher
from edgedistill.serve.types import ChatCompletion, Completion, PredictResponse
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.testclient import TestClient

from edgedistill.errors import UserError
from edgedistill.manifest import write_manifest
from tests.serve_fakes import free_port
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_serve_api import MODEL, chat_body, classification_task, make_app

ROOT = Path(__file__).resolve().parents[1]


# ---- a teacher that fails on demand ----------------------------------------------------------------

OK_CHAT = {
    "id": "t",
    "object": "chat.completion",
    "model": "big",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "card_linking"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}
OK_COMPLETION = {"id": "t", "object": "text_completion", "model": "big", "choices": [{"index": 0, "text": "card_linking"}]}
GARBAGE = {
    "html": b"<html><body>502 Bad Gateway</body></html>",
    "truncated json": b'{"choices": [{"message": {"content": "car',
    "empty object": b"{}",
    "no choices": b'{"choices": []}',
    "choices not objects": b'{"choices": [1, "x"]}',
    "content not text": b'{"choices": [{"message": {"content": {"a": 1}}, "text": 5}]}',
    "a JSON string": b'"card_linking"',
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "not UTF-8": b'{"choices": [{"message": {"content": "\xff\xfe"}}]}',
}


class ScriptedTeacher:
    """An OpenAI-compatible teacher on 127.0.0.1 that answers as ``mode`` says: ``ok``, ``status:503``,
    ``slow:2`` (seconds), ``drip`` (a byte every 50 ms for 5 s), or a key of GARBAGE. Not started
    until entered, so its URL can first be one where nothing listens (the teacher is down)."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.calls = 0
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._answer(request, OK_CHAT)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._answer(request, OK_COMPLETION)

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def _answer(self, request: Request, ok: dict) -> Response:
        await request.body()
        self.calls += 1
        mode = self.mode
        if mode == "ok":
            return JSONResponse(ok)
        if mode.startswith("status:"):
            code = int(mode.split(":")[1])
            return JSONResponse({"error": {"message": "no"}}, status_code=code, headers={"Retry-After": "1"})
        if mode.startswith("slow:"):
            await asyncio.sleep(float(mode.split(":")[1]))
            return JSONResponse(ok)
        if mode == "drip":

            async def drip():
                for _ in range(100):
                    yield b" "
                    await asyncio.sleep(0.05)
                yield json.dumps(ok).encode()

            return StreamingResponse(drip(), media_type="application/json")
        return Response(GARBAGE[mode], media_type="application/json")

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("teacher did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


TIMEOUT_S = 2.0


def fallback_app(teacher_url: str, **settings):
    """Every answer goes to the teacher (threshold 1.0); /v1/predict has a task."""
    # 2 s: a usable answer from a loaded 2-core machine arrives well within it; the slow (6 s) and
    # dripping (5 s) teachers do not
    defaults = {"threshold": 1.0, "teacher_timeout_s": TIMEOUT_S, "breaker_failures": 1000, "breaker_cooldown_s": 0.3}
    return make_app(task=classification_task(), teacher_url=teacher_url, teacher_model="big", **{**defaults, **settings})


def ask_everything(c: TestClient) -> list[dict]:
    """One request of each kind the teacher can be asked for; each a 200 in the documented shape."""
    out = []
    r = c.post("/v1/chat/completions", json=chat_body(temperature=0))
    assert r.status_code == 200, r.text
    out.append(ChatCompletion.model_validate(r.json()).model_dump())
    r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": 0})
    assert r.status_code == 200, r.text
    out.append(Completion.model_validate(r.json()).model_dump())
    r = c.post("/v1/predict", json={"input": "where is my card"})
    assert r.status_code == 200, r.text
    out.append(PredictResponse.model_validate(r.json()).model_dump())
    with c.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    out.append(json.loads(lines[-2][6:]))  # the last chunk carries the edgedistill object
    return out


FAULTS = {
    "down": ("down", "unreachable"),
    "slow past the timeout": ("slow:6", "timeout"),
    "drips its answer": ("drip", "timeout"),
    "429": ("status:429", "http_429"),
    "500": ("status:500", "http_500"),
    "502": ("status:502", "http_502"),
    "503": ("status:503", "http_503"),
    **{f"garbage: {name}": (name, "bad_") for name in GARBAGE},
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_failing_teacher_never_fails_a_request(fault):
    mode, error = FAULTS[fault]
    teacher = ScriptedTeacher(mode)
    with contextlib.ExitStack() as stack:
        if mode != "down":
            stack.enter_context(teacher)
        c = stack.enter_context(TestClient(fallback_app(teacher.url)))
        t0 = time.perf_counter()
        answers = ask_everything(c)
        took = time.perf_counter() - t0
        for a in answers:
            ed = a["edgedistill"]
            assert ed["answered_by"] == "student" and ed["teacher_error"].startswith(error), (fault, ed)
        # the timeout bounds each of the 4 teacher calls, drip or not; without it they take 20-24 s.
        # The 6 s of slack are for a loaded machine.
        assert took < 4 * TIMEOUT_S + 6, took
        assert c.get("/ready").status_code == 200


def test_teacher_with_odd_but_usable_answers_is_normalised():
    """Text we can use, wrapped in fields we cannot vouch for: the client gets our schema."""
    teacher = ScriptedTeacher("ok")
    odd = {
        "choices": [{"message": {"content": "card_linking"}, "finish_reason": 7, "logprobs": "x"}],
        "usage": "lots",
        "model": 5,
    }
    with teacher, TestClient(fallback_app(teacher.url)) as c:
        OK_CHAT_BACKUP = dict(OK_CHAT)
        try:
            OK_CHAT.clear()
            OK_CHAT.update(odd)
            body = c.post("/v1/chat/completions", json=chat_body()).json()
        finally:
            OK_CHAT.clear()
            OK_CHAT.update(OK_CHAT_BACKUP)
    parsed = ChatCompletion.model_validate(body)
    assert parsed.edgedistill.answered_by == "teacher" and parsed.choices[0].message.content == "card_linking"
    assert body["usage"] is None and body["choices"][0]["finish_reason"] == "stop" and body["model"] == "5"


def test_circuit_breaker_opens_then_closes_when_the_teacher_is_back():
    teacher = ScriptedTeacher("status:503")
    with teacher, TestClient(fallback_app(teacher.url, breaker_failures=3, breaker_cooldown_s=1.5)) as c:

        def error():
            return c.post("/v1/chat/completions", json=chat_body()).json()["edgedistill"]["teacher_error"]

        assert [error() for _ in range(5)] == ["http_503"] * 3 + ["circuit_open"] * 2
        assert teacher.calls == 3  # open: the teacher is left alone
        assert "edgedistill_teacher_circuit_open 1.0" in c.get("/metrics").text
        time.sleep(1.6)
        assert error() == "http_503" and teacher.calls == 4  # half-open: one trial, failed: open again
        assert error() == "circuit_open" and teacher.calls == 4
        teacher.mode = "ok"
        time.sleep(1.6)
        body = c.post("/v1/chat/completions", json=chat_body()).json()
        assert body["edgedistill"]["answered_by"] == "teacher" and body["edgedistill"]["teacher_error"] is None
        assert "edgedistill_teacher_circuit_open 0.0" in c.get("/metrics").text
        assert c.post("/v1/predict", json={"input": "x"}).json()["answered_by"] == "teacher"  # closed for every route


def test_teacher_down_then_up():
    teacher = ScriptedTeacher("ok")  # not started yet: nothing listens on its port
    with TestClient(fallback_app(teacher.url, breaker_failures=2, breaker_cooldown_s=1.5)) as c:
        errors = [c.post("/v1/chat/completions", json=chat_body()).json()["edgedistill"]["teacher_error"] for _ in range(3)]
        assert errors[0].startswith("unreachable") and errors[2] == "circuit_open"
        with teacher:
            time.sleep(1.6)
            assert c.post("/v1/chat/completions", json=chat_body()).json()["edgedistill"]["answered_by"] == "teacher"


def test_a_cancelled_trial_call_does_not_wedge_the_breaker():
    """A client that disconnects during the half-open trial call: the breaker must let the next one try."""

    async def go(url: str):
        breaker = CircuitBreaker(failures=1, cooldown_s=0.0)
        t = FallbackTeacher(url, "big", timeout_s=5, breaker=breaker)
        breaker.record(False)  # open; cooldown 0: the next call is the trial
        call = asyncio.ensure_future(t.post("/chat/completions", {"messages": []}))
        await asyncio.sleep(0.2)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        allowed = breaker.allow()
        await t.close()
        return allowed

    with ScriptedTeacher("slow:1") as teacher:
        assert asyncio.run(go(teacher.url))


# ---- distill generation killed with SIGKILL --------------------------------------------------------

WORDS = {"card": "card_arrival", "rate": "exchange_rate", "pin": "change_pin"}


class RecordingTeacher:
    """A deterministic OpenAI-compatible teacher (its answer depends on the request only) that
    records every request it receives; ``delay_s`` per answer so a run can be killed half-way."""

    def __init__(self, delay_s: float = 0.03):
        self.requests: list[str] = []
        self.active = 0  # connections being handled
        self.lock = threading.Lock()
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def handle(self):
                with fake.lock:
                    fake.active += 1
                try:
                    super().handle()
                finally:
                    with fake.lock:
                        fake.active -= 1

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(request_id(body))
                time.sleep(delay_s)
                system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
                if system.startswith("You write realistic"):
                    n = int(re.search(r"Write (\d+) new", user).group(1))
                    h = hashlib.sha256(user.encode()).hexdigest()
                    text = "\n".join(f"question {h[j * 6 : j * 6 + 6]} about my {w}" for j, w in zip(range(n), list(WORDS) * 9))
                else:
                    text = next((lab for w, lab in WORDS.items() if w in user.lower()), "no idea")
                data = json.dumps(
                    {"choices": [{"message": {"content": text}}], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}
                )
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client was killed
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def settle(self, quiet_s: float = 0.5, timeout_s: float = 30) -> None:
        """Wait until no connection is being handled and no request has arrived for ``quiet_s``: a
        killed client's last requests may still sit in the socket backlog or a handler thread, and
        must be recorded as the killed run's before :meth:`taken` splits the runs."""
        deadline, last, since = time.time() + timeout_s, -1, time.time()
        while time.time() < deadline:
            with self.lock:
                n, busy = len(self.requests), self.active
            if n != last or busy:
                last, since = n, time.time()
            elif time.time() - since >= quiet_s:
                return
            time.sleep(0.02)
        raise AssertionError("the teacher did not settle")

    def taken(self) -> list[str]:
        with self.lock:
            out, self.requests = self.requests, []
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def request_id(d: dict) -> str:
    """A request as the teacher sees it (the cache stores the same fields, and never the key)."""
    keep = {k: d.get(k) for k in ("messages", "max_tokens", "temperature", "top_p", "seed")}
    return json.dumps(keep, sort_keys=True)


GENERATE = """
import sys
from pathlib import Path
from edgedistill.distill.cache import ResponseCache
from edgedistill.distill.pipeline import build_dataset, teacher_gate
from edgedistill.distill.teacher import make_teacher
from edgedistill.spec import load_spec

# the first two steps of `edgedistill distill` (distill/pipeline.py run_distill), as it runs them
spec, out = load_spec(sys.argv[1]), Path(sys.argv[2])
cache = ResponseCache(out / "cache" / "teacher.sqlite")
teacher = make_teacher(spec.teacher, spec.base_dir, cache)
test = spec.load_test_set()
teacher_gate(spec, teacher, test, out, skip_gate=True)
build_dataset(spec, teacher, spec.load_seeds(), test, cache, out / "data")
print("sent", teacher.usage.requests_sent, "cached", teacher.usage.cache_hits)
"""


def generation_spec(tmp_path: Path, url: str) -> Path:
    tests = [("where is my card", "card_arrival"), ("the euro rate today", "exchange_rate"), ("new pin please", "change_pin")]
    (tmp_path / "test.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in tests))
    pool = [f"pool question {i} about my {w}" for i, w in enumerate(["card", "rate", "pin", "cat"] * 4)]
    (tmp_path / "pool.csv").write_text("text\n" + "".join(f"{p}\n" for p in pool))
    spec = {
        "name": "killed",
        "type": "classification",
        "instructions": "Classify the banking message.",
        "labels": list(WORDS.values()),
        "seeds": [{"input": f"seed {i} about my {w}", "output": WORDS[w]} for i, w in enumerate(list(WORDS) * 4)],
        "test_set": {"path": "test.csv", "input_field": "text", "output_field": "label"},
        "pool": {"path": "pool.csv", "input_field": "text", "output_field": None},
        "teacher": {"kind": "openai", "base_url": url, "model": "kw", "max_concurrency": 4, "max_retries": 0},
        "student": {"path": "unused"},
        "generation": {"num_inputs": 60, "per_request": 3, "label_max_tokens": 8},
    }
    p = tmp_path / "task.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def generate(spec: Path, out: Path, kill_after: int | None = None, teacher: RecordingTeacher | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", GENERATE, str(spec), str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    if kill_after is None:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        return stdout.decode()
    deadline = time.time() + 120
    while len(teacher.requests) < kill_after:
        assert proc.poll() is None, "finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    teacher.settle()  # what the killed run sent is the killed run's, however late the server reads it
    return None


def cached_requests(out: Path) -> set[str]:
    with ResponseCache(out / "cache" / "teacher.sqlite") as cache:
        rows = cache._conn.execute("SELECT request FROM responses").fetchall()
    return {request_id(json.loads(r[0])) for r in rows}


def test_generation_killed_with_sigkill_resumes_without_repeats_or_lost_rows(tmp_path):
    teacher = RecordingTeacher()
    try:
        spec = generation_spec(tmp_path, teacher.url)
        generate(spec, tmp_path / "reference")
        reference = teacher.taken()
        assert len(reference) == len(set(reference)) > 60

        killed = tmp_path / "killed"
        generate(spec, killed, kill_after=len(reference) // 3, teacher=teacher)
        first = teacher.taken()
        stored = cached_requests(killed)
        assert not (killed / "data" / "train.jsonl").exists() and 0 < len(stored) < len(reference)
        in_flight = set(first) - stored  # sent, but killed before the answer reached the cache

        report = generate(spec, killed)
        second = teacher.taken()
        assert not set(second) & stored  # nothing paid for and stored is asked again
        assert len(second) == len(set(second)) == len(reference) - len(stored)
        assert set(first) | set(second) == set(reference) and set(first) & set(second) == in_flight
        assert f"cached {len(stored)}" in report

        for name in ("raw.jsonl", "train.jsonl", "rejects.jsonl"):
            resumed = (killed / "data" / name).read_text().splitlines()
            assert resumed == (tmp_path / "reference" / "data" / name).read_text().splitlines(), name
        ids = [json.loads(x)["id"] for x in (killed / "data" / "raw.jsonl").read_text().splitlines()]
        assert len(ids) == len(set(ids)) > 60
        print(
            f"\nSIGKILL during generation: {len(reference)} requests in all, {len(first)} sent before the kill, "
            f"{len(stored)} stored, {len(in_flight)} in flight (re-sent), {len(second)} sent on resume; {len(ids)} rows identical"
        )
    finally:
        teacher.close()


# ---- training killed with SIGKILL ------------------------------------------------------------------

TRAIN_CONFIG = {"method": "full", "epochs": 6, "batch_size": 2, "learning_rate": 5e-3, "warmup_ratio": 0.0, "save_steps": 2}
TRAIN = f"""
import sys
from edgedistill.distill.train import train
from edgedistill.spec import TrainingConfig
from tests.test_train import examples
def log(entry):
    if "loss" in entry:
        print("step", entry["step"], flush=True)
train(sys.argv[1], sys.argv[2], examples(), TrainingConfig(**{TRAIN_CONFIG!r}), log=log)
"""


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_from_its_last_checkpoint(tiny_model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from edgedistill.distill.train import train
    from safetensors.torch import load_file

    from edgedistill.spec import TrainingConfig
    from tests.test_train import examples

    out = tmp_path / "student"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", TRAIN, str(tiny_model_dir), str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step") and int(line.split()[1]) >= 7:
                break  # checkpoints 2, 4, 6 are written (save_steps 2), the run is mid-way to step 12
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and max(checkpoints) >= 6 and not (out / "model.safetensors").exists()

    cfg = TrainingConfig(**TRAIN_CONFIG)
    steps: list[int] = []
    res = train(tiny_model_dir, out, examples(), cfg, log=lambda e: steps.append(e["step"]) if "loss" in e else None)
    assert res["resumed_from_step"] == max(checkpoints) and res["steps"] == 12
    assert steps == list(range(max(checkpoints) + 1, 13))  # continues where the checkpoint left off

    train(tiny_model_dir, tmp_path / "straight", examples(), cfg)
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    print(
        f"\nSIGKILL during training at step >= 7: resumed from checkpoint-{max(checkpoints)}, same weights as a run never killed"
    )


# ---- artifacts truncated or tampered with ------------------------------------------------------------


@pytest.fixture
def artifact(tmp_path) -> Path:
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    (tmp_path / "elsewhere.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    task = {"name": "intents", "type": "classification", "instructions": "Classify.", "labels": ["a", "b"]}
    write_manifest(folder, kind="artifact", format="gguf", stage="test", task=task, model_file="model.gguf")
    assert load_artifact(folder).model_path == folder / "model.gguf"
    return folder


def _edit_manifest(folder: Path, change) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    change(m)
    (folder / "manifest.json").write_text(json.dumps(m))


TAMPER = {
    "truncated": (
        lambda f: (f / "model.gguf").write_bytes((f / "model.gguf").read_bytes()[:2000]),
        "does not match its manifest hash",
    ),
    "one byte changed": (
        lambda f: (f / "model.gguf").write_bytes(
            (f / "model.gguf").read_bytes()[:100] + b"X" + (f / "model.gguf").read_bytes()[101:]
        ),
        "does not match its manifest hash",
    ),
    "file removed": (lambda f: (f / "model.gguf").unlink(), "missing"),
    "manifest hash edited": (
        lambda f: _edit_manifest(f, lambda m: m["files"].update({"model.gguf": "0" * 64})),
        "does not match",
    ),
    "manifest not JSON": (lambda f: (f / "manifest.json").write_text('{"files": {'), "not valid JSON"),
    "manifest a list": (lambda f: (f / "manifest.json").write_text("[]"), "not a JSON object"),
    "files not a mapping": (lambda f: _edit_manifest(f, lambda m: m.update(files=["model.gguf"])), "files must map"),
    "files escape the folder": (
        lambda f: _edit_manifest(f, lambda m: m["files"].update({"../elsewhere.gguf": "0" * 64})),
        "not a path inside",
    ),
    "absolute file name": (
        lambda f: _edit_manifest(f, lambda m: m["files"].update({"/etc/hostname": "0" * 64})),
        "not a path inside",
    ),
    "model_file escapes": (lambda f: _edit_manifest(f, lambda m: m.update(model_file="../elsewhere.gguf")), "not a path inside"),
    "model_file absolute": (
        lambda f: _edit_manifest(f, lambda m: m.update(model_file=str(f.parent / "elsewhere.gguf"))),
        "not a path inside",
    ),
}


@pytest.mark.parametrize("how", list(TAMPER))
def test_damaged_artifact_is_refused_with_a_clear_message(artifact, how):
    damage, words = TAMPER[how]
    damage(artifact)
    with pytest.raises(UserError) as e:
        load_artifact(artifact)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_damaged_artifact_is_refused_by_the_cli(artifact):
    (artifact / "model.gguf").write_bytes(b"GGUF")
    assert_one_line_error(run_cli("serve", str(artifact)), "model.gguf", "truncated or modified", "rebuild")
