"""The bench report from what was measured: quality per endpoint, costs (a cascade's with the teacher
calls it made), the cascade's threshold sweep, ceiling fractions and notes. ``edgedistill.bench.run``
measures; this module only computes."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from typing import TYPE_CHECKING, Any

from edgedistill.bench import cascade, quality, report, stats
from edgedistill.bench.config import BenchConfig
from edgedistill.bench.cost import cascade_cost_per_1k, own_cost_per_1k, sig

from edgedistill.intervals import metric_interval

if TYPE_CHECKING:
    from edgedistill.bench.run import Measured

ROW_KEYS = ("name", "mode", "concurrency", "rate", "offered_rate", "sent")

# The student-only pass asks chat with X-Edgedistill-Fallback: off; a server older than that mode
# ignores the header and still lets the teacher answer unsure rows, whose student answers are then unknown.
NO_STUDENT_ONLY = (
    "{name}: the teacher answered {k} of {n} rows of the student-only pass (chat with X-Edgedistill-Fallback: off): "
    "the server predates edgedistill serve's student-only mode and ignored the header, so those rows' student answers "
    "are unknown and count as wrong in the sweep and the calibration; update the server (or serve it with --threshold 0) "
    "for an exact sweep"
)


def _teacher_calls(row: dict[str, Any]) -> float | None:
    """The share of a row's requests its server asked the teacher for (answered or failed)."""
    rate = row.get("teacher_call_rate")
    return row.get("fallback_rate") if rate is None else rate


def _served_call_rates(m: Measured) -> dict[str, tuple[float, int]]:
    """Per endpoint, the share of the test set's rows, asked once each as served, for which the
    server asked its teacher (answered or failed), and how many rows were routed: the teacher-call
    rate a cascade's cost uses, from every test row rather than the load levels' few requests."""
    out = {}
    for name, samples in m.served.items():
        routed = [s for s in samples if s.ok and s.answered_by is not None]
        if routed:
            out[name] = (round(sum(s.teacher_called for s in routed) / len(routed), 4), len(routed))
    return out


def _cost_call_rate(row: dict[str, Any], served: dict[str, tuple[float, int]]) -> tuple[float | None, str]:
    """The teacher-call rate a row's cost uses, and where it came from: the as-served pass over the
    test set when it routed more rows than the load level sent, else the load level's own."""
    load = _teacher_calls(row)
    if row["name"] in served and served[row["name"]][1] > (row.get("requests") or 0):
        rate, n = served[row["name"]]
        return rate, f"teacher calls on the test set as served (n={n})"
    return load, f"teacher calls at this load level (n={row.get('requests')})"


def _teacher_cost(cfg: BenchConfig, rows: list[dict[str, Any]]) -> float | None:
    """The teacher's cost per 1k requests at its cheapest measured load level."""
    if cfg.teacher is None:
        return None
    costs = [r["own_cost_per_1k_usd"] for r in rows if r["name"] == cfg.teacher and r["own_cost_per_1k_usd"] is not None]
    return min(costs) if costs else None


def _student_alone(
    by_name: dict[str, Any], rows: list[dict[str, Any]], row: dict[str, Any], same_level: bool = True
) -> list[dict[str, Any]]:
    """The rows of endpoints that serve the same artifact as ``row``'s with no teacher behind them
    (at the same load level, with ``same_level``): a cascade's student work per request, priced
    without the time its requests spent waiting on the teacher, which the teacher's share prices."""
    art = by_name[row["name"]].artifact
    if not art:
        return []
    return [
        x for x in rows
        if x["name"] != row["name"] and by_name[x["name"]].artifact == art and by_name[x["name"]].has_teacher is not True
        and not _teacher_calls(x) and x["own_cost_per_1k_usd"] is not None
        and (not same_level or all(x[k] == row[k] for k in ("mode", "concurrency", "rate")))
    ]  # fmt: skip


