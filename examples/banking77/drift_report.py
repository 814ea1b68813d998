"""The drift scenario's numbers (``drift.py``): each phase's /metrics scrape (what an operator
sees live) beside the truth on the same traffic (the known intents, and the teacher asked for
every row), and ``RUN/drift/report.json`` + ``report.md``.

Pure functions of what ``drift.py`` collected, so a test builds a report from fake scrapes.

A phase is a dict: ``name`` (before, during, after), ``set`` (the traffic set), ``artifact``,
``metrics`` (the /metrics text scraped when the phase's traffic log had a record for every
request, i.e. every shadow check had ended), ``answers`` (per request: ``label``, the ``served``
answer, ``answered_by``, ``latency_s``, the ``teacher``'s own answer and ``teacher_latency_s``).

Cost per 1k requests, on the spec's machine price (``bench.machine_usd_per_hour``; the teacher is
served on the same machine): every request costs the student's machine time (the mean latency of
the requests the student answered, one request at a time), each teacher call (fallbacks and
shadow checks alike) the teacher's (the mean latency of the direct teacher requests):
``bench.cost.cascade_cost_per_1k(student, teacher calls / n, teacher)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from edgedistill.bench.cost import cascade_cost_per_1k, local_cost_per_1k, sig

from edgedistill.intervals import fmt_ci, mcnemar_exact, newcombe_paired_interval, outward, proportion_ci
from edgedistill.thresholds import choose_threshold, fallback_mask, quality_and_rate

PHASES = ("before", "during", "after")
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Metrics = dict[tuple[str, frozenset], float]


def parse_metrics(text: str) -> Metrics:
    """Prometheus' text format as ``{(name, frozenset(labels.items())): value}``."""
    out: Metrics = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if line.startswith("#") or not m:
            continue
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """One series' value (None: not exported; NaN stays NaN: the server had nothing to say)."""
    return metrics.get((name, frozenset(labels.items())))


def total(metrics: Metrics, name: str, **match: str) -> float:
    """The sum over a metric's series whose labels include ``match``."""
    want = set(match.items())
    return sum(v for (n, labels), v in metrics.items() if n == name and want <= labels)


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else v


def _share(k: int, n: int) -> dict[str, Any]:
    return {"value": k / n if n else None, "ci": proportion_ci(k, n) if n else None, "k": k, "n": n}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(phase: dict[str, Any], same: Callable[[Any, Any], bool], usd_per_hour: float) -> dict[str, Any]:
    """One row of the report: the live numbers from the scrape, the truth from the answers."""
    m = parse_metrics(phase["metrics"])
    answers = phase["answers"]
    n = len(answers)
    fallbacks = int(total(m, "edgedistill_fallbacks_total"))
    shadow = {o: int(total(m, "edgedistill_shadow_requests_total", outcome=o)) for o in ("compared", "failed", "dropped", "cancelled")}
    teacher_calls = fallbacks + shadow["compared"] + shadow["failed"]
    student_s = _mean([a["latency_s"] for a in answers if a["answered_by"] == "student"]) or _mean([a["latency_s"] for a in answers])
    teacher_s = _mean([a["teacher_latency_s"] for a in answers if a.get("teacher_latency_s") is not None])
    student_cost = local_cost_per_1k(usd_per_hour, 1 / student_s) if student_s else None
    teacher_cost = local_cost_per_1k(usd_per_hour, 1 / teacher_s) if teacher_s else None
    est = [_num(value(m, "edgedistill_shadow_agreement", bound=b)) for b in ("estimate", "low", "high")]
    asked = [a for a in answers if a.get("teacher") is not None]
    return {
        "phase": phase["name"],
        "traffic": phase["set"],
        "artifact": phase["artifact"],
        "n": n,
        "drift_score": _num(value(m, "edgedistill_confidence_drift")),
        "live_agreement": {"estimate": est[0], "ci": est[1:] if est[1] is not None else None, "shadow_checks": shadow["compared"]},
        "true_agreement": {**_share(sum(same(a["served"], a["teacher"]) for a in asked), len(asked)), "teacher_unanswered": n - len(asked)},
        "live_fallback_rate": _num(value(m, "edgedistill_fallback_rate")),
        "fallback_rate": _share(fallbacks, n),
        "accuracy": _share(sum(same(a["served"], a["label"]) for a in answers), n),
        "answered_by_teacher": sum(a["answered_by"] == "teacher" for a in answers),
        "teacher_calls": {"total": teacher_calls, "fallbacks": fallbacks, "shadow": shadow["compared"] + shadow["failed"], **{f"shadow_{k}": v for k, v in shadow.items()}},
        "cost_per_1k_usd": sig(cascade_cost_per_1k(student_cost, teacher_calls / n if n else 0.0, teacher_cost)),
        "cost_basis": {"usd_per_hour": usd_per_hour, "student_s_per_request": student_s, "teacher_s_per_request": teacher_s,
                       "student_cost_per_1k_usd": sig(student_cost), "teacher_cost_per_1k_usd": sig(teacher_cost)},
        "traffic_log_records": int(total(m, "edgedistill_traffic_log_records_total")),
        "shadow_truth": shadow_truth(phase, same),
    }


