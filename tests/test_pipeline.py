"""`edgedistill distill` end to end on a tiny student, taught by a real OpenAI-compatible HTTP
server on loopback (a keyword classifier that also writes new inputs)."""

from __future__ import annotations

import json
import math
import re
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml
from edgedistill.distill.pipeline import run_distill

from edgedistill.errors import GateFailed
from tests.serve_fakes import send_json, start_http, stop_http

WORDS = {"card": "card_arrival", "rate": "exchange_rate", "pin": "change_pin"}
TEST = [("where is my card", "card_arrival"), ("the euro rate today", "exchange_rate"), ("new pin please", "change_pin")] * 3


class KeywordTeacher:
    def __init__(self, accuracy_words: dict[str, str]):
        self.words = accuracy_words
        self.hits = 0
        self.asked: list[str] = []  # the last user message of every request received
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.hits += 1
                system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
                fake.asked.append(user)
                if system.startswith("You write realistic"):
                    n = int(re.search(r"Write (\d+) new", user).group(1))
                    i = fake.hits
                    text = "\n".join(f"{i}. question {i}-{j} about my {w} number {i * 7 + j}" for j, w in enumerate(list(fake.words)[:n]))
                else:
                    text = next((lab for w, lab in fake.words.items() if w in user.lower()), "no idea")
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if body.get("logprobs"):  # one token for the answer; the runner-up label gets 0.2
                    other = next(lab for lab in fake.words.values() if lab != text)
                    top = [{"token": text, "logprob": math.log(0.8)}, {"token": other, "logprob": math.log(0.2)}]
                    choice["logprobs"] = {"content": [{"token": text, "logprob": math.log(0.8), "top_logprobs": top[: body["top_logprobs"]]}]}
                reply = {"choices": [choice], "usage": {"prompt_tokens": 20, "completion_tokens": 5}}
                data = json.dumps(reply).encode()
                send_json(self, data)

        self.server, self.url = start_http(H)

    def close(self):
        stop_http(self.server)


