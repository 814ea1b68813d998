"""`edgedistill retrain TASK.yaml --traffic DIR --run RUN`: re-distillation from a server's traffic.

Read top to bottom; everything goes to a fresh ``RUN/retrain-<n>/`` (an unfinished one, without
``retrain.json``, is resumed: the teacher's answers are cached, training resumes from its checkpoint,
unchanged artifacts are reused):

    1. data       the logged inputs labelled (the teacher's answers already paid for reused, the
                  rest asked through RUN's teacher cache), validated with the old training data
                  against the test set -> retrain-<n>/data/
    2. student    the current student trained further on old + new rows -> retrain-<n>/student/
    3. artifacts  compressed with the spec's compress settings -> retrain-<n>/artifacts/
    4. promotion  the current and the new artifact (the same format) measured on the held-out test
                  set by compress's own code, and the new one promoted (``RUN/serving.json``) only
                  if it is at least as good (``run.promote``) -> retrain.json, retrain.md

"Current" is what ``RUN/serving.json`` points at (after an earlier promotion: that retrain's student
and data), else the run's own artifact, student and data.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rich.console import Console

from edgedistill.errors import UserError
from edgedistill.manifest import write_json_atomic
from edgedistill.spec import load_spec

console = Console(stderr=True)
_RETRAIN = re.compile(r"retrain-(\d+)$")


def retrain_folder(run: Path) -> Path:
    """``RUN/retrain-<n>``: the newest one if it never finished (no retrain.json), else the next number."""
    done = sorted((int(m.group(1)), p) for p in run.glob("retrain-*") if p.is_dir() and (m := _RETRAIN.search(p.name)))
    if done and not (done[-1][1] / "retrain.json").exists():
        return done[-1][1]
    return run / f"retrain-{done[-1][0] + 1 if done else 1}"


def run_retrain(spec_path: Path, traffic: Path, run: Path | None = None) -> dict[str, Any]:
    from edgedistill.compress.measure import measure_artifact
    from edgedistill.compress.pipeline import run_compress
    from edgedistill.distill.cache import ResponseCache
    from edgedistill.distill.pipeline import train_student
    from edgedistill.distill.teacher import make_teacher
    from edgedistill.distill.traffic import traffic_dataset
    from edgedistill.run.promote import SERVING, current_artifact, decide, promote, retrain_markdown, side

    spec = load_spec(spec_path)
    run = Path(run or Path("runs") / spec.name)
    if not (run / "run.json").exists() and not (run / "student").is_dir():
        raise UserError(f"--run {run} is not the folder of an `edgedistill run` (no run.json, no student/); run it first or fix the path")
    cur = current_artifact(run, spec)
    out = retrain_folder(run)
    metric = spec.task.metric
    console.rule(f"[bold]retrain[/] {out.name}: improving on {cur['artifact']}")
    rep: dict[str, Any] = {"task": spec.name, "retrain": out.name, "folder": str(out), "metric": metric, "serving": str(run / SERVING),
                           "continued_from": str(cur["student"])}

    # 1. data
    cache = ResponseCache(run / "cache" / "teacher.sqlite")  # the run's cache: answers distill paid for are free
    teacher = make_teacher(spec.teacher, spec.base_dir, cache)
    kept, rep["data"] = traffic_dataset(spec, teacher, Path(traffic), cur["data"], out / "data")
    rep["teacher_usage"] = teacher.usage.as_dict()
    if rep["data"]["traffic"]["kept"] == 0:
        rep["decision"] = decide(metric, None, None, built=False, why_not_built="no traffic row survived validation: nothing new to learn")
        return _finish(out, rep, retrain_markdown)

    # 2. student
    student, _, train_info = train_student(spec, kept, out / "data", teacher, out, continue_from=cur["student"])
    rep["train"] = {k: v for k, v in train_info.items() if k not in ("losses", "ce", "kd", "label_kd")}

    # 3. artifacts (the spec's compress settings; a failed gate is reported, not raised)
    summary = run_compress(student, calibration=out / "data", task=Path(spec_path), out=out / "artifacts", strict=False)
    row = next((r for r in summary["artifacts"] if r["name"] == cur["name"]), None)

    # 4. promotion
    console.print(f"measuring the current {cur['name']} and the new one on the held-out test set ...")
    old_m = measure_artifact(cur["artifact"], spec)
    rep["old"] = side(cur["artifact"], metric, old_m)
    if row is None or not row.get("passed"):
        if row is None:
            why = f"compress built no {cur['name']} (not in compress.formats)"
        else:
            problem = row.get("error") or f"drop {row.get('drop')} vs its FP student"
            why = f"the new {cur['name']} failed compress's gate: {problem}"
        rep["new"] = side(Path(row["path"]) if row and row.get("path") else out / "artifacts" / cur["name"], metric, None)
        rep["decision"] = decide(metric, old_m["scores"][metric], None, built=False, why_not_built=why)
        return _finish(out, rep, retrain_markdown)
    new_path = Path(row["path"])
    new_m = measure_artifact(new_path, spec)
    rep["new"] = side(new_path, metric, new_m)
    rep["comparison"] = spec.task.compare(old_m["golds"], new_m["preds"], old_m["preds"])  # new minus current, same rows
    rep["decision"] = decide(metric, old_m["scores"][metric], new_m["scores"][metric])
    if rep["decision"]["promoted"]:
        rep["promotion"] = promote(run, new_path, cur["artifact"], student, out / "data", out.name)
    return _finish(out, rep, retrain_markdown)


def _finish(out: Path, rep: dict[str, Any], markdown) -> dict[str, Any]:
    (out / "retrain.md").write_text(markdown(rep), encoding="utf-8")
    write_json_atomic(out / "retrain.json", rep)  # last: its presence marks the retrain as finished
    d = rep["decision"]
    colour = "green" if d["promoted"] else "yellow"
    console.print(f"[{colour}]{'promoted' if d['promoted'] else 'not promoted'}[/]: {d['reason']} ({out / 'retrain.md'})")
    return rep
