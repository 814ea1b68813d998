"""Which threshold `edgedistill serve ARTIFACT` runs at: the manifest's recommended one by default,
``--target`` picks that target's, ``--threshold`` wins over both, 0.9 without a calibration; and
/v1/models says which and why. Fake numpy model, no torch."""

from __future__ import annotations

import pytest
from edgedistill.serve.app import create_app
from edgedistill.serve.artifact import load_artifact
from edgedistill.serve.cli import main
from edgedistill.serve.engine import Engine
from edgedistill.serve.settings import Settings, resolve_threshold, threshold_note
from fastapi.testclient import TestClient

from edgedistill.errors import UserError
from edgedistill.manifest import write_manifest
from tests.serve_fakes import FakeRunner, FakeTeacher

LABELS = ["card_arrival", "card_linking", "exchange_rate"]
CALIBRATION = {
    "method": "temperature_scaling",
    "temperature": 1.0,
    "split": "calibration",
    "thresholds": [
        {"target": 0.95, "threshold": 0.2, "fallback_rate": 0.05, "agreement": 0.95},
        {"target": 0.98, "threshold": 0.5, "fallback_rate": 0.1, "agreement": 0.98},
        {"target": 0.99, "threshold": 0.7, "fallback_rate": 0.2, "agreement": 0.99},
    ],
    "recommended": {"target": 0.99, "threshold": 0.7},
}


def artifact(tmp_path, calibration=None):
    folder = tmp_path / "art"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    task = {"name": "intents", "type": "classification", "instructions": "Classify.", "labels": LABELS}
    extra = {"calibration": calibration} if calibration is not None else {}
    write_manifest(folder, kind="artifact", format="gguf", stage="test", task=task, name="intents", model_file="model.gguf",
                   **extra)  # fmt: skip
    return folder


def test_resolution_order():
    assert resolve_threshold(None, None, CALIBRATION) == (0.7, "recommended (target 0.99)")
    assert resolve_threshold(None, 0.98, CALIBRATION) == (0.5, "target 0.98")
    assert resolve_threshold(0.3, 0.98, CALIBRATION) == (0.3, "threshold")  # --threshold wins over both
    assert resolve_threshold(None, None, {}) == (0.9, "default")  # an older manifest, a bare .gguf
    assert resolve_threshold(None, None, {"temperature": 1.3}) == (0.9, "default")
    with pytest.raises(UserError, match=r"target 0.97: .* thresholds for 0.95, 0.98, 0.99"):
        resolve_threshold(None, 0.97, CALIBRATION)
    with pytest.raises(UserError, match="no thresholds"):
        resolve_threshold(None, 0.99, {})
    assert Settings.load(artifact="a.gguf").threshold is None and Settings.load(artifact="a.gguf", target=0.99).target == 0.99


def serve(folder, script, **flags):
    s = Settings.load(artifact=str(folder), n_threads=1, **flags)
    return TestClient(create_app(s, engine=Engine(FakeRunner(script)), artifact=load_artifact(folder)))


@pytest.mark.parametrize(
    ("calibration", "flags", "threshold", "source"),
    [
        (CALIBRATION, {}, 0.7, "recommended (target 0.99)"),
        (CALIBRATION, {"target": 0.95}, 0.2, "target 0.95"),
        (CALIBRATION, {"target": 0.95, "threshold": 0.8}, 0.8, "threshold"),
        (None, {}, 0.9, "default"),  # a manifest without calibration still serves, at 0.9
    ],
)
def test_the_threshold_in_force_decides(tmp_path, calibration, flags, threshold, source):
    def script(prompt):
        return "card_arrival", 1.2  # one confidence, between the thresholds

    folder = artifact(tmp_path, calibration)
    with FakeTeacher(reply="card_linking") as teacher, serve(folder, script, teacher_url=teacher.url, teacher_model="big", **flags) as c:
        info = c.get("/v1/models").json()["data"][0]["edgedistill"]
        assert (info["threshold"], info["threshold_source"]) == (threshold, source)
        body = c.post("/v1/predict", json={"input": "where is my card"}).json()
    conf = body["confidence"]
    assert 0.2 < conf < 0.7 and body["edgedistill"]["threshold"] == threshold
    assert body["answered_by"] == ("teacher" if conf < threshold else "student")


def test_unknown_target_is_one_line_before_loading(tmp_path, capsys):
    folder = artifact(tmp_path, CALIBRATION)
    with pytest.raises(SystemExit) as e:
        main([str(folder), "--target", "0.9"])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and err.count("\n") == 0
    assert err.startswith("error: target 0.9:") and "0.95, 0.98, 0.99" in err and "Traceback" not in err


def test_a_recommended_threshold_whose_target_was_out_of_reach_is_said_at_start():
    unmet = {"n": 40, "recommended": {"target": 0.99, "threshold": 1.0, "met": False}}
    note = threshold_note("recommended (target 0.99)", unmet)
    assert note and "40 rows" in note and "0.99 target" in note and "--target 0.95" in note
    assert threshold_note("threshold", unmet) is None  # set by hand: the user chose it
    assert threshold_note("recommended (target 0.99)", CALIBRATION) is None  # met, or an older manifest without `met`
