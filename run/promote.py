"""Which artifact a run serves, and whether a re-distilled one replaces it (``edgedistill retrain``).

The served artifact is ``RUN/serving.json``'s (``{"artifact", "promoted_at", "from", "student",
"data", "retrain"}``), written at each promotion; before the first one it is compress's pick: the
artifact named by ``bench.cascade_artifact`` when it passed the quality gate, else the first that
passed. Nothing is ever deleted: the old artifact stays where it is.

The rule (:func:`decide`) is compress's quality gate (``compress.pipeline.gate_passes``, point
estimates of the task's primary metric on the same held-out rows) with an allowed drop of 0: the new
artifact is promoted only if its metric is not lower than the current one's. Not the spec's
``compress.max_accuracy_drop``: that is the price of compressing a student once, and allowed at every
promotion it would let a chain of retrains lose that much each time. The paired test (McNemar or the
paired bootstrap, ``Task.compare``) is reported beside it and does not decide, as in the gate.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from edgedistill.compress.pipeline import gate_passes, passed_artifacts

from edgedistill.errors import UserError
from edgedistill.intervals import fmt_ci, fmt_p
from edgedistill.manifest import read_manifest, write_json_atomic

SERVING = "serving.json"
ALLOWED_DROP = 0.0


def current_artifact(run: Path, spec: Any) -> dict[str, Any]:
    """``{"artifact", "name", "student", "data"}``: what the run serves now and what made it."""
    pointer = run / SERVING
    if pointer.exists():
        try:
            cur = json.loads(pointer.read_text(encoding="utf-8"))
            artifact = Path(cur["artifact"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{pointer} is damaged (not JSON with an artifact path); delete it to fall back to {run / 'artifacts'}") from None
        if not artifact.is_dir():
            raise UserError(f"{pointer} points at {artifact}, which does not exist; delete {pointer} to fall back to {run / 'artifacts'}")
        return {"artifact": artifact, "name": artifact.name, "student": Path(cur.get("student") or run / "student"),
                "data": Path(cur.get("data") or run / "data")}
    if not (run / "artifacts" / "compress.json").exists():
        raise UserError(f"{run} has no artifacts/compress.json; pass the folder of an `edgedistill run` (--run RUN) that got to compress")
    passed = passed_artifacts(run / "artifacts")
    if not passed:
        raise UserError(f"no artifact in {run / 'artifacts'} passed the quality gate; there is nothing served to improve on")
    row = next((r for r in passed if r["name"] == spec.bench.cascade_artifact), passed[0])
    return {"artifact": Path(row["path"]), "name": row["name"], "student": run / "student", "data": run / "data"}


def recommended_cascade(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The cascade at the artifact's recommended threshold, from its manifest's ``calibration``
    block (``{"target", "threshold", "fallback_rate", "agreement"}``), or None for an artifact
    calibrated before thresholds were recommended."""
    cal = manifest.get("calibration") or {}
    rec = cal.get("recommended")
    if not isinstance(rec, dict):
        return None
    row = next((t for t in cal.get("thresholds") or [] if t.get("target") == rec.get("target")), {})
    return {"target": rec.get("target"), "threshold": rec.get("threshold"), "fallback_rate": row.get("fallback_rate"),
            "agreement": row.get("agreement")}


