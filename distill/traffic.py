"""Training rows from a server's traffic log (``serve --traffic-log DIR``), for ``edgedistill retrain``.

The log is JSON Lines, ``DIR/*.jsonl``, one object per answered request (see serve/README.md):
``input`` (the task input: a text or a list of chat messages) or, with ``--traffic-log-inputs off``,
only ``input_sha256``; ``teacher`` is the teacher's answer when it was asked (a fallback or a shadow
check; for ``/v1/predict`` the parsed value, on the chat routes its text), else null.

* :func:`read_traffic` -- every usable input, one row per distinct input, and what could not be used
  (broken lines, hash-only records, inputs that are not a task input), counted;
* :func:`label_traffic` -- a teacher answer already paid for is reused as the label; every other
  input is labelled by the teacher with the very requests the distill stage sends
  (``generate.label_requests``), so through the same cache: an input distill labelled before, or an
  earlier retrain, costs nothing.

The rows then go through ``validate.validate_rows`` with the old training data (source
``"traffic"``), like every distillation row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgedistill.distill.calibration_split import CALIBRATION_FILE, calibration_record, split_calibration
from edgedistill.distill.generate import attach_labels, label_requests
from edgedistill.distill.teacher import Teacher

from edgedistill.conversation import InputError, check_input
from edgedistill.errors import UserError

SOURCE = "traffic"
PREDICT = "/v1/predict"


def _task_input(value: Any) -> Any:
    """The logged input as a task input; a conversation of one user message is its text (the same
    input, and then it compares with the text rows of the training data)."""
    x = check_input(value)
    if isinstance(x, list) and len(x) == 1 and x[0]["role"] == "user" and set(x[0]) <= {"role", "content"}:
        return x[0]["content"]
    return x


def read_traffic(folder: Path) -> tuple[list[dict], dict[str, Any]]:
    """(rows, counts): one row per distinct logged input, in log order (files sorted by name); a
    row keeps the first record that carries a teacher answer, else the first record. ``counts``:
    files, lines, records, broken_lines (not a JSON object), hash_only (``input_sha256`` without
    ``input``: cannot be trained on), bad_input (not a text or a conversation), repeated (an input
    logged again), inputs (the rows), with_teacher_answer (rows whose label is reused)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--traffic {folder} is not a folder; pass the DIR given to `edgedistill serve --traffic-log DIR`")
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise UserError(f"--traffic {folder} holds no *.jsonl files; serve with --traffic-log {folder} first")
    counts = dict.fromkeys(("lines", "records", "broken_lines", "hash_only", "bad_input", "repeated"), 0)
    rows: dict[str, dict] = {}
    for path in files:
        with path.open(encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                counts["lines"] += 1
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                if not isinstance(rec, dict):
                    counts["broken_lines"] += 1  # e.g. the last line of a log cut by a crash
                    continue
                counts["records"] += 1
                if rec.get("input") is None:
                    counts["hash_only" if rec.get("input_sha256") else "bad_input"] += 1
                    continue
                try:
                    x = _task_input(rec["input"])
                except InputError:
                    counts["bad_input"] += 1
                    continue
                key = json.dumps(x, sort_keys=True, ensure_ascii=False)
                answer = rec.get("teacher")
                if key in rows:
                    counts["repeated"] += 1
                    if answer is None or rows[key]["teacher"] is not None:
                        continue
                rows[key] = {"input": x, "teacher": answer, "route": rec.get("route"), "where": f"{path.name}:{n}",
                             "request_id": rec.get("request_id"), "answered_by": rec.get("answered_by"), "shadow": bool(rec.get("shadow"))}
    out = list(rows.values())
    counts.update(files=len(files), inputs=len(out), with_teacher_answer=sum(r["teacher"] is not None for r in out))
    return out, counts


def describe_log(c: dict[str, Any]) -> str:
    """One paragraph: what the log held and what of it can be trained on."""
    line = (f"traffic: {c['records']} records in {c['files']} file(s): {c['inputs']} distinct inputs "
            f"({c['with_teacher_answer']} with the teacher's answer, reused), {c['repeated']} repeated")
    if c["broken_lines"]:
        line += f"; {c['broken_lines']} broken line(s) skipped"
    if c["bad_input"]:
        line += f"; {c['bad_input']} record(s) without a usable input skipped"
    if c["hash_only"]:
        line += (f"; {c['hash_only']} record(s) carry only input_sha256 (served with --traffic-log-inputs off) "
                 "and cannot be trained on")
    return line


def _reused_text(spec: Any, rec: dict) -> str:
    """The teacher's logged answer as the text the teacher would have written: on /v1/predict the
    parsed value (formatted as the training answer), on the chat routes the text itself."""
    value = rec["teacher"]
    if rec.get("route") == PREDICT or not isinstance(value, str):
        return spec.task.format_answer(value)
    return value


def label_traffic(spec: Any, records: list[dict], teacher: Teacher, run_requests) -> list[dict]:
    """Training rows (``validate_rows``' shape, source ``"traffic"``) from :func:`read_traffic`'s rows.

    ``run_requests(teacher, requests, what)`` answers requests (the distill stage's progress runner).
    A reused answer has ``provenance.label`` ``"reused"`` and is asked nothing (no self-consistency
    sample either: that would pay for it again); the others ``"teacher"``, labelled as distill
    labels (and with self-consistency when the spec asks for it)."""
    rows = []
    for i, rec in enumerate(records):
        row = {"id": f"traffic-{i}", "input": rec["input"], "source": SOURCE,
               "provenance": {"log": rec["where"], "request_id": rec["request_id"], "route": rec["route"],
                              "answered_by": rec["answered_by"], "shadow": rec["shadow"]}}
        if rec["teacher"] is not None:
            text = _reused_text(spec, rec)
            value, err = spec.task.parse_answer(text)
            row.update(raw_output=text, output=None if err else value)
            row["provenance"].update(label="reused", teacher_model=teacher.model_id)
        rows.append(row)
    todo = [r for r in rows if "raw_output" not in r]
    if todo:
        reqs = label_requests(spec, todo)
        attach_labels(spec, todo, reqs, run_requests(teacher, reqs, f"labelling traffic ({teacher.model_id})"), teacher)
        if spec.validation.self_consistency:
            reqs2 = label_requests(spec, todo, sample=1, temperature=spec.validation.self_consistency_temperature)
            attach_labels(spec, todo, reqs2, run_requests(teacher, reqs2, "self-consistency"), teacher, key="consistency_output")
        for r in todo:
            r["provenance"]["label"] = "teacher"
    return rows


def traffic_report(report: dict[str, Any]) -> dict[str, Any]:
    """What validation did to the traffic rows (``validate_rows``' report): total, kept, dropped by reason."""
    part = report["by_source"].get(SOURCE, {"total": 0, "kept": 0, "rejected": {}})
    return {"total": part["total"], "kept": part["kept"], "dropped": {k: v for k, v in part["rejected"].items() if v}}


def _hold_out_calibration(spec: Any, kept: list[dict], old_data: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, calibration rows) of a retrain: the run's calibration split (never trained on)
    plus a share of the validated traffic rows held out by the spec's ``calibration`` rule, so the
    new artifact's confidence is calibrated, and its drift reference drawn, on what the traffic now
    looks like. Old training rows stay in training."""
    old_file = old_data / CALIBRATION_FILE
    old = [json.loads(line) for line in old_file.read_text(encoding="utf-8").splitlines() if line.strip()] if old_file.exists() else []
    traffic = [r for r in kept if r.get("source") == SOURCE]
    cfg = spec.calibration.model_copy(update={"prefer_sources": [SOURCE]})
    _, held = split_calibration(cfg, traffic, stratify=spec.type == "classification")
    held_ids = {id(r) for r in held}
    return [r for r in kept if id(r) not in held_ids], old + [calibration_record(r) for r in held]


def traffic_dataset(spec: Any, teacher: Teacher, traffic: Path, old_data: Path, data_dir: Path) -> tuple[list[dict], dict[str, Any]]:
    """The retrain's dataset in ``data_dir`` (the layout of distill's ``data/``: train.jsonl, the
    traffic rows in traffic.jsonl, the rejected ones in rejects.jsonl, report.json, manifest.json):
    the old training rows (``old_data/train.jsonl``) first, then the labelled traffic, all through
    the same validation against the test set. Returns (kept rows, report); the report's
    ``traffic`` part says what the log gave and what validation dropped, by reason."""
    from edgedistill.distill.pipeline import _write_jsonl, console, run_with_progress
    from edgedistill.distill.validate import format_report_table, validate_rows

    from edgedistill.manifest import read_manifest, sha256_file, sha256_json, write_json_atomic, write_manifest

    read_manifest(old_data, verify=True)
    old_rows = [json.loads(line) for line in (old_data / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    records, log = read_traffic(traffic)
    console.print(describe_log(log))
    before = teacher.usage.as_dict()
    rows = label_traffic(spec, records, teacher, run_with_progress)
    usage = {k: v - before.get(k, 0) for k, v in teacher.usage.as_dict().items()}
    test = spec.load_test_set()
    kept, rejected, report = validate_rows(spec, old_rows + rows, [r.input for r in test])
    kept, calibration = _hold_out_calibration(spec, kept, old_data)
    reused = sum(r["provenance"].get("label") == "reused" for r in rows)
    report["calibration_rows"] = len(calibration)
    report["traffic"] = {
        "log": {"folder": str(traffic), **log},
        "reused_teacher_answers": reused,
        "newly_labelled": len(rows) - reused,
        "newly_labelled_from_cache": usage["cache_hits"],
        "teacher_requests_sent": usage["requests_sent"],
        "teacher_cost_usd": round(usage["cost_usd"], 6),
        "old_rows": len(old_rows),
        **traffic_report(report),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("traffic.jsonl", rows), ("train.jsonl", kept), ("rejects.jsonl", rejected), (CALIBRATION_FILE, calibration)):
        _write_jsonl(data_dir / name, part)
    write_json_atomic(data_dir / "report.json", report)
    write_manifest(
        data_dir, kind="dataset", format="jsonl", stage="retrain/data",
        inputs={"old_data": sha256_file(old_data / "train.jsonl"), "traffic": sha256_json([r["input"] for r in rows]),
                "test_set": sha256_json([r.input for r in test])},
        settings={"validation": spec.validation.model_dump(mode="json")}, task=spec.spec_dict(), task_dir=str(spec.base_dir),
        data_hash=sha256_file(data_dir / "train.jsonl"), teacher=teacher.describe(),
    )
    console.print(format_report_table(report))
    return kept, report
