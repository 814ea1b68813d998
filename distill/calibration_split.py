"""The calibration split: a share of the validated, teacher-labelled rows held out of training
(spec ``calibration``), on which compress fits each artifact's confidence calibration and cascade
thresholds. Its answers are the teacher's, the reference the cascade is measured against; the test
set never enters it (validation already removed every row that overlaps it).

The selection is deterministic (seeded) and, for classification, stratified by label: rows are
ordered by (label, seeded random key) and every k-th is taken, so each label keeps its share.
Seeds (human-labelled) always stay in training.
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


def split_calibration(
    cfg: CalibrationConfig, rows: list[dict[str, Any]], stratify: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, calibration rows), both in the original order of ``rows``."""
    eligible = [i for i, r in enumerate(rows) if r.get("source") != "seed"]
    n = calibration_size(cfg, len(eligible))
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
