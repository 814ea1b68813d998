"""The traffic log (``serve --traffic-log DIR``): the records and their fields, inputs off (a hash
only), rotation, a full queue, a broken log that never changes a response, and a server killed with
SIGKILL or SIGTERM under load that leaves whole lines only and every record it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from edgedistill.serve import traffic
from edgedistill.serve.app import create_app
from edgedistill.serve.artifact import Artifact
from edgedistill.serve.engine import Engine
from edgedistill.serve.metrics import Metrics
from edgedistill.serve.settings import Settings
from edgedistill.serve.traffic import TrafficLog, input_sha256
from fastapi.testclient import TestClient

from edgedistill.task import Task
from tests.serve_fakes import FakeRunner, FakeTeacher, free_port
from tests.traffic_server import LABELS, script

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fake-student"
INSTRUCTIONS = "Classify the banking query."
FIELDS = {"time", "request_id", "route", "student", "confidence", "threshold", "answered_by", "teacher", "latency_ms"}
FIELDS |= {"shadow", "model"}


def make_app(**overrides):
    s = Settings.load(artifact="unused.gguf", model_alias=MODEL, **{"n_threads": 1, **overrides})
    task = Task(name="intents", type="classification", instructions=INSTRUCTIONS, labels=LABELS)
    art = Artifact(name=MODEL, format="gguf", model_path=Path("unused.gguf"), task=task)
    return create_app(s, engine=Engine(FakeRunner(script), max_queue=s.max_queue), artifact=art)


def read_records(folder: Path) -> list[dict]:
    out = []
    for p in sorted(folder.glob("*.jsonl")):
        out += [json.loads(line) for line in p.read_text().splitlines()]
    return out


def chat(content: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": content}], **kw}


def send_all(c: TestClient) -> list[httpx.Response]:
    """One of each: /v1/predict sure (student) and unsure (teacher), chat, completions, a live stream."""
    return [
        c.post("/v1/predict", json={"input": "what is the rate today"}),
        c.post("/v1/predict", json={"input": "where is my card"}),
        c.post("/v1/chat/completions", json=chat("the rate for euros?")),
        c.post("/v1/completions", json={"model": MODEL, "prompt": "rate of the dollar", "max_tokens": 16}),
        c.post("/v1/chat/completions", json=chat("rate, streamed", stream=True), headers={"X-Edgedistill-Fallback": "off"}),
    ]


def slow_disk(monkeypatch, delay_s: float = 0.05) -> None:
    real = traffic._os_write
    monkeypatch.setattr(traffic, "_os_write", lambda fd, data: time.sleep(delay_s) or real(fd, data))


def test_records_have_the_fields_and_never_the_key(tmp_path, monkeypatch):
    slow_disk(monkeypatch)  # the records are still queued when the app shuts down: its lifespan drains them
    monkeypatch.setenv("TRAFFIC_TEST_KEY", "sk-secret-123")
    auth = {"Authorization": "Bearer sk-secret-123"}
    with FakeTeacher(reply="card_linking") as teacher:
        app = make_app(traffic_log=str(tmp_path), teacher_url=teacher.url, teacher_model="big", threshold=0.6, api_key_env="TRAFFIC_TEST_KEY")
        with TestClient(app, headers=auth) as c:
            responses = send_all(c)
    assert [r.status_code for r in responses] == [200] * 5
    recs = read_records(tmp_path)
    assert len(recs) == 5 and all(FIELDS | {"input"} <= set(r) for r in recs)
    assert "sk-secret-123" not in "".join(p.read_text() for p in tmp_path.glob("*.jsonl"))
    by_id = {r["request_id"]: r for r in recs}
    sure, unsure = (by_id[r.headers["x-request-id"]] for r in responses[:2])
    assert sure["route"] == "/v1/predict" and sure["input"] == "what is the rate today" and sure["student"] == "exchange_rate"
    assert sure["answered_by"] == "student" and sure["teacher"] is None and sure["shadow"] is False
    assert sure["threshold"] == 0.6 and sure["confidence"] > 0.6 and sure["model"] == MODEL
    assert unsure["answered_by"] == "teacher" and unsure["teacher"] == "card_linking" and unsure["student"] == "card_arrival"
    assert unsure["confidence"] < 0.6 and unsure["latency_ms"] >= 0
    chat_rec = by_id[responses[2].json()["id"]]
    assert chat_rec["route"] == "/v1/chat/completions" and chat_rec["student"] == "exchange_rate"
    assert chat_rec["input"] == [{"role": "user", "content": "the rate for euros?"}]  # without the task's system prompt
    comp = next(r for r in recs if r["route"] == "/v1/completions")
    assert comp["request_id"] == responses[3].json()["id"] and comp["input"] == "rate of the dollar"
    streamed = [r for r in recs if r["route"] == "/v1/chat/completions" and r is not chat_rec]
    assert len(streamed) == 1 and streamed[0]["student"] == "exchange_rate" and streamed[0]["answered_by"] == "student"
    assert all(r["time"].endswith("Z") and r["time"][:4].isdigit() for r in recs)


def test_inputs_off_logs_only_the_hash(tmp_path):
    with TestClient(make_app(traffic_log=str(tmp_path), traffic_log_inputs="off")) as c:
        send_all(c)
    recs = read_records(tmp_path)
    assert len(recs) == 5 and all("input" not in r and len(r["input_sha256"]) == 64 for r in recs)
    assert input_sha256("what is the rate today") in {r["input_sha256"] for r in recs}
    assert input_sha256([{"role": "user", "content": "the rate for euros?"}]) in {r["input_sha256"] for r in recs}
    text = "".join(p.read_text() for p in tmp_path.glob("*.jsonl"))
    assert "rate today" not in text and "euros" not in text and "dollar" not in text


def test_bad_traffic_log_inputs_value_is_a_one_line_error():
    from edgedistill.errors import UserError

    with pytest.raises(UserError, match="traffic_log_inputs"):
        Settings.load(artifact="x.gguf", traffic_log_inputs="maybe")


def test_rotation_by_size_keeps_every_record_in_order_and_a_restart_appends(tmp_path):
    log = TrafficLog(tmp_path, Metrics(), max_bytes=2000)
    for i in range(100):
        log.submit({"request_id": f"r{i}", "pad": "x" * 40})
    log.close()
    files = sorted(tmp_path.glob("*.jsonl"))
    assert [p.name for p in files[:2]] == ["traffic-000001.jsonl", "traffic-000002.jsonl"] and len(files) >= 3
    assert all(p.stat().st_size <= 2000 for p in files)
    assert [r["request_id"] for r in read_records(tmp_path)] == [f"r{i}" for i in range(100)]
    again = TrafficLog(tmp_path, Metrics(), max_bytes=2000)  # a restarted server appends after them
    again.submit({"request_id": "after-restart"})
    again.close()
    assert [r["request_id"] for r in read_records(tmp_path)] == [f"r{i}" for i in range(100)] + ["after-restart"]


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path, monkeypatch):
    gate = threading.Event()
    real = traffic._os_write
    monkeypatch.setattr(traffic, "QUEUE_SIZE", 3)
    monkeypatch.setattr(traffic, "_os_write", lambda fd, data: gate.wait() and real(fd, data))
    m = Metrics()
    log = TrafficLog(tmp_path, m)
    t0 = time.perf_counter()
    for i in range(20):
        log.submit({"request_id": i})
    assert time.perf_counter() - t0 < 1.0  # never waited for the stuck writer
    gate.set()
    log.close()
    written = len(read_records(tmp_path))
    dropped = m.registry.get_sample_value("edgedistill_traffic_log_dropped_total")
    assert written + dropped == 20 and dropped >= 20 - 3 - 1


def _short_write(fd, data):
    os.write(fd, data[: len(data) // 2])  # a disk that fills up half-way through the line
    return len(data) // 2


def _raise(fd, data):
    raise OSError(28, "No space left on device")


def _strip(r: httpx.Response):
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("id", "created")}
    else:  # a stream: ids and times differ from run to run
        body = [json.loads(ln[6:]) for ln in body.split("\n\n") if ln.startswith("data: {")]
        body = [{k: v for k, v in ch.items() if k not in ("id", "created")} for ch in body]
    return r.status_code, r.headers.get("x-answered-by"), body


@pytest.mark.parametrize("broken", ["not_a_directory", "disk_full", "short_write"])
def test_a_broken_log_never_changes_a_response(tmp_path, monkeypatch, broken):
    with TestClient(make_app(threshold=0.6)) as c:
        expected = [_strip(r) for r in send_all(c)]
    folder = tmp_path / "log"
    if broken == "not_a_directory":
        folder.write_text("a file where the folder should be")
    else:
        monkeypatch.setattr(traffic, "_os_write", _raise if broken == "disk_full" else _short_write)
    with TestClient(make_app(threshold=0.6, traffic_log=str(folder))) as c:
        got = [_strip(r) for r in send_all(c)]
        errors = None
        for _ in range(100):  # the writer thread counts its failures soon after
            metrics = c.get("/metrics").text
            errors = next(float(ln.split()[-1]) for ln in metrics.splitlines() if ln.startswith("edgedistill_traffic_log_errors_total"))
            if errors >= 5:
                break
            time.sleep(0.02)
    assert got == expected
    assert errors == 5
    if broken == "short_write":  # the half line was taken back: the file holds no partial record
        assert all(p.read_text() == "" for p in folder.glob("*.jsonl"))


# ---- a server process killed under load --------------------------------------------------------


class Load:
    """Threads sending /v1/predict and chat requests until stopped; what was answered, by id.
    ``pause_s`` between a thread's requests bounds the request rate whatever the machine's speed."""

    def __init__(self, base: str, n: int = 4, pause_s: float = 0.0):
        self.base, self.stop, self.pause_s = base, threading.Event(), pause_s
        self.answered: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as c:
            k = 0
            while not self.stop.is_set():
                k += 1
                try:
                    if k % 2:
                        r = c.post("/v1/predict", json={"input": f"rate {i} {k}"})
                        rid = r.headers.get("x-request-id")
                    else:
                        r = c.post("/v1/chat/completions", json=chat(f"card {i} {k}"))
                        rid = r.json().get("id") if r.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    continue
                if r.status_code == 200 and rid:
                    self.answered.append(rid)
                if self.pause_s:
                    self.stop.wait(self.pause_s)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def start_server(folder: Path, write_delay_s: float = 0.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tests.traffic_server", str(port), f"traffic_log={folder}", "threshold=0.6"]
    env = {**os.environ, "EDGEDISTILL_CONFIG": "", "TRAFFIC_TEST_WRITE_DELAY_S": str(write_delay_s)}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180  # a busy shared machine starts it slowly
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()}")
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready")


def log_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.jsonl")))


def wait_for_records(folder: Path, n: int, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while log_bytes(folder).count(b"\n") < n:
        assert time.time() < deadline, "the server logged too few records"
        time.sleep(0.05)


def whole_lines(data: bytes) -> list[dict]:
    assert data == b"" or data.endswith(b"\n"), "a partial record at the end of the log"
    return [json.loads(line) for line in data.decode().splitlines()]


def test_sigkill_under_load_leaves_whole_lines_and_every_written_record(tmp_path):
    proc, base = start_server(tmp_path)
    try:
        with Load(base):
            wait_for_records(tmp_path, 30)
            before = log_bytes(tmp_path)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    after = log_bytes(tmp_path)
    written = before[: before.rfind(b"\n") + 1]  # what had reached the file before the kill
    assert after.startswith(written)  # nothing written was lost
    recs = whole_lines(after)
    assert len(recs) >= 30 and all(FIELDS <= set(r) for r in recs)


def test_sigterm_under_load_drains_the_log_and_keeps_every_answered_request(tmp_path):
    # A slow disk (20 records/s) behind at most 60 requests/s: records are still queued at SIGTERM,
    # and the backlog (a few seconds' writing) does not grow with the machine's speed.
    proc, base = start_server(tmp_path, write_delay_s=0.05)
    try:
        with Load(base, n=6, pause_s=0.1) as load:
            wait_for_records(tmp_path, 20)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"Traceback" not in proc.stderr.read()
    recs = whole_lines(log_bytes(tmp_path))
    logged = [r["request_id"] for r in recs]
    assert len(logged) == len(set(logged))  # one record per request
    missing = set(load.answered) - set(logged)
    assert not missing, f"{len(missing)} answered requests have no record (of {len(load.answered)})"
    assert len(load.answered) >= 20
