"""The calibration split: a share of the validated, teacher-labelled rows held out of training
(spec ``calibration``), on which compress fits each artifact's confidence calibration and cascade
thresholds. Its answers are the teacher's, the reference the cascade is measured against; the test
set never enters it (validation already removed every row that overlaps it).

The rows come from the sources in ``prefer_sources`` (default: the pool, real inputs like the
traffic the cascade will see, where generated inputs are ones the student is less sure of) when
there are enough of them, else from every non-seed row. The selection is deterministic (seeded)
and, for classification, stratified by label: rows are ordered by (label, seeded random key) and
every k-th is taken, so each label keeps its share. Seeds (human-labelled) always stay in training.
"""

from __future__ import annotations

import random
from typing import Any

from edgedistill.manifest import compact_json
from edgedistill.spec import CalibrationConfig

CALIBRATION_FILE = "calibration.jsonl"


def calibration_size(cfg: CalibrationConfig, eligible: int) -> int:
    """Rows to hold out of ``eligible`` teacher-labelled ones: ``share`` of them, clipped to
    [min_rows, max_rows] and to half of them (training keeps the larger part); 0 when share is 0."""
    if cfg.share <= 0 or eligible < 2:
        return 0
    n = max(round(cfg.share * eligible), cfg.min_rows)
    return max(0, min(n, cfg.max_rows, eligible // 2))


def eligible_rows(cfg: CalibrationConfig, rows: list[dict[str, Any]]) -> tuple[list[int], int]:
    """(indices of the rows the split is drawn from, how many it takes). The size is always
    ``calibration_size`` of all non-seed rows; the rows of ``prefer_sources`` are drawn from when
    they can give at least ``min_rows`` of them (or that size, when smaller) with half of them kept
    for training, and then the split takes at most half of them."""
    eligible = [i for i, r in enumerate(rows) if r.get("source") != "seed"]
    n = calibration_size(cfg, len(eligible))
    preferred = [i for i in eligible if rows[i].get("source") in cfg.prefer_sources]
    n_preferred = min(n, len(preferred) // 2)
    if cfg.prefer_sources and n_preferred >= max(1, min(n, cfg.min_rows)):
        return preferred, n_preferred
    return eligible, n


def split_calibration(
    cfg: CalibrationConfig, rows: list[dict[str, Any]], stratify: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, calibration rows), both in the original order of ``rows``."""
    eligible, n = eligible_rows(cfg, rows)
    if n == 0:
        return list(rows), []
    rng = random.Random(cfg.seed)
    keys = {i: rng.random() for i in eligible}

    def order(i: int) -> tuple[str, float]:
        return (compact_json(rows[i]["output"]) if stratify else "", keys[i])

    ranked = sorted(eligible, key=order)
    stride = len(ranked) / n
    chosen = {ranked[int((k + 0.5) * stride)] for k in range(n)}
    return [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]


def calibration_record(row: dict[str, Any]) -> dict[str, Any]:
    """One line of ``calibration.jsonl``: the input and the teacher's label as the output."""
    return {"id": row.get("id"), "input": row["input"], "output": row["output"], "source": row.get("source")}
