"""``report.json`` (everything, machine-readable) and ``report.md`` (the same as tables)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgedistill.bench.plot import row_label

from edgedistill.intervals import fmt_ci, fmt_difference, fmt_p, within_noise


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(d: dict[str, float] | None, keys=("p50", "p90", "p99"), digits: int = 1) -> str:
    return "-" if not d else " / ".join(_f(d[k], digits) for k in keys)


def _money(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _share(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _share_ci(ci: list[float] | None) -> str:
    return "" if not ci else f" ({100 * ci[0]:.1f}–{100 * ci[1]:.1f} %)"


def write_json(report: dict[str, Any], out: Path) -> Path:
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_table(rows: list[dict[str, Any]], metric: str = "accuracy") -> list[str]:
    lines = [
        (
            "| endpoint | load | ok / sent | errors | latency p50 / p90 / p99 ms | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms "
            f"| TPOT p50 ms | output tok/s | req/s | $ / 1k req | {metric} | teacher share | of ceiling |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        errs = str(r["errors"]) + (f" ({', '.join(f'{k}: {v}' for k, v in r['error_kinds'].items())})" if r["errors"] else "")
        load = f"c={r['concurrency']}" if r["concurrency"] is not None else f"{r['rate']:g} req/s (Poisson)"
        lines.append(
            f"| {r['name']} | {load} | {r['requests']} / {r['sent']} | {errs} | {_pct(r['latency_ms'])} | {_pct(r['ttft_ms'])} "
            f"| {_pct(r['itl_ms'], digits=2)} | {_f((r['tpot_ms'] or {}).get('p50'), 2)} | {_f(r['output_tokens_per_s'])} "
            f"| {_f(r['requests_per_s'], 2)} | {_money(r['cost_per_1k_usd'])} | {fmt_ci(r['accuracy'], r.get('accuracy_ci'))} | {_share(r['fallback_rate'])} "
            f"| {_share(r['ceiling_fraction'])} |"
        )
    return lines


def quality_table(quality: dict[str, dict[str, Any]]) -> list[str]:
    """One row per endpoint: the task's primary metric (its ``metric``) with its 95 % interval first,
    then its other metrics, the difference from the teacher (a paired test), and a line saying which
    differences are within noise."""
    metric = next((q.get("metric") for q in quality.values() if q.get("metric")), "accuracy")
    lines = [
        f"| endpoint | {metric} | other metrics | {metric} vs teacher | agreement with teacher | teacher share | ECE of served confidence | rows | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    skip = {metric, "n", "errors", "agreement_with_teacher", "fallback_rate", "calibration"}
    for name, q in quality.items():
        other = ", ".join(f"{k} {_f(v, 3)}" for k, v in q.items() if k not in skip and isinstance(v, float))
        cal = q.get("calibration")
        lines.append(
            f"| {name} | {fmt_ci(q.get(metric), q.get(f'{metric}_ci'))} | {other or '-'} | {fmt_difference(q.get('vs_teacher'))} "
            f"| {_f(q['agreement_with_teacher'], 3)} | {_share(q['fallback_rate'])} "
            f"| {_f(cal['ece'], 3) if cal else '-'} | {q['n']} | {q['errors']} |"
        )
    said = [f"{name} {'within noise' if within_noise(q['vs_teacher']) else 'a real difference'} ({fmt_p(q['vs_teacher']['p_value'])})"
            for name, q in quality.items() if q.get("vs_teacher")]
    if said:
        lines += ["", f"In parentheses: 95 % intervals. {metric} vs the teacher on the same rows (paired test): {'; '.join(said)}."]
    return lines


def cascade_section(name: str, sw: dict[str, Any]) -> list[str]:
    ch = sw["chosen"]
    m = sw.get("metric", "accuracy")
    met = "reached" if ch["target_met_on_calibration"] else "NOT reached (the most accurate threshold is shown)"
    met += f"; rule: {sw['threshold_rule']}" if sw.get("threshold_rule") else ""
    lines = [
        f"### Cascade sweep: {name}",
        "",
        f"Split: {sw['split']}. Target {m} {sw['target_accuracy']:.4f} ({sw['target_basis']}), {met} on the calibration split.",
        (
            f"Student's own answers: {sw['student_source']}. Teacher {m} on the test split "
            f"{fmt_ci(sw['teacher_accuracy_test'], sw.get('teacher_accuracy_test_ci'), 4)}, student alone "
            f"{fmt_ci(sw['student_accuracy_test'], sw.get('student_accuracy_test_ci'), 4)}. Cost: student {_money(sw['student_cost_per_1k_usd'])} + "
            f"teacher share x {_money(sw['teacher_cost_per_1k_usd'])} $ / 1k requests."
        ),
        "",
        (
            f"**Chosen threshold {ch['threshold']:.4g}**: on the test split ({ch['test']['n']} rows) {m} "
            f"{fmt_ci(ch['test']['accuracy'], ch['test'].get('accuracy_ci'), 4)}, teacher share "
            f"{_share(ch['test']['fallback_rate'])}{_share_ci(ch['test'].get('fallback_rate_ci'))}, {_money(ch['test']['cost_per_1k_usd'])} $ / 1k requests "
            f"(calibration split: {ch['calibration']['accuracy']:.4f}, {_share(ch['calibration']['fallback_rate'])})."
        ),
        "",
        f"| threshold | {m} (test) | teacher share (test) | $ / 1k req (test) | {m} (calibration) | teacher share (calibration) |",
        "|---|---|---|---|---|---|",
    ]
    for p in sw["sweep"]:
        served = (sw.get("served") or {}).get("threshold")
        marks = [w for w, hit in (("chosen", p["threshold"] == ch["threshold"]), ("served", p["threshold"] == served)) if hit]
        mark = f" **({', '.join(marks)})**" if marks else ""
        lines.append(
            f"| {p['threshold']:.4g}{mark} | {p['test']['accuracy']:.4f} | {_share(p['test']['fallback_rate'])} "
            f"| {_money(p['test']['cost_per_1k_usd'])} | {p['calibration']['accuracy']:.4f} | {_share(p['calibration']['fallback_rate'])} |"
        )
    return lines + [""]


def ceiling_table(ceilings: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | compared with | concurrency | decode tok/s | decode tokens | prefill s |", "|---|---|---|---|---|---|"]
    for c in ceilings:
        for lv in c["levels"]:
            lines.append(
                f"| {c['path']} | {', '.join(c['names'])} | {lv['concurrency']} | {_f(lv['decode_tokens_per_s'])} "
                f"| {lv['decode_tokens']} | {_f(lv['prefill_s'], 3)} |"
            )
    return lines


def write_markdown(report: dict[str, Any], out: Path) -> Path:
    cfg = report["config"]
    lines = [
        "# edgedistill bench",
        "",
        (
            f"{report['created']}, {report['machine']['cpu_count']} CPUs, {report['machine']['platform']}. "
            f"{cfg['requests']} measured requests per load level after {cfg['warmup']} warm-up requests per endpoint; "
            f"greedy, max_tokens {cfg['max_tokens']}, streamed. Task: {cfg['task_name'] or 'none (generic prompts, no accuracy)'}."
        ),
        "",
        "| endpoint | URL | model | price |",
        "|---|---|---|---|",
    ]
    for e in report["endpoints"]:
        p = e["price"]
        price = (
            "-"
            if not p
            else (
                f"{p['usd_per_hour']:g} $/h"
                if p["kind"] == "local"
                else f"{p['input_per_1m']:g} / {p['output_per_1m']:g} $ per 1M in / out tokens"
            )
        )
        role = " (teacher)" if e["name"] == cfg["teacher"] else (" (edgedistill)" if e["edgedistill"] else "")
        if role == " (edgedistill)" and e.get("has_teacher") is not None and e.get("threshold") is not None:
            role = f" (edgedistill, threshold {e['threshold']:g}, {'with a' if e['has_teacher'] else 'no'} teacher)"
        lines.append(f"| {e['name']}{role} | {e['url']} | {e['model']} | {price} |")
    lines += ["", "## Load", ""] + load_table(report["results"], report.get("metric") or "accuracy") + [""]
    if report.get("files", {}).get("latency"):
        lines += ["Latency percentiles and throughput against load, per endpoint: `latency.png`.", ""]
    if report.get("quality"):
        lines += ["## Quality on the test set", ""] + quality_table(report["quality"]) + [""]
        if report.get("files", {}).get("reliability"):
            lines += ["Reliability diagram: `reliability.png`.", ""]
    for name, sw in (report.get("cascade") or {}).items():
        lines += cascade_section(name, sw)
    if report.get("ceiling"):
        lines += ["## Ceiling: in-process decode, no server", ""] + ceiling_table(report["ceiling"]) + [""]
    if report.get("pareto"):
        lines += ["## Pareto frontier", ""]
        for axis, labels in report["pareto"].items():
            lines.append(f"- accuracy vs {axis}: {', '.join(labels) if labels else '-'}")
        lines += ["", "Figure: `pareto.png`.", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def pareto_labels(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The labels of the frontier rows, per axis (what pareto.png marks)."""
    from edgedistill.bench.pareto import frontier

    out = {}
    for axis, key in (
        ("cost", lambda r: r.get("cost_per_1k_usd")),
        ("p50 latency", lambda r: (r.get("latency_ms") or {}).get("p50")),
    ):
        pts = [r for r in rows if key(r) is not None and r.get("accuracy") is not None]
        out[axis] = [row_label(pts[i]) for i in frontier([(key(r), r["accuracy"]) for r in pts])]
    return out
