"""Shadow checks (``serve --shadow-rate P``): the record of a shadowed request (``shadow: true``, the
teacher's answer, whether it agrees), a failing (HTTP 500, connection refused) or stuck shadow
teacher that never changes or delays a response, pending checks cancelled at shutdown with their
records written, and the live monitor's gauges (fallback rate, served agreement, drift) from a
scripted sequence, in-process and through a server's /metrics."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
from edgedistill.serve.metrics import Metrics
from edgedistill.serve.monitor import LiveMonitor, psi
from fastapi.testclient import TestClient

from edgedistill.intervals import proportion_ci
from tests.serve_fakes import FakeTeacher, LocalHTTPServer, free_port
from tests.test_traffic import _strip, chat, make_app, read_records

SURE = ["what is the rate today", "rate of the euro", "the rate for pounds"]  # the fake student: exchange_rate, p ~ 1
UNSURE = "where is my card"  # card_arrival at p ~ 0.07: below the threshold, the teacher answers


def gauge(c: TestClient, name: str, **labels: str) -> float:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in c.get("/metrics").text.splitlines():
        if line.split(" ")[0] == want:
            return float(line.split()[-1])
    raise AssertionError(f"{want} not in /metrics")


def wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, "timed out waiting for the shadow checks"
        time.sleep(0.02)


def sure_requests(c: TestClient) -> list:
    return [c.post("/v1/predict", json={"input": t}) for t in SURE] + [c.post("/v1/chat/completions", json=chat("rate, please"))]


class StuckTeacher(LocalHTTPServer):
    """A teacher that takes every call and answers only when released (or after 30 s)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                outer.calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                outer.release.wait(30)
                body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "exchange_rate"},
                                                "finish_reason": "stop"}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the server that asked has gone: nothing to answer
                    pass

        self.bind(Handler)

    def __exit__(self, *exc):
        self.release.set()
        super().__exit__(*exc)


def test_a_shadowed_request_is_logged_once_with_the_teachers_answer(tmp_path):
    with FakeTeacher(reply="card_linking") as teacher:
        app = make_app(traffic_log=str(tmp_path), teacher_url=teacher.url, teacher_model="big", threshold=0.6, shadow_rate=1.0)
        with TestClient(app) as c:
            responses = sure_requests(c) + [c.post("/v1/predict", json={"input": UNSURE})]
            wait_for(lambda: gauge(c, "edgedistill_shadow_checks_total") == 4)
    assert [r.status_code for r in responses] == [200] * 5
    assert [r.headers["x-answered-by"] for r in responses] == ["student"] * 4 + ["teacher"]
    recs = read_records(tmp_path)
    assert len(recs) == 5 and len({r["request_id"] for r in recs}) == 5  # one record per request, shadowed or not
    by_id = {r["request_id"]: r for r in recs}
    for r in responses[:3]:
        rec = by_id[r.headers["x-request-id"]]
        assert rec["shadow"] is True and rec["answered_by"] == "student" and rec["student"] == "exchange_rate"
        assert rec["teacher"] == "card_linking" and rec["shadow_agrees"] is False and rec["shadow_error"] is None
    chat_rec = by_id[responses[3].json()["id"]]
    assert chat_rec["shadow"] is True and chat_rec["teacher"] == "card_linking" and chat_rec["shadow_agrees"] is False
    fallback = by_id[responses[4].headers["x-request-id"]]
    assert fallback["shadow"] is False and fallback["answered_by"] == "teacher"  # a fallback is never shadowed: its answer is known
    assert len(teacher.calls) == 4 + 1  # the four shadow checks and the one fallback


@pytest.mark.parametrize("broken", ["http_500", "connection_refused"])
def test_a_failing_shadow_teacher_never_changes_a_response(tmp_path, broken):
    with FakeTeacher(reply="exchange_rate") as good, TestClient(make_app(teacher_url=good.url, teacher_model="big", threshold=0.6)) as c:
        expected = [_strip(r) for r in sure_requests(c)]
    with FakeTeacher(status=500) as bad:
        url = bad.url if broken == "http_500" else f"http://127.0.0.1:{free_port()}/v1"
        app = make_app(traffic_log=str(tmp_path), teacher_url=url, teacher_model="big", threshold=0.6, shadow_rate=1.0)
        with TestClient(app) as c:
            got = [_strip(r) for r in sure_requests(c)]
            wait_for(lambda: gauge(c, "edgedistill_shadow_requests_total", outcome="failed") == 4)
            assert gauge(c, "edgedistill_shadow_checks_total") == 0
            assert math.isnan(gauge(c, "edgedistill_shadow_agreement", bound="estimate"))  # no verdict yet: unknown, not 0
    assert got == expected
    recs = read_records(tmp_path)
    assert len(recs) == 4 and all(r["shadow"] and r["teacher"] is None and r["shadow_agrees"] is None for r in recs)
    assert all(r["shadow_error"].startswith("failed") for r in recs)


