"""Fit the confidence calibration of an artifact on a labelled calibration split and store it in
the artifact's manifest (``"calibration": {"temperature": T, ...}``), so that a threshold of 0.9
means about 90 % of the answers above it are right.

The student answers every row through the cascade's ``student_predict``, the code path of
``/v1/predict`` (task template, greedy, answer parsing, raw label-set / token-quantile scores), on
a server state built without the HTTP app; temperature scaling is then fitted
by maximum likelihood (``edgedistill.serve.confidence.fit_temperature``). Use a split the model was not trained
on and that is not the test set.

    python -m edgedistill.serve.calibrate runs/banking77/artifact-gguf data/calibration.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

from edgedistill.serve.state import State

from edgedistill.errors import UserError
from edgedistill.manifest import MANIFEST, read_manifest, sha256_file, write_json_atomic


async def collect(st: State, rows: list[dict[str, Any]]) -> tuple[list[list[float]], list[bool], list[float]]:
    """Raw scores, correctness and current confidence for each row that parsed (in slot-sized waves)."""
    from edgedistill.serve.cascade import student_predict

    task = st.artifact.task
    scores, correct, confs = [], [], []
    wave = max(st.engine.runner.n_slots, 1)
    for i in range(0, len(rows), wave):
        answers = await asyncio.gather(*[student_predict(st, r["input"] if isinstance(r["input"], list) else str(r["input"])) for r in rows[i : i + wave]])
        for r, a in zip(rows[i : i + wave], answers):
            if a.error is None:  # unparseable answers get confidence 0 whatever T is
                scores.append(a.scores)
                correct.append(task.is_correct(a.value, r["output"]))
                confs.append(a.confidence)
    return scores, correct, confs


def fit_calibration(st: State, rows: list[dict[str, Any]]) -> dict[str, Any]:
    from edgedistill.serve.confidence import calibrated, fit_temperature

    from edgedistill.metrics import expected_calibration_error

    scores, correct, before = asyncio.run(collect(st, rows))
    if len(scores) < 10:
        raise UserError(f"calibration: only {len(scores)} of {len(rows)} answers parsed; need at least 10 to fit a temperature")
    t = fit_temperature(scores, correct)
    after = [calibrated(v, t) for v in scores]
    kind = "classification" if st.artifact.task.type == "classification" else "generation"
    return {
        "method": "temperature_scaling",
        kind: {"temperature": round(t, 4)},
        "temperature": round(t, 4),
        "n": len(scores),
        "n_unparsed": len(rows) - len(scores),
        "accuracy": round(sum(correct) / len(correct), 4),
        "ece_before": round(expected_calibration_error(before, correct), 4),
        "ece_after": round(expected_calibration_error(after, correct), 4),
        "confidence_quantile": st.settings.confidence_quantile if kind == "generation" else None,
        "fitted_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def calibrate_artifact(
    artifact: Path, data: Path, limit: int | None = None, n_threads: int | None = None, write: bool = True
) -> dict:
    """Fit the temperature on ``data`` (CSV/JSONL with input and output) and store it in the manifest."""
    from edgedistill.serve.settings import Settings
    from edgedistill.serve.state import build_state

    from edgedistill.spec import read_rows

    artifact = Path(artifact)
    if not (artifact / MANIFEST).exists():
        raise UserError(f"{artifact}: calibration is stored in an artifact folder's {MANIFEST}; a bare .gguf has none")
    rows = read_rows(Path(data), "calibration", ["input", "output"], limit)
    st = build_state(Settings.load(artifact=str(artifact), threshold=0.0, n_threads=n_threads, model_alias=None))
    try:
        if st.artifact.task is None:
            raise UserError(f"{artifact}: the manifest has no task, so there is no answer to check; nothing to calibrate")
        st.artifact.calibration = {}  # score with T = 1 (the raw scores are what is fitted)
        cal = fit_calibration(st, rows)
    finally:
        if st.teacher is not None:
            asyncio.run(st.teacher.close())
        st.engine.close()
    cal["data_sha256"] = sha256_file(Path(data))
    if write:
        manifest = read_manifest(artifact)
        manifest["calibration"] = cal
        write_json_atomic(artifact / MANIFEST, manifest)
    return cal


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m edgedistill.serve.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("data", type=Path, help="CSV or JSONL with input and output columns (a calibration split)")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--n-threads", type=int)
    ap.add_argument("--dry-run", action="store_true", help="print the fit, leave the manifest alone")
    args = ap.parse_args(argv)
    try:
        cal = calibrate_artifact(args.artifact, args.data, args.limit, args.n_threads, write=not args.dry_run)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(json.dumps(cal, indent=2))


if __name__ == "__main__":
    main()
