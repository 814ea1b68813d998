"""Fit the confidence calibration of an artifact on a labelled calibration split and store it in
the artifact's manifest (``"calibration": {"temperature": T, ...}``), so that a threshold of 0.9
means about 90 % of the answers above it are right.

The student answers every row through the cascade's ``student_predict``, the code path of
``/v1/predict`` (task template, greedy, answer parsing, raw label-set / token-quantile scores), on
a server state built without the HTTP app; temperature scaling is then fitted
by maximum likelihood (``edgedistill.serve.confidence.fit_temperature``). Use a split the model was not trained
on and that is not the test set (``edgedistill distill`` holds one out: ``data/calibration.jsonl``;
``edgedistill compress`` runs this on every artifact it measures).

With the fitted temperature, the rows also give the cascade's thresholds: for each target (95, 98,
99 % of the reference answers' quality, i.e. agreement with the teacher's labels) the cheapest
threshold that reaches it (``edgedistill.thresholds``), and the recommended one (99 %), which
``edgedistill serve ARTIFACT`` uses by default; the ``curve`` (fallback rate and agreement at up
to about 60 thresholds, the targets' ones included: what the cascade will do at any threshold, as
``edgedistill run``'s report predicts it); plus the calibrated confidence histogram (what live
traffic's confidence is compared with).

    python -m edgedistill.serve.calibrate runs/banking77/artifact-gguf data/calibration.jsonl [--test-data test.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

from edgedistill.serve.cascade import StudentAnswer
from edgedistill.serve.state import State

from edgedistill.datafiles import read_rows
from edgedistill.errors import UserError
from edgedistill.manifest import MANIFEST, read_manifest, sha256_file, write_json_atomic
from edgedistill.thresholds import RECOMMENDED_TARGET, TARGETS, THRESHOLD_RULE, target_thresholds, threshold_curve


async def student_answers(st: State, rows: list[dict[str, Any]]) -> list[StudentAnswer]:
    """The student's answer to every row's input through ``student_predict`` (in slot-sized waves)."""
    from edgedistill.serve.cascade import student_predict

    out: list[StudentAnswer] = []
    wave = max(st.engine.runner.n_slots, 1)
    for i in range(0, len(rows), wave):
        out += await asyncio.gather(*[student_predict(st, _task_input(r["input"])) for r in rows[i : i + wave]])
    return out


async def collect(st: State, rows: list[dict[str, Any]]) -> tuple[list[list[float]], list[bool], list[float]]:
    """Raw scores, correctness and current confidence for each row that parsed."""
    task = st.artifact.task
    scores, correct, confs = [], [], []
    for r, a in zip(rows, await student_answers(st, rows)):
        if a.error is None:  # unparseable answers get confidence 0 whatever T is
            scores.append(a.scores)
            correct.append(task.is_correct(a.value, r["output"]))
            confs.append(a.confidence)
    return scores, correct, confs


def _task_input(value: Any) -> Any:
    return value if isinstance(value, list) else str(value)


def fit_calibration(st: State, rows: list[dict[str, Any]], test_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Fit the temperature on ``rows`` (their outputs are the reference: the teacher's labels for a
    calibration split) and describe the result: ECE before/after on those rows, the calibrated
    confidence histogram, the cheapest threshold per target (``edgedistill.thresholds``) and the
    recommended one; with ``test_rows`` (gold outputs), ECE before/after on them too (``test``)."""
    from edgedistill.serve.confidence import calibrated, fit_temperature

    from edgedistill.metrics import expected_calibration_error

    task = st.artifact.task
    answers = asyncio.run(student_answers(st, rows))
    parsed = [(r, a) for r, a in zip(rows, answers) if a.error is None]  # unparseable answers get confidence 0 whatever T is
    if len(parsed) < 10:
        raise UserError(f"calibration: only {len(parsed)} of {len(rows)} answers parsed; need at least 10 to fit a temperature")
    correct = [task.is_correct(a.value, r["output"]) for r, a in parsed]
    t = fit_temperature([a.scores for _, a in parsed], correct)
    after = [calibrated(a.scores, t) for _, a in parsed]
    kind = "classification" if task.type == "classification" else "generation"
    served = [0.0 if a.error else calibrated(a.scores, t) for a in answers]  # what serve reports for each row
    golds = [r["output"] for r in rows]
    student = [(g, None if a.error else a.value) for g, a in zip(golds, answers)]
    teacher = [(g, g) for g in golds]

    def score(pairs: list[tuple[Any, Any]]) -> float:  # the task's primary metric, the teacher's answers as the reference
        return task.score([g for g, _ in pairs], [p for _, p in pairs])

    thresholds = target_thresholds(student, served, teacher, TARGETS, score)
    recommended = next(th for th in thresholds if th["target"] == RECOMMENDED_TARGET)
    # what the cascade does on these rows at any threshold: the prediction for a threshold set by hand
    curve = threshold_curve(student, served, teacher, score, keep=[th["threshold"] for th in thresholds])
    cal = {
        "method": "temperature_scaling",
        kind: {"temperature": round(t, 4)},
        "temperature": round(t, 4),
        "split": "calibration",
        "n": len(rows),
        "n_unparsed": len(rows) - len(parsed),
        "accuracy": round(sum(correct) / len(correct), 4),
        "ece_before": round(expected_calibration_error([a.confidence for _, a in parsed], correct), 4),
        "ece_after": round(expected_calibration_error(after, correct), 4),
        "confidence_histogram": confidence_histogram(served),
        "threshold_rule": THRESHOLD_RULE,
        "thresholds": thresholds,
        "recommended": {"target": recommended["target"], "threshold": recommended["threshold"], "met": recommended["met"]},
        "curve": curve,
        "confidence_quantile": st.settings.confidence_quantile if kind == "generation" else None,
        "fitted_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if test_rows:
        cal["test"] = held_out_ece(st, test_rows, t)
    return cal


def held_out_ece(st: State, rows: list[dict[str, Any]], temperature: float) -> dict[str, Any]:
    """ECE on held-out rows (gold outputs) with T = 1 and with the fitted ``temperature``, over the
    answers that parsed (``n``: the rows asked)."""
    from edgedistill.serve.confidence import calibrated

    from edgedistill.metrics import expected_calibration_error

    task = st.artifact.task
    parsed = [(r, a) for r, a in zip(rows, asyncio.run(student_answers(st, rows))) if a.error is None]
    correct = [task.is_correct(a.value, r["output"]) for r, a in parsed]
    return {
        "ece_before": round(expected_calibration_error([calibrated(a.scores) for _, a in parsed], correct), 4),
        "ece_after": round(expected_calibration_error([calibrated(a.scores, temperature) for _, a in parsed], correct), 4),
        "n": len(rows),
        "n_unparsed": len(rows) - len(parsed),
    }


def confidence_histogram(confidences: list[float], n_bins: int = 10) -> dict[str, list]:
    """Counts of confidences in equal-width bins (``edgedistill.metrics.reliability_bins``'s)."""
    from edgedistill.metrics import reliability_bins

    bins = reliability_bins(confidences, [False] * len(confidences), n_bins)
    return {"edges": [round(b / n_bins, 6) for b in range(n_bins + 1)], "counts": [b["count"] for b in bins]}


def calibrate_artifact(
    artifact: Path,
    data: Path,
    limit: int | None = None,
    n_threads: int | None = None,
    write: bool = True,
    test_rows: list[dict[str, Any]] | None = None,
) -> dict:
    """Fit the temperature on ``data`` (CSV/JSONL with input and output) and store it, with the
    thresholds it gives (``fit_calibration``), in the manifest's ``calibration``."""
    from edgedistill.serve.settings import Settings
    from edgedistill.serve.state import build_state

    artifact = Path(artifact)
    if not (artifact / MANIFEST).exists():
        raise UserError(f"{artifact}: calibration is stored in an artifact folder's {MANIFEST}; a bare .gguf has none")
    rows = read_rows(Path(data), "calibration", ["input", "output"], limit)
    st = build_state(Settings.load(artifact=str(artifact), threshold=0.0, n_threads=n_threads, model_alias=None))
    try:
        if st.artifact.task is None:
            raise UserError(f"{artifact}: the manifest has no task, so there is no answer to check; nothing to calibrate")
        st.artifact.calibration = {}  # score with T = 1 (the raw scores are what is fitted)
        cal = fit_calibration(st, rows, test_rows)
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
    ap.add_argument(
        "--test-data", type=Path, help="CSV or JSONL with input and gold output (the test split): its ECE before/after"
    )
    ap.add_argument("--json-out", type=Path, help="also write the fit to this JSON file")
    args = ap.parse_args(argv)
    try:
        test_rows = read_rows(args.test_data, "--test-data", ["input", "output"], None) if args.test_data else None
        cal = calibrate_artifact(
            args.artifact, args.data, args.limit, args.n_threads, write=not args.dry_run, test_rows=test_rows
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    if args.json_out:
        write_json_atomic(args.json_out, cal)
    print(json.dumps(cal, indent=2))


if __name__ == "__main__":
    main()