def side(folder: Path, metric: str, measured: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """One column of the comparison: the artifact, its metric with the 95 % interval on the test
    rows, and its cascade at the recommended threshold (when known)."""
    out: dict[str, Any] = {"artifact": str(folder), **extra}
    if measured is not None:
        s = measured["scores"]
        out.update(metric=metric, value=s[metric], ci=s.get(f"{metric}_ci"), n=s.get("n"), invalid_answers=s.get("invalid_answers"),
                   scores={k: v for k, v in s.items() if isinstance(v, int | float | list)})
    if Path(folder).is_dir():
        out["cascade"] = recommended_cascade(read_manifest(folder))
    return out


def decide(metric: str, old: float | None, new: float | None, *, built: bool = True, why_not_built: str = "") -> dict[str, Any]:
    """``{"promoted", "reason", "rule"}``: the new artifact replaces the old one only if it was built
    and passed compress's gate against its own FP student, and its ``metric`` is not lower than the
    old one's on the same test rows (:data:`ALLOWED_DROP`)."""
    rule = (f"promote only if the new artifact's {metric} on the held-out test set is at least the current one's "
            "(compress's quality gate rule, point estimates on the same rows, allowed drop 0; the paired test is reported, it does not decide)")
    if not built or new is None or old is None:
        return {"promoted": False, "reason": why_not_built or "the new artifact was not measured", "rule": rule}
    if gate_passes(old, new, ALLOWED_DROP):
        return {"promoted": True, "reason": f"{metric} {new:.4f} >= {old:.4f} (current)", "rule": rule}
    return {"promoted": False, "reason": f"{metric} {new:.4f} < {old:.4f} (current): worse, the current artifact stays", "rule": rule}


def promote(run: Path, new: Path, old: Path, student: Path, data: Path, retrain: str) -> dict[str, Any]:
    """Point ``RUN/serving.json`` at the new artifact (the old one is kept where it is)."""
    pointer = {"artifact": str(new), "promoted_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "from": str(old),
               "student": str(student), "data": str(data), "retrain": retrain}
    write_json_atomic(run / SERVING, pointer)
    return pointer


def _cell(col: dict[str, Any]) -> list[str]:
    cas = col.get("cascade") or {}
    fb = cas.get("fallback_rate")
    return [fmt_ci(col["value"], col.get("ci")) if "value" in col else "-", str(col.get("n", "-")),
            f"{fb:.1%} at {cas['threshold']:.3f}" if fb is not None and cas.get("threshold") is not None else "unknown"]


def retrain_markdown(rep: dict[str, Any]) -> str:
    """retrain.md: the data used, old vs new side by side, the paired test and the decision."""
    t = rep["data"]["traffic"]
    log = t["log"]
    dropped = ", ".join(f"{k} {v}" for k, v in t["dropped"].items()) or "none"
    lines = [
        f"# {rep['task']}: {rep['retrain']} (re-distillation from traffic)", "",
        "## Data", "",
        (f"- Log {log['folder']}: {log['records']} records in {log['files']} file(s), {log['inputs']} distinct inputs, "
        f"{log['repeated']} repeated, {log['broken_lines']} broken line(s) skipped, {log['bad_input']} without a usable input, "
        f"{log['hash_only']} with only input_sha256 (logged with --traffic-log-inputs off: cannot be trained on)."),
        (f"- Labels: {t['reused_teacher_answers']} teacher answers already paid for reused; {t['newly_labelled']} inputs labelled by "
        f"the teacher ({t['newly_labelled_from_cache']} from the cache, {t['teacher_requests_sent']} requests sent, ${t['teacher_cost_usd']:.4f})."),
        (f"- Validation (the distill stage's, against the old training data and the test set): {t['kept']} of {t['total']} kept; "
        f"dropped: {dropped}."),
        f"- Training: {rep['data']['kept']} rows ({t['old_rows']} old + {t['kept']} new), continued from {rep['continued_from']}.", "",
    ]
    if "old" in rep:
        metric = rep["metric"]
        old, new = rep["old"], rep["new"]
        lines += ["## Old vs new on the held-out test set", "",
                  f"| artifact | {metric} (95 %) | rows | fallback rate at the recommended threshold |", "|---|---|---|---|",
                  "| current: " + old["artifact"] + " | " + " | ".join(_cell(old)) + " |",
                  "| new: " + new["artifact"] + " | " + " | ".join(_cell(new)) + " |", ""]
        c = rep.get("comparison")
        if c:
            lines += [(f"New minus current: {c['diff']:+.3f} {metric} (95 % {c['diff_ci'][0]:+.2f} to {c['diff_ci'][1]:+.2f}), "
                      f"{str(c['test']).replace('_', ' ')}, {fmt_p(c['p_value'])} ({'within noise' if c['within_noise'] else 'a real difference'})."), ""]
    d = rep["decision"]
    lines += ["## Decision", "", f"**{'PROMOTED' if d['promoted'] else 'NOT PROMOTED'}**: {d['reason']}.", "", f"Rule: {d['rule']}.", ""]
    if d["promoted"]:
        lines.append(f"`{rep['serving']}` now points at {rep['new']['artifact']} (was {rep['old']['artifact']}, kept).")
    else:
        lines.append(f"The served artifact is unchanged ({rep.get('old', {}).get('artifact', '-')}); the new one stays in {rep['folder']}.")
    return "\n".join(lines) + "\n"