def shadow_truth(phase: dict[str, Any], same: Callable[[Any, Any], bool]) -> dict[str, Any] | None:
    """Where the live estimate's error comes from: the shadow-checked requests' verdicts (from the
    traffic log, ``shadow_agrees``) beside the truth on those same requests (the teacher asked
    directly) and on every answer the student gave. ``verdicts_differ`` counts requests where the
    shadow check and the direct question disagree (a teacher that answers the same input two ways);
    with none, a gap between the sample and all the student's answers is the sample's noise."""
    by_id = {a.get("request_id"): a for a in phase["answers"]}
    pairs = [(r, by_id.get(r.get("request_id"))) for r in phase.get("log") or [] if r.get("shadow") and r.get("shadow_agrees") is not None]
    pairs = [(bool(r["shadow_agrees"]), same(a["served"], a["teacher"])) for r, a in pairs if a is not None and a.get("teacher") is not None]
    student = [a for a in phase["answers"] if a["answered_by"] == "student" and a.get("teacher") is not None]
    if not pairs:
        return None
    return {"n": len(pairs), "shadow_agrees": _share(sum(v for v, _ in pairs), len(pairs)),
            "direct_agrees": _share(sum(t for _, t in pairs), len(pairs)), "verdicts_differ": sum(v != t for v, t in pairs),
            "all_student_answers": _share(sum(same(a["served"], a["teacher"]) for a in student), len(student))}


def _side(answers: list[dict[str, Any]], teacher_ok: list[bool], threshold: float, same: Callable[[Any, Any], bool]) -> dict[str, Any]:
    ok = [same(a.get("student"), a["label"]) for a in answers]
    conf = [a.get("confidence") for a in answers]
    acc, rate = quality_and_rate(threshold, ok, conf, teacher_ok)
    return {"ok": ok, "conf": conf, "student_accuracy": _share(sum(ok), len(ok)),
            "served": {"threshold": threshold, "fallback_rate": rate, "accuracy": acc}}


def same_rows(after: dict[str, Any], old: dict[str, Any], same: Callable[[Any, Any], bool]) -> dict[str, Any]:
    """The old and the new artifact on the same fresh rows (the new one's answers from the after
    phase, the old one's from a student-alone pass over the same rows), replayed offline against the
    teacher asked directly and the known intents: each one's student alone, each at its served
    threshold, and the old one at the cheapest threshold reaching the new cascade's accuracy on
    these rows (chosen on these very rows: the old one's best case). ``fallback_difference``: new
    minus that, paired per row (Newcombe interval, exact McNemar)."""
    new_a, old_a = after["answers"], old["answers"]
    if [a["label"] for a in new_a] != [a["label"] for a in old_a]:
        raise ValueError("the old artifact's pass is not over the after phase's rows")
    teacher_ok = [a.get("teacher") is not None and same(a["teacher"], a["label"]) for a in new_a]
    n = len(new_a)
    new, prev = _side(new_a, teacher_ok, float(after["threshold"]), same), _side(old_a, teacher_ok, float(old["threshold"]), same)
    th, met = choose_threshold(prev["ok"], prev["conf"], teacher_ok, new["served"]["accuracy"], finite_sample=False)
    acc, rate = quality_and_rate(th, prev["ok"], prev["conf"], teacher_ok)
    fb_new = fallback_mask(new["served"]["threshold"], new["conf"], n)
    fb_old = fallback_mask(th, prev["conf"], n)
    both = sum(x and y for x, y in zip(fb_new, fb_old))
    b, c = sum(x and not y for x, y in zip(fb_new, fb_old)), sum(y and not x for x, y in zip(fb_new, fb_old))

    def public(side: dict[str, Any], artifact: str) -> dict[str, Any]:
        return {"artifact": artifact, "student_accuracy": side["student_accuracy"], "served": side["served"]}

    return {"set": after["set"], "n": n, "teacher_accuracy": _share(sum(teacher_ok), n),
            "old": {**public(prev, old["artifact"]), "at_new_accuracy": {"threshold": th, "fallback_rate": rate, "accuracy": acc, "met": met}},
            "new": public(new, after["artifact"]),
            "fallback_difference": {"diff": round((b - c) / n, 4) if n else None,
                                    "ci": outward(*newcombe_paired_interval(both, b, c, n - both - b - c)), "p_value": float(f"{mcnemar_exact(b, c):.4g}")}}