def assemble(cfg: BenchConfig, m: Measured, test_rows, cal_rows, ceilings) -> dict[str, Any]:
    task = cfg.task
    golds = [r.output for r in test_rows]
    rows = []
    for meta, samples in zip(m.rows, m.load_samples):
        row = {k: meta[k] for k in ROW_KEYS} | stats.summarize(samples)
        if task is not None:
            row["accuracy_load"] = (
                round(task.score([golds[s.index] for s in samples], [quality.parse(task, s) for s in samples]), 4) if samples else None
            )
        rows.append(row)
    notes = list(m.notes)

    # quality on the test set
    q: dict[str, dict[str, Any]] = {}
    answers: dict[str, quality.Answers] = {}
    if task is not None:
        for name, samples in m.served.items():
            answers[name] = quality.Answers.from_samples(task, samples, predict=name in m.served_predict)
        teacher_ans = answers.get(cfg.teacher) if cfg.teacher else None
        for name, a in answers.items():
            q[name] = quality.scores(task, golds, a, teacher_ans if name != cfg.teacher else None)
            student = _student_answers(task, m, name, a)
            q[name]["calibration"] = quality.calibration(task, golds, student) if student is not None else None

    # cost and accuracy per row
    by_name = {e.name: e for e in cfg.endpoints}
    for r in rows:
        r["own_cost_per_1k_usd"] = sig(own_cost_per_1k(by_name[r["name"]].price, r))
    t_cost = _teacher_cost(cfg, rows)
    served_calls = _served_call_rates(m)
    for r in rows:
        ep = by_name[r["name"]]
        own = r["own_cost_per_1k_usd"]
        calls, calls_basis = _cost_call_rate(r, served_calls)
        if ep.price is None:
            r["cost_per_1k_usd"], r["cost_basis"] = None, "no --price"
        elif r["name"] != cfg.teacher and calls:
            # every teacher call the cascade made at this load level is paid for: answered or failed. The
            # student's part is the same artifact served alone at this level where the bench has it: the
            # cascade's own throughput also counts its waits on the teacher, which the teacher's share pays.
            alone = _student_alone(by_name, rows, r)
            student = alone[0]["own_cost_per_1k_usd"] if alone else own
            r["cost_per_1k_usd"] = sig(cascade_cost_per_1k(student, calls, t_cost))
            r["cost_teacher_call_rate"] = calls
            part = f"student alone ({alone[0]['name']})" if alone else f"{ep.price.kind} (its own throughput)"
            r["cost_basis"] = (f"cascade: {part} + {calls_basis} x teacher"
                               + ("" if t_cost is not None else " (teacher cost unknown)"))  # fmt: skip
        else:
            r["cost_per_1k_usd"] = own
            r["cost_basis"] = ep.price.kind
        qn = q.get(r["name"], {})
        r["accuracy"] = qn.get(task.metric) if task is not None else None  # the task's primary metric (rep["metric"])
        r["accuracy_ci"], r["n"] = (qn.get(f"{task.metric}_ci"), qn.get("n")) if task is not None else (None, None)
        r["agreement_with_teacher"] = qn.get("agreement_with_teacher")
        r.setdefault("accuracy_load", None)
    _ceiling_fractions(rows, ceilings)

    sweeps = _sweeps(cfg, m, test_rows, cal_rows, answers, rows, t_cost, notes)
    _token_notes(rows, notes)
    rep = {
        "schema": "edgedistill.bench/1",
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg": [round(x, 2) for x in os.getloadavg()],
        },
        "metric": task.metric if task is not None else None,
        "config": cfg.public(),
        "endpoints": [e.public() for e in cfg.endpoints],
        "results": rows,
        "quality": q or None,
        "cascade": sweeps or None,
        "ceiling": ceilings or None,
        "pareto": report.pareto_labels(rows) if task is not None else None,
        "notes": notes,
    }
    return rep


def _student_answers(task, m: Measured, name: str, served: quality.Answers) -> quality.Answers | None:
    """The student's own answers with their confidence (None: the endpoint serves no confidence)."""
    if name in m.student:
        return quality.Answers.from_samples(task, m.student[name], predict=name in m.student_predict, own=True)
    if any(c is not None for c in served.confidences):
        return served
    return None