def test_a_stuck_shadow_teacher_never_delays_a_response_and_shutdown_cancels_its_checks(tmp_path):
    with FakeTeacher(reply="exchange_rate") as good, TestClient(make_app(teacher_url=good.url, teacher_model="big", threshold=0.6)) as c:
        expected = [_strip(r) for r in sure_requests(c)]
    with StuckTeacher() as stuck:
        app = make_app(traffic_log=str(tmp_path), teacher_url=stuck.base_url, teacher_model="big", threshold=0.6, shadow_rate=1.0)
        c = TestClient(app)
        with c:
            t0 = time.perf_counter()
            got = [_strip(r) for r in sure_requests(c)]
            requests_s = time.perf_counter() - t0  # a response that waited for its check would take the teacher's 30 s
            wait_for(lambda: len(stuck.calls) >= 1)  # the checks did reach the teacher, which holds them
            t0 = time.perf_counter()
        shutdown_s = time.perf_counter() - t0  # the lifespan's shutdown: the checks cancelled, not awaited
        assert not stuck.release.is_set()
    assert got == expected
    assert requests_s < 20 and shutdown_s < 20  # the teacher holds each call 30 s
    recs = read_records(tmp_path)
    assert len(recs) == 4  # every pending check still wrote its request's record
    assert all(r["shadow"] and r["teacher"] is None and r["shadow_error"] == "cancelled" for r in recs)
    assert app.state.st.metrics.registry.get_sample_value("edgedistill_shadow_requests_total", {"outcome": "cancelled"}) == 4


def test_the_server_publishes_fallback_rate_and_agreement_from_a_scripted_sequence():
    with FakeTeacher(reply="exchange_rate") as teacher:  # agrees with the student's sure answers
        app = make_app(teacher_url=teacher.url, teacher_model="big", threshold=0.6, shadow_rate=1.0)
        with TestClient(app) as c:
            for t in [SURE[0], UNSURE, SURE[1], UNSURE]:
                assert c.post("/v1/predict", json={"input": t}).status_code == 200
            wait_for(lambda: gauge(c, "edgedistill_shadow_checks_total") == 2)
            assert gauge(c, "edgedistill_fallback_rate") == 0.5
            assert gauge(c, "edgedistill_shadow_agreement", bound="estimate") == 1.0
            assert gauge(c, "edgedistill_shadow_agreement", bound="high") == 1.0
            lo = gauge(c, "edgedistill_shadow_agreement", bound="low")
            assert lo == pytest.approx((2 + 2 * proportion_ci(2, 2)[0]) / 4)


CALIBRATION = {"confidence_histogram": {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [10, 20, 30, 40]}}


def read(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels or None)


def test_live_monitor_gauges_follow_a_scripted_sequence(monkeypatch):
    from edgedistill.serve import monitor

    monkeypatch.setattr(monitor, "FALLBACK_WINDOW", 10)
    monkeypatch.setattr(monitor, "CONFIDENCE_WINDOW", 10)
    m = Metrics()
    mon = LiveMonitor(m, CALIBRATION)
    assert math.isnan(read(m, "edgedistill_fallback_rate")) and math.isnan(read(m, "edgedistill_confidence_drift"))
    # the calibration split's own distribution: 1, 2, 3, 4 answers in the four bins
    confidences = [0.1] + [0.3] * 2 + [0.6] * 3 + [0.9] * 4
    entries = []
    for i, conf in enumerate(confidences):  # the two least sure go to the teacher
        entries.append(mon.answered(sent_to_teacher=i < 2, by_teacher=i < 2, confidence=conf))
    assert read(m, "edgedistill_fallback_rate") == 0.2
    assert read(m, "edgedistill_confidence_drift") == 0.0  # the same shares as the reference: no drift
    assert math.isnan(read(m, "edgedistill_shadow_agreement", bound="estimate"))  # 8 student answers, none checked yet
    for e, agreed in zip(entries[2:6], [True, True, True, False]):  # 4 of the 8 shadow-checked, 3 agree
        mon.checked_shadow(e, agreed)
    mon.checked_shadow(entries[2], False)  # a second verdict on one answer is ignored
    lo, hi = proportion_ci(3, 4)
    assert read(m, "edgedistill_shadow_agreement", bound="estimate") == pytest.approx((2 + 8 * 3 / 4) / 10)
    assert read(m, "edgedistill_shadow_agreement", bound="low") == pytest.approx((2 + 8 * lo) / 10)
    assert read(m, "edgedistill_shadow_agreement", bound="high") == pytest.approx((2 + 8 * hi) / 10)
    # drift: ten confident answers with no fallback fill both windows (10 answers each)
    for _ in range(10):
        mon.answered(sent_to_teacher=False, by_teacher=False, confidence=0.99)
    assert read(m, "edgedistill_fallback_rate") == 0.0
    assert read(m, "edgedistill_confidence_drift") == pytest.approx(psi([10, 20, 30, 40], [0, 0, 0, 10]))
    assert read(m, "edgedistill_confidence_drift") > 0.25  # a large shift by the usual rule of thumb
