"""Training rows from a traffic log (`edgedistill retrain`'s data step): hand-made log files in the
shared record format, a loopback teacher, the distill stage's cache and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgedistill.distill.cache import ResponseCache
from edgedistill.distill.pipeline import run_with_progress
from edgedistill.distill.teacher import make_teacher
from edgedistill.distill.traffic import describe_log, label_traffic, read_traffic, traffic_dataset

from edgedistill.errors import UserError
from edgedistill.manifest import write_manifest
from edgedistill.spec import load_spec
from tests.test_pipeline import WORDS, KeywordTeacher, make_spec


def record(inp, teacher=None, route="/v1/predict", **kw) -> dict:
    return {"time": "2026-12-02T08:00:00Z", "request_id": kw.pop("rid", "r"), "route": route, "input": inp, "student": "card_arrival",
            "confidence": 0.5, "threshold": 0.9, "answered_by": "teacher" if teacher is not None else "student", "teacher": teacher,
            "latency_ms": 3.0, "shadow": False, "model": "tiny", **kw}


def write_log(folder: Path, name: str, lines: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")


@pytest.fixture
def teacher():
    t = KeywordTeacher(WORDS)
    yield t
    t.close()


def test_log_parsing_counts_broken_lines_hash_only_records_and_repeats(tmp_path):
    log = tmp_path / "log"
    hashed = {k: v for k, v in record(None).items() if k != "input"} | {"input_sha256": "ab" * 32}
    write_log(log, "a.jsonl", [
        record("what rate for dollars"),
        '{"time": "2026-12-02T08:00:01Z", "request_id": "cut', # a line cut by a crash
        hashed,
        "[1, 2, 3]",  # JSON, but not a record
        record([{"role": "user", "content": "my pin is blocked"}], "change_pin", route="/v1/chat/completions"),
    ])
    write_log(log, "b.jsonl", [
        record("what rate for dollars", "exchange_rate", rid="again"),  # the same input, now with the teacher's answer
        record([{"role": "system", "content": "be nice"}, {"role": "user", "content": "x"}]),  # not a task input
        record([{"role": "user", "content": "card?"}, {"role": "assistant", "content": "card_arrival"}, {"role": "user", "content": "when"}]),
        "",
    ])
    (log / "notes.txt").write_text("not a log file")
    rows, c = read_traffic(log)
    assert c == {"lines": 8, "records": 6, "broken_lines": 2, "hash_only": 1, "bad_input": 1, "repeated": 1,
                 "files": 2, "inputs": 3, "with_teacher_answer": 2}
    # a one-user-message conversation is its text; a longer conversation stays one
    assert [r["input"] for r in rows][:2] == ["what rate for dollars", "my pin is blocked"] and isinstance(rows[2]["input"], list)
    assert rows[0]["teacher"] == "exchange_rate" and rows[0]["request_id"] == "again" and rows[0]["where"] == "b.jsonl:1"
    said = describe_log(c)
    assert "2 broken line(s) skipped" in said and "1 record(s) carry only input_sha256" in said and "cannot be trained on" in said


def test_a_missing_or_empty_log_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        read_traffic(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no \*\.jsonl"):
        read_traffic(tmp_path / "empty")


def test_teacher_answers_are_reused_and_the_rest_labelled_through_the_cache(tmp_path, teacher, tiny_model_dir):
    spec = load_spec(make_spec(tmp_path, teacher.url, tiny_model_dir))
    log = tmp_path / "log"
    write_log(log, "a.jsonl", [
        record("please track the card I ordered", "card_arrival"),  # /v1/predict: the parsed value
        record([{"role": "user", "content": "I need to reset my pin code"}], "change_pin", route="/v1/chat/completions"),  # chat: text
        record("what rate for dollars today"),
        record("how do I change the pin on my account"),
    ])
    records, _ = read_traffic(log)

    def label(cache_path: Path) -> list[dict]:
        with ResponseCache(cache_path) as cache:
            return label_traffic(spec, records, make_teacher(spec.teacher, spec.base_dir, cache), run_with_progress)

    rows = label(tmp_path / "cache.sqlite")
    assert [r["output"] for r in rows] == ["card_arrival", "change_pin", "exchange_rate", "change_pin"]
    assert [r["provenance"]["label"] for r in rows] == ["reused", "reused", "teacher", "teacher"]
    assert all(r["source"] == "traffic" for r in rows) and rows[2]["provenance"]["label_cache_key"]
    # the teacher was asked for exactly the two inputs without an answer, never for the reused ones
    assert sorted(teacher.asked) == ["how do I change the pin on my account", "what rate for dollars today"]
    # again: every label from the cache, nothing sent
    assert label(tmp_path / "cache.sqlite") == rows and len(teacher.asked) == 2


def test_validation_drops_contaminated_and_duplicate_traffic_rows(tmp_path, teacher, tiny_model_dir):
    spec = load_spec(make_spec(tmp_path, teacher.url, tiny_model_dir))
    old = tmp_path / "data"
    old.mkdir()
    old_rows = [{"id": f"seed-{i}", "input": f"seed {i} {w}", "output": WORDS[w], "raw_output": WORDS[w], "source": "seed"}
                for i, w in enumerate(["card", "rate", "pin"])]
    (old / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    write_manifest(old, kind="dataset", format="jsonl", stage="distill/data")
    log = tmp_path / "log"
    write_log(log, "a.jsonl", [
        record("where is my card"),  # a test input, word for word
        record("seed 1 rate", "exchange_rate"),  # already a training row
        record("the lost card I reported, any news", "card_arrival"),
        record("can you tell me about the weather"),  # the teacher gives no label: a parse reject
    ])
    with ResponseCache(tmp_path / "cache.sqlite") as cache:
        kept, report = traffic_dataset(spec, make_teacher(spec.teacher, spec.base_dir, cache), log, old, tmp_path / "new")
    t = report["traffic"]
    assert t["dropped"] == {"contaminated": 1, "exact_duplicate": 1, "parse": 1} and t["total"] == 4 and t["kept"] == 1
    assert t["reused_teacher_answers"] == 2 and t["newly_labelled"] == 2 and t["teacher_requests_sent"] == 2 and t["old_rows"] == 3
    assert [r["input"] for r in kept] == ["seed 0 card", "seed 1 rate", "seed 2 pin", "the lost card I reported, any news"]
    rejects = [json.loads(x) for x in (tmp_path / "new" / "rejects.jsonl").read_text().splitlines()]
    assert {r["input"]: r["reject_reason"] for r in rejects}["where is my card"] == "contaminated"
    assert (tmp_path / "new" / "manifest.json").exists() and len((tmp_path / "new" / "traffic.jsonl").read_text().splitlines()) == 4


def test_the_retrain_calibrates_on_the_old_split_and_held_out_traffic(tmp_path, teacher, tiny_model_dir):
    """The new artifact needs a calibration split (without one, serve falls back to 0.9 and has no
    drift reference): the run's old split, plus a share of the validated traffic rows, held out of
    training."""
    spec = load_spec(make_spec(tmp_path, teacher.url, tiny_model_dir))
    old = tmp_path / "data"
    old.mkdir()
    (old / "train.jsonl").write_text(json.dumps({"id": "seed-0", "input": "seed 0 card", "output": "card_arrival", "source": "seed"}) + "\n")
    old_cal = {"id": "pool-9", "input": "an old held-out pin question", "output": "change_pin", "source": "pool"}
    (old / "calibration.jsonl").write_text(json.dumps(old_cal) + "\n")
    write_manifest(old, kind="dataset", format="jsonl", stage="distill/data")
    texts = ["my parcel with the plastic never came", "what rate do you give for yen", "i forgot the four digits again",
             "how long until the courier brings it", "euro to dollar price today please", "set a fresh secret number for me"]
    labels = ["card_arrival", "exchange_rate", "change_pin"] * 2
    log = tmp_path / "log"
    write_log(log, "a.jsonl", [record(t, lab, rid=f"r{i}") for i, (t, lab) in enumerate(zip(texts, labels))])
    with ResponseCache(tmp_path / "cache.sqlite") as cache:
        kept, report = traffic_dataset(spec, make_teacher(spec.teacher, spec.base_dir, cache), log, old, tmp_path / "new")
    cal = [json.loads(x) for x in (tmp_path / "new" / "calibration.jsonl").read_text().splitlines()]
    train = [json.loads(x)["input"] for x in (tmp_path / "new" / "train.jsonl").read_text().splitlines()]
    held = [r for r in cal if r["source"] == "traffic"]
    assert cal[0] == old_cal and len(held) == 3 and report["calibration_rows"] == 4  # half of 6, the cap (min_rows > 6)
    assert not {r["input"] for r in held} & set(train) and len(train) == 1 + 6 - 3 == len(kept)
    assert all(r["output"] == dict(zip(texts, labels))[r["input"]] for r in held)  # the teacher's answers are the reference
