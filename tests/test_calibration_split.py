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
    cfg = CalibrationConfig()  # share 0.1, min 100, max 300
    assert calibration_size(cfg, 1300) == 130  # BANKING77's demo: a tenth
    assert calibration_size(cfg, 400) == 100  # at least min_rows (99 rows can show the recommended 99 % target)
    assert calibration_size(cfg, 150) == 75  # never more than half
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


def mixed(pool: int, synthetic: int, seeds: int = 10) -> list[dict]:
    """Rows as distill's pipeline labels them: seeds, then the pool's texts, then generated inputs."""
    out = [{"id": f"seed-{i}", "input": f"s{i}", "output": "a", "source": "seed"} for i in range(seeds)]
    out += [{"id": f"pool-{i}", "input": f"p{i}", "output": "ab"[i % 2], "source": "pool"} for i in range(pool)]
    out += [{"id": f"gen-{i}", "input": f"g{i}", "output": "ab"[i % 3 == 0], "source": "synthetic"} for i in range(synthetic)]
    return out


def test_prefer_sources_holds_out_pool_rows_like_traffic():
    """Default prefer_sources ["pool"]: the split is the size it always was (a tenth of the non-seed
    rows), drawn from the pool only, stratified and seeded; the generated rows all stay in training."""
    data = mixed(pool=1000, synthetic=300)
    cfg = CalibrationConfig()
    assert cfg.prefer_sources == ["pool"]
    train, calib = split_calibration(cfg, data, stratify=True)
    assert len(calib) == 130 and {r["source"] for r in calib} == {"pool"}
    assert Counter(r["output"] for r in calib) == {"a": 65, "b": 65}  # the pool's labels are half a, half b
    assert sum(r["source"] == "synthetic" for r in train) == 300 and len(train) == len(data) - 130
    assert split_calibration(cfg, data, stratify=True) == (train, calib)  # deterministic
    # [] (or no pool): every non-seed row is eligible, as before the option
    _, everyone = split_calibration(CalibrationConfig(prefer_sources=[]), data, stratify=True)
    assert len(everyone) == 130 and {r["source"] for r in everyone} == {"pool", "synthetic"}


def test_too_few_preferred_rows_fall_back_to_all_non_seed_rows():
    cfg = CalibrationConfig(min_rows=40)
    # 50 pool rows could give at most 25 (half stays in training): under min_rows 40, so all rows are drawn from
    _, calib = split_calibration(cfg, mixed(pool=50, synthetic=500), stratify=True)
    assert len(calib) == 55 and {r["source"] for r in calib} == {"pool", "synthetic"}
    # 90 pool rows give 45 >= min_rows: the split is those 45 (smaller than the 55 a mix would give, all real text)
    _, calib = split_calibration(cfg, mixed(pool=90, synthetic=500), stratify=True)
    assert len(calib) == 45 and {r["source"] for r in calib} == {"pool"}
    _, calib = split_calibration(cfg, mixed(pool=0, synthetic=500), stratify=False)
    assert len(calib) == 50 and {r["source"] for r in calib} == {"synthetic"}
    # the default (min_rows 100): 90 pool rows cannot give 100, so the split mixes in generated rows
    _, calib = split_calibration(CalibrationConfig(), mixed(pool=90, synthetic=500), stratify=True)
    assert len(calib) == 100 and {r["source"] for r in calib} == {"pool", "synthetic"}
    with pytest.raises(ValueError, match="seeds are never held out"):
        CalibrationConfig(prefer_sources=["seed"])
