"""distill's calibration split: its size rule, label stratification, seeding, and seeds kept in training."""

from __future__ import annotations

from collections import Counter

import pytest
from edgedistill.distill.calibration_split import calibration_size, split_calibration

from edgedistill.spec import CalibrationConfig


def rows(counts: dict[str, int], seeds: int = 0) -> list[dict]:
    out = [{"id": f"seed-{i}", "input": f"s{i}", "output": "a", "source": "seed"} for i in range(seeds)]
    for label, n in counts.items():
        out += [{"id": f"{label}-{i}", "input": f"{label} {i}", "output": label, "source": "pool"} for i in range(n)]
    return out


def test_size_rule():
    cfg = CalibrationConfig()  # share 0.1, min 40, max 300
    assert calibration_size(cfg, 1300) == 130  # BANKING77's demo: a tenth
    assert calibration_size(cfg, 200) == 40  # at least min_rows
    assert calibration_size(cfg, 50) == 25  # never more than half
    assert calibration_size(cfg, 10_000) == 300  # at most max_rows
    assert calibration_size(CalibrationConfig(share=0), 1000) == 0
    with pytest.raises(ValueError, match="min_rows"):
        CalibrationConfig(min_rows=50, max_rows=10)


def test_stratified_seeded_and_seeds_stay_in_training():
    data = rows({"a": 300, "b": 150, "c": 50}, seeds=20)
    cfg = CalibrationConfig(share=0.2, min_rows=0)
    train, calib = split_calibration(cfg, data, stratify=True)
    assert len(calib) == 100 and len(train) == len(data) - 100
    assert not {r["id"] for r in train} & {r["id"] for r in calib}
    assert all(r["source"] != "seed" for r in calib)
    assert Counter(r["output"] for r in calib) == {"a": 60, "b": 30, "c": 10}  # each label keeps its share
    assert split_calibration(cfg, data, stratify=True) == (train, calib)  # deterministic
    other = split_calibration(CalibrationConfig(share=0.2, min_rows=0, seed=1), data, stratify=True)[1]
    assert {r["id"] for r in other} != {r["id"] for r in calib}
    assert [r["id"] for r in train] == [r["id"] for r in data if r["id"] not in {c["id"] for c in calib}]  # original order
