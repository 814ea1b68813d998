"""The cascade's prediction and its check: what the calibration split says the served cascade will
do (``cascade.predicted`` in ``report.json``), beside what bench measured on the test split.

compress fits each artifact's calibration on the calibration split and stores its ``curve``
(fallback rate and agreement with the teacher's labels at up to ~60 thresholds, the targets' ones
included); the prediction at the SERVED threshold is the curve's point with the largest threshold
at or below it (the server's rule: ``confidence < threshold`` falls back). A manifest from before
the curve: the ``thresholds`` entry at exactly the served threshold, else no prediction.

The calibration split's reference is the teacher's labels, so what it measures of the cascade's
quality is agreement with the teacher; the test accuracy it predicts is that agreement times the
teacher's measured test accuracy (``accuracy_basis`` says so). The prediction holds when the
measured fallback rate and accuracy are each within ``TOLERANCE`` of it.
"""

from __future__ import annotations

from typing import Any

from edgedistill.intervals import fmt_ci
from edgedistill.thresholds import curve_point_at

TOLERANCE = 0.02  # 2 points, the "within 2 points"
SOURCE = "calibration split"


def predicted_cascade(
    calibration: dict[str, Any] | None, threshold: float, teacher_accuracy: float | None, metric: str = "accuracy"
) -> dict[str, Any] | None:
    """``cascade.predicted`` at the served ``threshold`` from an artifact's calibration block
    (compress.json's or the manifest's), or None when it has neither a curve nor a ``thresholds``
    entry at that threshold."""
    cal = calibration or {}
    thresholds = [t for t in cal.get("thresholds") or [] if isinstance(t, dict) and "threshold" in t]
    target = next((t.get("target") for t in thresholds if abs(float(t["threshold"]) - threshold) < 1e-9), None)
    curve = cal.get("curve")
    if curve:
        point = curve_point_at(curve, threshold)
        basis = f"the calibration curve's point at threshold {point['threshold']:g}" if point else None
    else:  # a manifest from before the curve
        point = next((t for t in thresholds if abs(float(t["threshold"]) - threshold) < 1e-9), None)
        basis = "the calibration's thresholds entry (no curve stored: compress it again for one)" if point else None
    if point is None or point.get("agreement") is None or point.get("fallback_rate") is None:
        return None
    agreement = float(point["agreement"])
    accuracy = None if teacher_accuracy is None else round(agreement * float(teacher_accuracy), 4)
    why = (
        f"agreement with the teacher's labels on the calibration split ({agreement:.4g}) x the teacher's {metric} "
        f"on the test split ({teacher_accuracy:.4g}): assumes the cascade is right where it agrees with the teacher "
        "and wrong where it does not"
        if teacher_accuracy is not None
        else "no teacher accuracy on the test split (distill.json): no accuracy predicted"
    )
    return {
        "fallback_rate": round(float(point["fallback_rate"]), 4),
        "accuracy": accuracy,
        "agreement": round(agreement, 4),
        "threshold": threshold,
        "target": target,
        "n": cal.get("n"),
        "source": SOURCE,
        "point": basis,
        "accuracy_basis": why,
    }


def prediction_check(predicted: dict[str, Any] | None, measured: dict[str, Any]) -> dict[str, Any]:
    """``prediction_error`` (measured - predicted, per quantity), ``prediction_ok`` (each within
    ``TOLERANCE``; None when either side is missing) and ``prediction_in_interval`` (the predicted
    value inside the measured 95 % interval: a miss there is within the test split's noise)."""
    keys = ("fallback_rate", "accuracy")
    if not predicted or any(predicted.get(k) is None or measured.get(k) is None for k in keys):
        return {"prediction_ok": None, "prediction_error": None, "prediction_in_interval": None}
    err = {k: round(float(measured[k]) - float(predicted[k]), 4) for k in keys}  # 4 decimals: 0.02 is not float noise
    inside = {}
    for k in keys:
        ci = measured.get(f"{k}_ci")
        inside[k] = bool(ci[0] <= predicted[k] <= ci[1]) if isinstance(ci, list | tuple) and len(ci) == 2 else None
    return {
        "prediction_ok": all(abs(e) <= TOLERANCE for e in err.values()),
        "prediction_error": err,
        "prediction_in_interval": inside,
    }


def prediction_markdown(c: dict[str, Any], metric: str) -> list[str]:
    """The Cascade section's side-by-side: predicted (calibration split) vs measured (test split),
    and a line saying whether the prediction held and, where it missed, whether that is noise."""
    p = c.get("predicted")
    if not p:
        return ["", "No prediction for this threshold (the artifact has no calibration, or one from before the curve without a thresholds entry at it)."]
    n_cal = p.get("n") if p.get("n") is not None else "-"
    n_test = c.get("n") if c.get("n") is not None else "-"
    err = c.get("prediction_error") or {}
    rows = [("fallback rate", "fallback_rate"), (metric, "accuracy")]
    lines = ["", f"Predicted (calibration split, n={n_cal}) vs measured (test, n={n_test}) at threshold {p['threshold']:g}:", "",
             f"| | predicted (calibration split, n={n_cal}) | measured (test, n={n_test}, 95 % interval) | measured - predicted |",
             "|---|---|---|---|"]  # fmt: skip
    for label, k in rows:
        e = err.get(k)
        lines.append(
            f"| {label} | {fmt_ci(p.get(k), None)} | {fmt_ci(c.get(k), c.get(f'{k}_ci'))} | {fmt_ci(e, None, sign='+')} |"
        )
    lines += ["", f"Predicted {metric}: {p['accuracy_basis']}.", "", _verdict(c, rows)]
    return lines


def _verdict(c: dict[str, Any], rows: list[tuple[str, str]]) -> str:
    ok, err, inside = c.get("prediction_ok"), c.get("prediction_error") or {}, c.get("prediction_in_interval") or {}
    pts = round(100 * TOLERANCE)
    if ok is None:
        return (
            "Prediction not checked: the test split gave no fallback rate or accuracy for the cascade, or nothing was predicted."
        )
    half = _half_width(c)
    noise = f"the measured 95 % intervals reach ±{half:.1f} points here, " + (
        f"so the test split alone cannot settle a {pts}-point difference" if half >= pts else f"tighter than {pts} points"
    )
    if ok:
        return f"The prediction held: fallback rate and {rows[1][0]} each within {pts} points ({noise})."
    misses = []
    for label, k in rows:
        if abs(err[k]) > TOLERANCE:
            where = (
                "inside the measured interval: within noise"
                if inside.get(k)
                else "outside the measured interval: a real miss"
                if inside.get(k) is False
                else "no measured interval"
            )
            misses.append(f"{label} off by {abs(err[k]) * 100:.1f} points ({where})")
    return f"The prediction missed (more than {pts} points): {'; '.join(misses)}; {noise}."


def _half_width(c: dict[str, Any]) -> float:
    """Half the widest measured interval, in points."""
    widths = [
        (ci[1] - ci[0]) / 2
        for k in ("fallback_rate", "accuracy")
        if isinstance(ci := c.get(f"{k}_ci"), list | tuple) and len(ci) == 2
    ]
    return 100 * max(widths) if widths else 0.0