def make_spec(tmp_path: Path, url: str, student: Path, min_score: float = 0.9) -> Path:
    (tmp_path / "test.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in TEST))
    (tmp_path / "pool.csv").write_text("text\n" + "".join(f"pool question {i} about my {w}\n" for i, w in enumerate(["card", "rate", "pin", "cat"] * 3)))
    spec = {
        "name": "tiny",
        "type": "classification",
        "instructions": "Classify the banking message.",
        "labels": ["card_arrival", "exchange_rate", "change_pin"],
        "seeds": [{"input": f"seed {i} {w}", "output": WORDS[w]} for i, w in enumerate(["card", "rate", "pin"] * 4)],
        "test_set": {"path": "test.csv", "input_field": "text", "output_field": "label"},
        "pool": {"path": "pool.csv", "input_field": "text", "output_field": None},
        "teacher": {"kind": "openai", "base_url": url, "model": "kw", "prices": {"input_per_1m": 1.0, "output_per_1m": 2.0}, "gate": {"min_score": min_score}},
        "student": {"path": str(student)},
        "generation": {"num_inputs": 6, "per_request": 3, "label_max_tokens": 8},
        "training": {"method": "full", "epochs": 1, "batch_size": 4, "max_length": 64, "learning_rate": 1e-3},
    }
    p = tmp_path / "task.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


@pytest.fixture
def teacher():
    t = KeywordTeacher(WORDS)
    yield t
    t.close()


def test_distill_end_to_end_and_resume(tmp_path, teacher, tiny_model_dir):
    out = tmp_path / "run"
    summary = run_distill(make_spec(tmp_path, teacher.url, tiny_model_dir), out)
    assert summary["gate"]["passed"] and summary["gate"]["score"] == 1.0

    rows = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    report = json.loads((out / "data" / "report.json").read_text())
    assert report["kept"] + sum(report["rejected"].values()) == report["total"]
    # the calibration split: teacher-labelled rows held out of training, none of the test set
    calib = [json.loads(x) for x in (out / "data" / "calibration.jsonl").read_text().splitlines()]
    assert report["train_rows"] == len(rows) and report["calibration_rows"] == len(calib) > 0
    assert report["kept"] == len(rows) + len(calib)
    assert not {c["id"] for c in calib} & {r["id"] for r in rows} and {c["source"] for c in calib} <= {"pool", "synthetic"}
    assert not {json.dumps(c["input"]) for c in calib} & {json.dumps(r["input"]) for r in rows}
    assert not {c["input"] for c in calib} & {t for t, _ in TEST}
    assert all(c["output"] == next((lab for w, lab in WORDS.items() if w in c["input"].lower()), None) for c in calib)  # the teacher's
    data_manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert data_manifest["calibration"]["rows"] == len(calib) and data_manifest["files"]["calibration.jsonl"]
    from edgedistill.manifest import sha256_file

    assert data_manifest["calibration"]["sha256"] == sha256_file(out / "data" / "calibration.jsonl")
    assert report["rejected"]["parse"] >= 3  # the pool's "cat" questions get no valid label
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    assert synthetic and all(r["provenance"]["label_cache_key"] and r["provenance"]["strategy"] for r in synthetic)
    assert {r["source"] for r in rows} == {"seed", "pool", "synthetic"}

    manifest = json.loads((out / "student" / "manifest.json").read_text())
    assert manifest["task"]["name"] == "tiny" and manifest["data_hash"]
    assert "kw" in (out / "student" / "README.md").read_text()
    results = json.loads((out / "eval" / "eval.json").read_text())["results"]
    assert set(results) == {"teacher", "student", "undistilled student"}
    assert results["teacher"]["accuracy"] == 1.0
    assert 0.0 <= results["student"]["agreement_with_teacher"] <= 1.0
    # every number carries its sample size and 95 % interval; the students a paired test vs the teacher
    n = json.loads((out / "eval" / "eval.json").read_text())["test_rows"]
    for r in results.values():
        assert r["n"] == n and isinstance(r["accuracy"], float)
        assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] and len(r["macro_f1_ci"]) == 2
    for name in ("student", "undistilled student"):
        vs = results[name]["vs_teacher"]
        assert vs["metric"] == "accuracy" and vs["test"] == "mcnemar_exact" and vs["n"] == n
        assert vs["diff"] == pytest.approx(results[name]["accuracy"] - 1.0, abs=1e-4) and 0 < vs["p_value"] <= 1
        lo, hi = results[name]["agreement_with_teacher_ci"]
        assert lo <= results[name]["agreement_with_teacher"] <= hi
    eval_md = (out / "eval" / "eval.md").read_text()
    assert "accuracy vs teacher" in eval_md and "95 % intervals" in eval_md and "mcnemar exact" in eval_md
    assert summary["gate"]["n"] == summary["gate"]["scores"]["n"] and summary["gate"]["score_ci"][1] == 1.0
    assert summary["teacher_usage"]["cost_usd"] > 0
    # the students are scored decoding under the label constraint, as served: every answer a label;
    # the API teacher of a classification task is prompted (an API has no label constraint)
    for name in ("student", "undistilled student"):
        assert results[name]["decoded_as"] == "constraint" and results[name]["invalid_answers"] == 0
    assert results["teacher"]["decoded_as"] == "prompt" and summary["gate"]["decoded_as"] == "prompt"

    # a second run pays for nothing and reuses the trained student
    hits = teacher.hits
    again = run_distill(make_spec(tmp_path, teacher.url, tiny_model_dir), out)
    assert teacher.hits == hits
    assert again["teacher_usage"]["requests_sent"] == 0 and again["teacher_usage"]["cost_usd"] == 0
    assert (out / "data" / "train.jsonl").read_text().splitlines() == [json.dumps(r, ensure_ascii=False) for r in rows]
    assert [json.loads(x) for x in (out / "data" / "calibration.jsonl").read_text().splitlines()] == calib  # seeded: the same split

    # a retrain into the same student folder (a changed training setting): the new model card's
    # hash is in the manifest, so the next stage accepts the student
    from edgedistill.manifest import read_manifest

    spec_path = make_spec(tmp_path, teacher.url, tiny_model_dir)
    raw = yaml.safe_load(spec_path.read_text())
    raw["training"]["epochs"] = 2
    spec_path.write_text(yaml.safe_dump(raw))
    run_distill(spec_path, out)
    assert read_manifest(out / "student", verify=True)["files"]["README.md"]


def test_soft_labels_from_the_api_teachers_logprobs_reach_the_student(tmp_path, teacher, tiny_model_dir):
    spec = make_spec(tmp_path, teacher.url, tiny_model_dir)
    raw = yaml.safe_load(spec.read_text())
    raw["training"]["logit_kd"] = {"enabled": True, "source": "api_logprobs", "top_logprobs": 5, "temperature": 2.0, "alpha": 0.5}
    spec.write_text(yaml.safe_dump(raw))
    summary = run_distill(spec, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()]
    labelled = [r for r in rows if r["source"] != "seed"]
    assert labelled and all(math.isclose(sum(r["soft_labels"].values()), 1.0) for r in labelled)
    assert all(r["soft_labels"][r["output"]] == pytest.approx(0.8) for r in labelled)
    assert not any("soft_labels" in r for r in rows if r["source"] == "seed")  # gold seeds: the hard label only
    assert summary["train"]["soft_label_rows"] == len(labelled) and summary["train"]["label_kd"]


