"""serve's pure parts: confidence and calibration, the circuit breaker, settings sources, artifacts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from edgedistill.serve.artifact import load_artifact
from edgedistill.serve.confidence import (
    LabelScorer,
    build_label_trie,
    calibrated,
    fit_temperature,
    generation_scores,
    temperature_for,
)
from edgedistill.serve.fallback import CircuitBreaker
from edgedistill.serve.settings import Settings

from edgedistill.errors import UserError
from edgedistill.manifest import sha256_file, write_manifest


def _logits(probs: dict[int, float], n: int = 10) -> tuple[np.ndarray, float]:
    x = np.full(n, -30.0, dtype=np.float32)
    for t, p in probs.items():
        x[t] = math.log(p)
    m = float(x.max())
    return x, m + math.log(float(np.exp(x - m).sum()))


def test_label_scorer_is_the_label_set_normalised_probability():
    # labels: [1, 2] and [1, 3] and [4]; EOG token 0
    trie = build_label_trie([(0, [1, 2]), (1, [1, 3]), (2, [4])])
    sc = LabelScorer(trie, frozenset({0}))
    for probs, tok in (({1: 0.6, 4: 0.2, 7: 0.2}, 1), ({2: 0.3, 3: 0.1, 8: 0.6}, 2), ({0: 0.9, 9: 0.1}, 0)):
        logits, lse = _logits(probs)
        sc.step(logits, lse, tok)
    # constrained: P([1]) = .6/.8, P(2 | 1) = .3/.4, end: 1  ->  0.5625; competitors sum to the rest
    assert calibrated(sc.scores(0)) == pytest.approx(0.75 * 0.75, rel=1e-4)
    assert sum(math.exp(v) for v in sc.scores(0)) == pytest.approx(1.0, rel=1e-4)


def test_label_scorer_other_casings_count_for_the_answer_and_off_trie_tokens_are_a_branch():
    # label 0 spelled [5] or [6] (two casings), label 1 spelled [7]
    trie = build_label_trie([(0, [5]), (0, [6]), (1, [7])])
    sc = LabelScorer(trie, frozenset({0}))
    for probs, tok in (({5: 0.5, 6: 0.3, 7: 0.2}, 5), ({0: 1.0}, 0)):
        sc.step(*_logits(probs), tok)
    assert calibrated(sc.scores(0)) == pytest.approx(0.8, rel=1e-4)
    off = LabelScorer(trie, frozenset({0}))
    off.step(*_logits({5: 0.2, 7: 0.2, 9: 0.6}), 9)  # a spelling not in the trie, parsed as label 0
    assert calibrated(off.scores(0)) == pytest.approx(0.6 + 0.2, rel=1e-4)


def test_generation_scores_use_a_low_quantile():
    probs = [0.99] * 20 + [0.2]
    assert calibrated(generation_scores(probs, 0.0)) == pytest.approx(0.2, rel=1e-6)
    assert calibrated(generation_scores(probs, 0.5)) == pytest.approx(0.99, rel=1e-6)
    assert calibrated(generation_scores([], 0.1)) == 0.0


def test_fit_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    true_p = rng.uniform(0.3, 0.99, 3000)
    correct = rng.uniform(size=true_p.size) < true_p
    # an over-confident model: reports sigmoid(2 * logit(p)), i.e. T = 2 undoes it
    logit = np.log(true_p / (1 - true_p)) * 2
    reported = 1 / (1 + np.exp(-logit))
    vectors = [[math.log(q), math.log1p(-q)] for q in reported]
    t = fit_temperature(vectors, list(correct))
    assert 1.7 < t < 2.3
    assert temperature_for({"temperature": t}, "generation") == t
    assert temperature_for({"classification": {"temperature": 3.0}, "temperature": 1.5}, "classification") == 3.0
    assert temperature_for(None, "generation") == 1.0


def test_circuit_breaker_opens_cools_down_and_half_opens():
    now = [0.0]
    b = CircuitBreaker(failures=2, cooldown_s=10, clock=lambda: now[0])
    assert b.allow()
    b.record(False)
    assert b.allow()
    b.record(False)
    assert not b.allow() and b.is_open
    now[0] = 11
    assert b.allow() and not b.allow()  # one trial call only
    b.record(True)
    assert b.allow() and not b.is_open


def test_settings_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("threshold: 0.3\nport: 9001\nn_slots: 2\n")
    monkeypatch.setenv("EDGEDISTILL_PORT", "9002")
    s = Settings.load(cfg, artifact="m.gguf", n_slots=None, threshold=0.7)
    assert (s.threshold, s.port, s.n_slots) == (0.7, 9002, 2)  # flag > env > file
    with pytest.raises(UserError, match="teacher_url"):
        Settings.load(artifact="m.gguf", teacher_url="http://x/v1")
    with pytest.raises(UserError, match="threshold"):
        Settings.load(artifact="m.gguf", threshold=2)
    cfg.write_text("thresold: 0.3\n")
    with pytest.raises(UserError):
        Settings.load(cfg, artifact="m.gguf")
    monkeypatch.delenv("EDGE_KEY_X", raising=False)
    with pytest.raises(UserError, match="EDGE_KEY_X"):
        Settings.load(artifact="m.gguf", api_key_env="EDGE_KEY_X").read_api_key()


def _fake_gguf(path):
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def test_load_artifact_gguf_file_and_folder(tmp_path):
    g = _fake_gguf(tmp_path / "tiny.gguf")
    a = load_artifact(g)
    assert (a.name, a.format, a.task) == ("tiny", "gguf", None)
    folder = tmp_path / "art"
    folder.mkdir()
    _fake_gguf(folder / "model.gguf")
    task = {"name": "intents", "type": "classification", "instructions": "Classify.", "labels": ["a", "b"], "seeds": "x.csv"}
    write_manifest(folder, kind="artifact", format="gguf", stage="compress", task=task, calibration={"temperature": 1.4})
    a = load_artifact(folder)
    assert a.model_path == folder / "model.gguf" and a.task.labels == ["a", "b"] and a.calibration == {"temperature": 1.4}
    (folder / "model.gguf").write_bytes(b"GGUF-tampered")
    with pytest.raises(UserError, match="does not match"):
        load_artifact(folder)


def test_load_artifact_refusals(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_artifact(tmp_path / "nope.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(UserError, match="not a GGUF"):
        load_artifact(tmp_path / "bad.gguf")
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"x")
    write_manifest(onnx, kind="artifact", format="onnx", stage="compress")
    with pytest.raises(UserError, match="does not list genai_config.json"):
        load_artifact(onnx)
    write_manifest(onnx, kind="artifact", format="tflite", stage="compress")
    with pytest.raises(UserError, match="vLLM"):
        load_artifact(onnx)
    art = tmp_path / "art"
    art.mkdir()
    _fake_gguf(art / "model.gguf")
    write_manifest(art, kind="artifact", format="gguf", stage="compress", model_file="other.gguf")
    _fake_gguf(art / "other.gguf")  # present, but not hashed by the manifest
    with pytest.raises(UserError, match="not one of the manifest's hashed files"):
        load_artifact(art)
    for bad_task in (["x"], {"name": "t", "type": "classification", "instructions": "i", "labels": "abc"}):
        write_manifest(art, kind="artifact", format="gguf", stage="compress", task=bad_task, files={"model.gguf": sha256_file(art / "model.gguf")})
        with pytest.raises(UserError, match="task"):
            load_artifact(art)


def test_fit_calibration_on_a_fake_student():
    from edgedistill.serve.calibrate import fit_calibration
    from fastapi.testclient import TestClient

    from tests.test_serve_api import classification_task, make_app

    # an over-confident student: peak 3 everywhere, right on "rate" inputs only
    def script(p):
        return ("exchange_rate", 3.0) if "rate" in p else ("card_arrival", 3.0)

    rows = [{"input": f"rate question {i}", "output": "exchange_rate"} for i in range(10)]
    rows += [{"input": f"card question {i}", "output": "card_linking" if i % 2 else "card_arrival"} for i in range(20)]
    app = make_app(script=script, task=classification_task())
    with TestClient(app):
        cal = fit_calibration(app.state.st, rows)
    assert cal["n"] == 30 and cal["accuracy"] == pytest.approx(20 / 30, abs=1e-3)
    assert cal["classification"]["temperature"] == cal["temperature"] > 0
    assert cal["ece_after"] <= cal["ece_before"] + 1e-9


def test_calibrate_artifact_builds_its_state_without_the_app(tmp_path, monkeypatch):
    """calibrate_artifact: the server state from settings (no HTTP app), the fit written to the
    manifest, the engine closed afterwards."""
    import json
    from pathlib import Path

    from edgedistill.serve import state as state_mod
    from edgedistill.serve.artifact import Artifact
    from edgedistill.serve.calibrate import calibrate_artifact
    from edgedistill.serve.engine import Engine

    from edgedistill.manifest import read_manifest
    from tests.serve_fakes import FakeRunner
    from tests.test_serve_api import classification_task

    def script(p):
        return ("exchange_rate", 3.0) if "rate" in p else ("card_arrival", 3.0)

    engines = []

    def make_engine(artifact, settings):
        engines.append(Engine(FakeRunner(script), max_queue=settings.max_queue))
        return engines[-1]

    art = tmp_path / "art"
    art.mkdir()
    write_manifest(art, kind="artifact", format="gguf", stage="compress")
    fake = Artifact(name="fake", format="gguf", model_path=Path("unused.gguf"), task=classification_task(), calibration={})
    monkeypatch.setattr(state_mod, "load_artifact", lambda path: fake)
    monkeypatch.setattr(state_mod, "_make_engine", make_engine)
    rows = [{"input": f"rate question {i}", "output": "exchange_rate"} for i in range(10)]
    rows += [{"input": f"card question {i}", "output": "card_linking" if i % 2 else "card_arrival"} for i in range(20)]
    data = tmp_path / "cal.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cal = calibrate_artifact(art, data, n_threads=1)
    assert cal["n"] == 30 and cal["accuracy"] == pytest.approx(20 / 30, abs=1e-3)
    assert read_manifest(art)["calibration"] == cal
    assert len(engines) == 1 and not engines[0]._thread.is_alive()


def test_bench_summary_takes_medians_and_ratios():
    from edgedistill.bench.serve_speed import summarize

    rows = [
        {"server": s, "concurrency": 4, "tokens_per_s": v, "p50_latency_s": lat}
        for s, v, lat in [("ours", 90, 1.0), ("ours", 110, 3.0), ("ours", 100, 2.0), ("llama-server", 100, 1.0), ("ours+grammar", 95, 2.5)]
    ]
    out = {r["server"]: r for r in summarize(rows)}
    assert (
        out["ours"]["tokens_per_s"] == 100 and out["ours"]["vs_llama_server"] == 1.0 and out["ours"]["rounds"] == [90, 110, 100]
    )
    assert out["ours"]["p50_latency_s"] == 2.0  # the median of the rounds' medians
    assert out["ours+grammar"]["vs_base"] == 0.95 and out["ours"]["vs_base"] is None  # the grammar's cost against ours


def test_serve_flags_come_from_the_settings_on_both_entry_points(monkeypatch):
    """`edgedistill serve` and `python -m edgedistill.serve.cli` take one flag per Settings field
    (and --config), with today's spellings; what they parse reaches serve_command as settings."""
    import typer
    from edgedistill.serve import cli as serve_cli_mod
    from typer.testing import CliRunner

    from edgedistill.cli import app as main_app

    seen = []
    monkeypatch.setattr(serve_cli_mod, "serve_command", lambda **kw: seen.append(kw))
    main_cmd = typer.main.get_command(main_app).commands["serve"]
    flags = {o for p in main_cmd.params for o in (*p.opts, *p.secondary_opts)}
    wanted = {"--" + n.replace("_", "-") for n in Settings.model_fields if n != "artifact"} | {"--config", "--no-confidence"}
    old = {"--teacher-url", "--teacher-model", "--teacher-api-key-env", "--threshold", "--host", "--port", "--api-key-env",
           "--n-threads", "--n-slots", "--ctx-per-slot", "--n-gpu-layers", "--max-queue", "--model-alias", "--log-level"}
    assert wanted | old <= flags
    args = ["art.gguf", "--max-queue", "3", "--no-confidence", "--log-level", "warning", "--threshold", "0.5"]
    r = CliRunner().invoke(main_app, ["serve", *args])
    assert r.exit_code == 0, r.output
    with pytest.raises(SystemExit) as ex:
        serve_cli_mod.main(args)
    assert ex.value.code == 0
    assert seen[0] == seen[1]
    got = {k: v for k, v in seen[0].items() if v is not None}
    assert got == {"artifact": "art.gguf", "max_queue": 3, "confidence": False, "log_level": "warning", "threshold": 0.5}