def checks(rows: dict[str, dict[str, Any]], promoted: bool | None, sr: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """What the scenario is meant to show, each as measured (true or false, never assumed)."""
    b, d, a = (rows.get(p) for p in PHASES)
    out = []

    def add(what: str, ok: bool | None, detail: str) -> None:
        out.append({"check": what, "ok": ok, "detail": detail})

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    if b and d:
        add("the drift score rises during the drifted traffic", _gt(d["drift_score"], b["drift_score"]),
            f"{f(b['drift_score'])} -> {f(d['drift_score'])}")
        add("the fallback rate rises", _gt(d["fallback_rate"]["value"], b["fallback_rate"]["value"]),
            f"{f(b['fallback_rate']['value'])} -> {f(d['fallback_rate']['value'])}")
    add("the re-distilled student is promoted", promoted, {True: "promoted", False: "not promoted", None: "no retrain"}[promoted])
    if d and a:
        add("on fresh traffic of the same style the served fallback rate falls (during -> after, each at its served threshold)",
            _gt(d["fallback_rate"]["value"], a["fallback_rate"]["value"]), f"{f(d['fallback_rate']['value'])} -> {f(a['fallback_rate']['value'])}")
        da, aa = d["accuracy"], a["accuracy"]
        add("at equal or better cascade accuracy (after >= during, or within noise: the intervals overlap)",
            None if da["value"] is None or aa["value"] is None else aa["value"] >= da["value"] or aa["ci"][1] >= da["ci"][0],
            f"{f(da['value'])} -> {f(aa['value'])}")
    if sr:
        o, nw = sr["old"]["at_new_accuracy"], sr["new"]["served"]
        add("on the same fresh rows, at the new cascade's accuracy, the new student falls back less than the old one would",
            nw["fallback_rate"] < o["fallback_rate"] or not o["met"],
            f"old {f(o['fallback_rate'])} (accuracy {f(o['accuracy'])}{'' if o['met'] else ', never reaches it'}) vs new "
            f"{f(nw['fallback_rate'])} (accuracy {f(nw['accuracy'])})")
    return out


def _gt(x: float | None, y: float | None) -> bool | None:
    return None if x is None or y is None else x > y


def build_report(phases: list[dict[str, Any]], same: Callable[[Any, Any], bool], usd_per_hour: float, **meta: Any) -> dict[str, Any]:
    """report.json: the phases' rows, the checks, and what ``meta`` says (traffic, retrain, servers)."""
    old = meta.pop("old_on_fresh", None)
    rows = {p["name"]: summarize(p, same, usd_per_hour) for p in phases}
    retrain = meta.get("retrain") or {}
    promoted = retrain.get("promoted") if retrain else None
    after = next((p for p in phases if p["name"] == "after"), None)
    sr = same_rows(after, old, same) if old and after else None
    return {"schema": "edgedistill.drift/1", **meta, "phases": [rows[p] for p in PHASES if p in rows], "same_rows": sr,
            "checks": checks(rows, promoted, sr)}


def _ci(share: dict[str, Any]) -> str:
    return "-" if share.get("value") is None else fmt_ci(share["value"], share["ci"])


def _live(row: dict[str, Any]) -> str:
    la = row["live_agreement"]
    return "-" if la["estimate"] is None else fmt_ci(la["estimate"], la["ci"])


def shadow_markdown(phases: list[dict[str, Any]]) -> list[str]:
    rows = [(r["phase"], r["shadow_truth"]) for r in phases if r.get("shadow_truth")]
    if not rows:
        return []
    out = ["## Shadow checks against the truth", "",
           ("| phase | shadow-checked requests | their verdicts (traffic log) | the truth on the same requests | verdicts that differ "
           "| the truth on every student answer |"), "|---|---|---|---|---|---|"]
    for name, t in rows:
        out.append(f"| {name} | {t['n']} | {_ci(t['shadow_agrees'])} | {_ci(t['direct_agrees'])} | {t['verdicts_differ']} "
                   f"| {_ci(t['all_student_answers'])} (n={t['all_student_answers']['n']}) |")
    out += ["", ("The live estimate is the teacher's share plus the student's share times the shadow verdicts' agreement. Where "
                 "no verdict differs from the direct question, a gap between the sample and every student answer is the sample's "
                 "noise (the interval says how much to expect)."), ""]
    return out


def same_rows_markdown(sr: dict[str, Any] | None) -> list[str]:
    if not sr:
        return []
    o, nw = sr["old"], sr["new"]
    oa = o["at_new_accuracy"]
    d = sr["fallback_difference"]

    def point(x: dict[str, Any]) -> str:
        return f"{x['fallback_rate']:.3f} / {x['accuracy']:.3f} (threshold {x['threshold']:.3f})"

    return ["## The old and the new artifact on the same fresh rows", "",
            (f"{sr['n']} `{sr['set']}` rows, replayed offline (each student's own answer and confidence, the teacher asked directly, "
            f"the known intents; teacher alone {_ci(sr['teacher_accuracy'])})."), "",
            "| artifact | student alone: accuracy [95 %] | at its served threshold: fallback / cascade accuracy | at the new cascade's accuracy: fallback / accuracy |",
            "|---|---|---|---|",
            f"| old {o['artifact']} | {_ci(o['student_accuracy'])} | {point(o['served'])} | {point(oa)}{'' if oa['met'] else ' (never reaches it)'} |",
            f"| new {nw['artifact']} | {_ci(nw['student_accuracy'])} | {point(nw['served'])} | {point(nw['served'])} |", "",
            (f"Fallback at equal accuracy, new minus old: {fmt_ci(d['diff'], d['ci'], sign='+')}, exact McNemar p {d['p_value']:.2g} "
             "(paired per row). The old artifact's threshold there is chosen on these very rows, its best case; the new one's "
             "is the one it was served at."), ""]


def report_markdown(rep: dict[str, Any]) -> str:
    t = rep.get("traffic") or {}
    lines = [f"# Drift scenario: {rep.get('task', '')}", "",
             (f"Traffic: {t.get('source', '')}; style: {t.get('style', '')} (seed {t.get('seed', '-')}). "
             f"Served by `{rep.get('cascade_command', 'edgedistill serve')}`."), "",
             ("| phase | traffic | artifact | n | drift score (PSI) | live agreement estimate [95 %] | true agreement [95 %] "
             "| fallback rate [95 %] | cascade accuracy [95 %] | teacher calls (fallback + shadow) | $ per 1k |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["phases"]:
        drift = "-" if r["drift_score"] is None else f"{r['drift_score']:.3f}"
        cost = "-" if r["cost_per_1k_usd"] is None else f"{r['cost_per_1k_usd']:.4f}"
        tc = r["teacher_calls"]
        lines.append(f"| {r['phase']} | {r['traffic']} | {r['artifact']} | {r['n']} | {drift} | {_live(r)} | {_ci(r['true_agreement'])} "
                     f"| {_ci(r['fallback_rate'])} | {_ci(r['accuracy'])} | {tc['total']} ({tc['fallbacks']} + {tc['shadow']}) | {cost} |")
    lines += ["", ("Live: scraped from the cascade's /metrics at the end of each phase (`edgedistill_confidence_drift`, "
              "`edgedistill_shadow_agreement{bound}`, `edgedistill_fallback_rate`; each phase is served by a fresh process, so its "
              "windows hold that phase only). Truth: the served answers against the train split's intents (accuracy) and against "
              "the teacher asked for every row directly (agreement). Cost: the machine's price times the student's time per request, "
              "plus the teacher's time per call for every teacher call (fallbacks and shadow checks)."), ""]
    lines += shadow_markdown(rep["phases"]) + same_rows_markdown(rep.get("same_rows"))
    r = rep.get("retrain")
    if r:
        lines += ["## Re-distillation", "", (f"`{r.get('command', '')}`: **{ {True: 'PROMOTED', False: 'NOT PROMOTED'}.get(r.get('promoted'), 'NO RETRAIN')}** "
                  f"({r.get('reason', '')}); see {r.get('report', '-')}."), ""]
        if r.get("note"):
            lines += [r["note"], ""]
    lines += ["## Checks", ""]
    lines += [f"- {'yes' if c['ok'] else 'no' if c['ok'] is False else 'unknown'}: {c['check']} ({c['detail']})" for c in rep["checks"]]
    return "\n".join(lines) + "\n"