def _sweeps(cfg, m: Measured, test_rows, cal_rows, answers, rows, t_cost, notes) -> dict[str, Any]:
    task = cfg.task
    if task is None:
        return {}
    cascades = [e for e in cfg.endpoints if e.edgedistill and e.name != cfg.teacher]
    by_name = {e.name: e for e in cfg.endpoints}
    if cascades and cfg.teacher is None:
        notes.append("no --teacher: no cascade sweep (it needs the teacher's answer per test row)")
        return {}
    if cfg.teacher not in answers:
        return {}
    golds = [r.output for r in test_rows]

    def score(pairs: list[tuple[Any, Any]]) -> float:  # the task's primary metric over (gold, answer) pairs
        return task.score([g for g, _ in pairs], [p for _, p in pairs])

    def interval(pairs: list[tuple[Any, Any]]) -> list[float]:  # its 95 % interval
        return metric_interval(task.type, task.metric, [g for g, _ in pairs], [p for _, p in pairs], task.labels)

    t_ok = list(zip(golds, answers[cfg.teacher].preds))
    out = {}
    for ep in cascades:
        student = _student_answers(task, m, ep.name, answers[ep.name])
        if student is None:
            notes.append(f"{ep.name}: its answers carry no confidence: no cascade sweep")
            continue
        if ep.name not in m.student_predict:  # chat: the teacher answered rows the student-only mode should have kept
            k = sum(a == "teacher" for a in student.answered_by)
            if k:
                notes.append(NO_STUDENT_ONLY.format(name=ep.name, k=k, n=len(golds)))
        s_ok = list(zip(golds, student.preds))
        full = (s_ok, student.confidences, t_ok)
        own = [r["own_cost_per_1k_usd"] for r in rows if r["name"] == ep.name and r["own_cost_per_1k_usd"] is not None]
        mine = [r for r in rows if r["name"] == ep.name]
        alone = [x["own_cost_per_1k_usd"] for x in _student_alone(by_name, rows, mine[0], same_level=False)] if mine else []
        s_cost = min(alone or own) if (alone or own) else None
        if cal_rows and ep.name in m.cal_student:
            cal_golds = [r.output for r in cal_rows]
            cs = quality.Answers.from_samples(task, m.cal_student[ep.name], predict=ep.name in m.student_predict, own=True)
            ct = quality.Answers.from_samples(task, m.cal_teacher)
            cal = (list(zip(cal_golds, cs.preds)), cs.confidences, list(zip(cal_golds, ct.preds)))
            splits = {"cal": cal, "test": full}
            split = f"threshold chosen on --calibration {cfg.calibration} ({len(cal_rows)} rows), reported on the whole test set ({len(golds)} rows)"
        else:
            cal_idx, rep_idx = quality.split_halves(len(golds), cfg.seed)

            def pick(idx, arrays=full):
                return tuple([a[i] for i in idx] for a in arrays)

            splits = {"cal": pick(cal_idx), "test": pick(rep_idx)}
            split = (
                f"threshold chosen on a fixed-seed half of the test set (seed {cfg.seed}, {len(cal_idx)} rows), "
                f"reported on the other half ({len(rep_idx)} rows)"
            )
        sw = cascade.sweep(
            splits,
            calibration_key="cal",
            report_key="test",
            target=cfg.target_accuracy,
            target_relative=cfg.target,
            student_cost=s_cost,
            teacher_cost=t_cost,
            score=score,
            metric=task.metric,
            interval=interval,
            served=ep.threshold if ep.has_teacher else None,  # its /v1/models: the threshold it is served at
        )
        sw["split"] = split
        sw["student_source"] = m.student_via.get(ep.name, "chat answers as served")
        out[ep.name] = sw
    return out


def _ceiling_fractions(rows: list[dict[str, Any]], ceilings: list[dict[str, Any]]) -> None:
    for r in rows:
        r["ceiling_tokens_per_s"] = r["ceiling_fraction"] = None
        for c in ceilings:
            if r["name"] not in c["names"] or r["concurrency"] is None:
                continue
            lv = next((x for x in c["levels"] if x["concurrency"] == r["concurrency"]), None)
            if lv and lv["decode_tokens_per_s"] and r["output_tokens_per_s"] is not None:
                r["ceiling_tokens_per_s"] = lv["decode_tokens_per_s"]
                r["ceiling_fraction"] = sig(r["output_tokens_per_s"] / lv["decode_tokens_per_s"], 4)


def _token_notes(rows: list[dict[str, Any]], notes: list[str]) -> None:
    """One note per endpoint whose token counts come from chunks, whose chunks and usage differ, or
    whose 200 answers were empty."""
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        n = sum(r["requests"] for r in mine)
        if any(r["output_tokens_source"] in ("chunks", "mixed") for r in mine):
            notes.append(f"{name}: the server sent no usage in its stream: output tokens are counted as text chunks")
        bad = sum(r["token_count_mismatches"] for r in mine)
        if bad:
            notes.append(
                f"{name}: {bad} of {n} answers came in fewer text chunks than their usage counts (a stream held until the "
                "cascade decided, or a server that ignores stream=true, sends the answer in one chunk): those have no ITL "
                "or TPOT, and their TTFT is the time to the whole answer"
            )
        empty = sum(r["empty_answers"] for r in mine)
        if empty:
            notes.append(
                f"{name}: {empty} of {n} answers were empty (HTTP 200 without any text; e.g. llama_cpp.server ends a "
                "running stream when another request waits, unless started with --interrupt_requests false): they count "
                "as answered requests and as wrong answers"
            )