def test_gate_stops_a_weak_teacher(tmp_path, tiny_model_dir):
    weak = KeywordTeacher({"card": "card_arrival"})  # knows one intent of three
    try:
        with pytest.raises(GateFailed, match=r"accuracy 0.333 .* --skip-gate"):
            run_distill(make_spec(tmp_path, weak.url, tiny_model_dir), tmp_path / "run")
        assert not (tmp_path / "run" / "data").exists()  # nothing generated before the gate passed
        gate = json.loads((tmp_path / "run" / "gate.json").read_text())
        assert gate["passed"] is False
    finally:
        weak.close()


def test_local_teacher_layer_init_and_logit_kd(tmp_path, tiny_model_dir):
    """A local teacher, a student built from 2 of its 4 layers, trained with logit distillation."""
    spec_path = make_spec(tmp_path, "http://unused", tiny_model_dir, min_score=0.0)
    raw = yaml.safe_load(spec_path.read_text())
    raw["teacher"] = {"kind": "local", "path": str(tiny_model_dir), "gate": {"min_score": 0.0}, "batch_size": 8}
    raw["student"] = {"path": str(tiny_model_dir), "init_from_teacher_layers": [0, 3]}
    raw["training"]["logit_kd"] = {"enabled": True, "temperature": 2.0, "alpha": 0.5}
    spec_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    summary = run_distill(spec_path, out)
    assert summary["train"]["kd"] and summary["train"]["steps"] > 0  # the KD term was computed
    results = summary["eval"]
    assert summary["gate"]["decoded_as"] == results["teacher"]["decoded_as"] == "constraint"  # a local teacher answers in shape
    assert all(r["invalid_answers"] == 0 for r in results.values())
    assert results["student"]["params"] < results["undistilled student"]["params"] + 1
    assert results["teacher"]["params"] > results["student"]["params"]  # 4 layers vs 2
    manifest = json.loads((out / "student" / "manifest.json").read_text())
    assert manifest["settings"]["student"]["init_from_teacher_layers"] == [0, 3]


class JsonTeacher(KeywordTeacher):
    """An extraction teacher on loopback: answers each test input with the JSON ``answers`` maps it to."""

    def __init__(self, answers: dict[str, dict]):
        super().__init__({})
        self.answers = answers
        handler = self.server.RequestHandlerClass
        fake = self

        def do_POST(h):
            body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
            text = json.dumps(fake.answers[body["messages"][-1]["content"]])
            data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 20, "completion_tokens": 5}}).encode()
            send_json(h, data)

        handler.do_POST = do_POST


@pytest.mark.parametrize("metric, passed", [(None, True), ("exact_match", False)])
def test_an_extraction_teacher_is_gated_on_slot_f1_or_the_specs_metric(tmp_path, tiny_model_dir, metric, passed):
    from edgedistill.distill.cache import ResponseCache
    from edgedistill.distill.pipeline import teacher_gate
    from edgedistill.distill.teacher import make_teacher

    from edgedistill.spec import load_spec

    gold = {"a table for 2 at 7pm": {"people": 2, "time": "7pm"}, "4 of us at noon": {"people": 4, "time": "noon"},
            "what is on the menu": {}, "opening hours?": {}}
    said = {"a table for 2 at 7pm": {"people": 2, "time": "7pm"}, "4 of us at noon": {"people": 4, "time": "1pm"},
            "what is on the menu": {}, "opening hours?": {"people": 1}}  # one wrong slot, one invented field
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"input": k, "output": v}) + "\n" for k, v in gold.items()))
    teacher = JsonTeacher(said)
    raw = {
        "name": "slots", "type": "extraction", "instructions": "Extract the booking.",
        "output_schema": {"type": "object", "properties": {"people": {"type": "integer"}, "time": {"type": "string"}}},
        "seeds": [{"input": f"seed {i}", "output": {"people": i}} for i in range(10)],
        "test_set": {"path": "test.jsonl"},
        "teacher": {"kind": "openai", "base_url": teacher.url, "model": "json", "gate": {"min_score": 0.6}},
        "student": {"path": str(tiny_model_dir)},
    }  # fmt: skip
    if metric:
        raw["metric"] = metric
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(raw))
    try:
        spec = load_spec(tmp_path / "task.yaml")
        model = make_teacher(spec.teacher, spec.base_dir, ResponseCache(tmp_path / "cache.sqlite"))
        gate = teacher_gate(spec, model, spec.load_test_set(), tmp_path, skip_gate=True)
    finally:
        teacher.close()
    # slot F1: 3 of 4 gold slots right, 5 predicted -> 6/9; exact match: 2 of 4 rows (the empty one counts)
    assert gate["metric"] == (metric or "slot_f1") and gate["passed"] is passed
    assert gate["scores"]["slot_f1"] == pytest.approx(6 / 9) and gate["scores"]["exact_match"] == 0.5
