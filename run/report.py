"""`DIR/report.json` and `report.md` of `edgedistill run`: every stage summarised for scripts and CI.

Built only from what the stages wrote (``distill.json``, ``artifacts/compress.json``,
``bench/report.json``), so it can be rebuilt at any time without rerunning anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgedistill.run.prediction import predicted_cascade, prediction_check, prediction_markdown

from edgedistill.intervals import ALPHA, fmt_ci, fmt_difference, fmt_p
from edgedistill.spec import TaskSpec

MODEL_KEYS = ("teacher", "student", "undistilled student")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _c1(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The endpoint's lowest-concurrency closed-loop row (the single-user numbers)."""
    mine = [r for r in rows if r["name"] == name and r.get("concurrency")]
    return min(mine, key=lambda r: r["concurrency"]) if mine else None


def build_report(spec: TaskSpec, out: Path, state: dict[str, Any]) -> dict[str, Any]:
    metric = spec.task.metric
    distill = _load(out / "distill.json") or {}
    compress = _load(out / "artifacts" / "compress.json") or {}
    bench = _load(out / "bench" / "report.json") or {}
    rows = bench.get("results") or []
    quality = bench.get("quality") or {}

    rep: dict[str, Any] = {
        "schema": "edgedistill.run/1",
        "task": {"name": spec.name, "type": spec.type, "metric": metric, "labels": spec.labels},
    }
    ev = distill.get("eval") or {}
    for key in MODEL_KEYS:
        if key in ev:
            m = ev[key]
            rep[key.replace("undistilled student", "undistilled")] = {
                "params": m.get("params"), "accuracy": m.get("accuracy", m.get(metric)),
                "accuracy_ci": m.get("accuracy_ci", m.get(f"{metric}_ci")), metric: m.get(metric),
                **{k: v for k, v in m.items() if k not in ("params", "accuracy", "accuracy_ci", metric) and _kept(k, v)},
            }

    arts = []
    for a in compress.get("artifacts", []):
        row = _c1(rows, a["name"])
        served = quality.get(a["name"]) or {}
        arts.append({
            "name": a["name"], "format": a["format"], "bits": a["bits"], "path": a.get("path"), "size_mb": a.get("size_mb"),
            "accuracy": a.get(metric), "accuracy_ci": a.get(f"{metric}_ci"), "n": a.get("n"),
            "drop_vs_fp": a.get("drop"), "drop_vs_fp_ci": a.get("drop_ci"), "drop_vs_fp_p_value": a.get("drop_p_value"),
            "drop_vs_fp_test": a.get("drop_test"), "token_agreement": a.get("token_agreement"),
            "tokens_per_s": row["output_tokens_per_s"] if row else a.get("tokens_per_s"),
            "tokens_per_s_basis": "served, concurrency 1" if row else "in-process decode (compress)",
            "decode_tokens_per_s": a.get("tokens_per_s"), "passed_gate": a.get("passed"), "error": a.get("error"),
            "served_accuracy": served.get(metric), "served_accuracy_ci": served.get(f"{metric}_ci"), "served_n": served.get("n"),
            "latency_ms_p50": row["latency_ms"]["p50"] if row else None,
            "cost_per_1k_usd": row.get("cost_per_1k_usd") if row else None,
            "calibration": _calibration(a),
            **_type_metrics(spec, a),
        })
    rep["artifacts"] = arts
    qt = quantized_teacher_rows(out, rows, quality, metric, rep.get("teacher"), spec.task.metrics)
    if qt:
        rep["quantized_teacher"] = qt

    cas = _c1(rows, "cascade")
    sweep = (bench.get("cascade") or {}).get("cascade")
    if cas is not None or sweep:
        from edgedistill.run.servers import cascade_row, cascade_threshold
        from edgedistill.serve.settings import threshold_note

        q = quality.get("cascade") or {}
        served_row = cascade_row(spec, [a for a in compress.get("artifacts", []) if a.get("passed")])
        threshold, source = cascade_threshold(spec, served_row)
        cal = (served_row or {}).get("calibration") or {}
        note = threshold_note(source, cal)
        rep["cascade"] = {
            "artifact": served_row["name"] if served_row else spec.bench.cascade_artifact,
            "threshold": threshold,
            "threshold_source": source,
            # False: the recommended target was out of reach on the calibration split (edgedistill.thresholds' rule)
            "target_met": (cal.get("recommended") or {}).get("met") if source.startswith("recommended") else None,
            "threshold_note": note,
            "accuracy": q.get(metric),
            "accuracy_ci": q.get(f"{metric}_ci"),
            "n": q.get("n"),
            "fallback_rate": q.get("fallback_rate"),
            "fallback_rate_ci": q.get("fallback_rate_ci"),
            "vs_teacher": q.get("vs_teacher"),
            "cost_per_1k_usd": cas.get("cost_per_1k_usd") if cas else None,
            "latency_ms_p50": cas["latency_ms"]["p50"] if cas else None,
            "recommended": ({"threshold": sweep["chosen"]["threshold"], "target_accuracy": sweep["target_accuracy"],
                             "on_test": sweep["chosen"]["test"], "split": sweep.get("split")} if sweep else None),
            **_type_metrics(spec, q),
        }
        teacher_acc = (rep.get("teacher") or {}).get(metric)
        predicted = predicted_cascade((served_row or {}).get("calibration"), threshold, teacher_acc, metric)
        rep["cascade"]["predicted"] = predicted
        rep["cascade"] |= prediction_check(predicted, rep["cascade"])
    t = _c1(rows, "teacher")
    if t is not None and "teacher" in rep:
        rep["teacher"]["served_accuracy"] = (quality.get("teacher") or {}).get(metric)
        rep["teacher"]["served_accuracy_ci"] = (quality.get("teacher") or {}).get(f"{metric}_ci")
        rep["teacher"]["cost_per_1k_usd"] = t.get("cost_per_1k_usd")
        rep["teacher"]["latency_ms_p50"] = t["latency_ms"]["p50"]
    rep["bench_report"] = str(out / "bench" / "report.json") if bench else None
    rep["pareto_png"] = str(out / "pareto.png") if (out / "bench" / "pareto.png").exists() else None
    rep["stages"] = {k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in state.get("stages", {}).items()}
    return rep


def _calibration(a: dict[str, Any]) -> dict[str, Any] | None:
    """An artifact's confidence calibration as the report shows it: the method, and the ECE on the
    TEST split before and after (compress fitted it on the calibration split); None: not calibrated."""
    cal = a.get("calibration")
    if not cal or a.get("ece_before") is None:
        return None
    return {"method": cal.get("method"), "ece_before": a["ece_before"], "ece_after": a.get("ece_after"),
            "n": (cal.get("test") or {}).get("n"), "temperature": cal.get("temperature"),
            "recommended_threshold": (cal.get("recommended") or {}).get("threshold")}  # fmt: skip


def quantized_teacher_rows(
    out: Path, rows: list[dict[str, Any]], quality: dict[str, Any], metric: str, teacher: dict[str, Any] | None,
    type_metrics: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The baseline "why not just quantize the teacher?": the teacher in the student's 4-bit GGUF
    format (``teacher_artifacts/compress.json``), gated against the FP teacher and served like the others."""
    from edgedistill.run.servers import QUANTIZED_TEACHER

    compress = _load(out / "teacher_artifacts" / "compress.json") or {}
    out_rows = []
    for a in compress.get("artifacts", []):
        name = QUANTIZED_TEACHER.format(a["name"])
        row = _c1(rows, name)
        out_rows.append({
            "name": name, "format": a["format"], "bits": a["bits"], "path": a.get("path"), "size_mb": a.get("size_mb"),
            "params": (teacher or {}).get("params"), "accuracy": a.get(metric), metric: a.get(metric),
            "accuracy_ci": a.get(f"{metric}_ci"), "n": a.get("n"),
            "drop_vs_teacher": a.get("drop"), "drop_vs_teacher_ci": a.get("drop_ci"), "drop_vs_teacher_p_value": a.get("drop_p_value"),
            "drop_vs_teacher_test": a.get("drop_test"), "token_agreement": a.get("token_agreement"), "error": a.get("error"),
            "served_accuracy": (quality.get(name) or {}).get(metric), "served_accuracy_ci": (quality.get(name) or {}).get(f"{metric}_ci"),
            "tokens_per_s": row["output_tokens_per_s"] if row else a.get("tokens_per_s"),
            "latency_ms_p50": row["latency_ms"]["p50"] if row else None,
            "cost_per_1k_usd": row.get("cost_per_1k_usd") if row else None,
            **{k: a[k] for m in type_metrics for k in (m, f"{m}_ci") if k in a},
        })  # fmt: skip
    return out_rows


def _kept(key: str, value: Any) -> bool:
    """A model's eval field report.json carries: numbers and strings, intervals, the paired test."""
    return not isinstance(value, dict | list) or key.endswith("_ci") or key == "vs_teacher"


def _type_metrics(spec: TaskSpec, scores: dict[str, Any]) -> dict[str, Any]:
    """The task type's metrics under their names, with their intervals (e.g. ``slot_f1``, ``exact_match``)."""
    return {k: scores[k] for m in spec.task.metrics for k in (m, f"{m}_ci") if k in scores}


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _drop(a: dict[str, Any], key: str = "drop_vs_fp") -> str:
    """An artifact's change (``key``: its drop vs the FP student, or ``drop_vs_teacher``) as the
    tables show it, artifact minus reference, so a loss reads negative, with its interval and
    p-value (``-0.005 (-0.02–+0.01), p 0.5``)."""
    if a.get(key) is None:
        return "-"
    p = a.get(f"{key}_p_value")
    ci = a.get(f"{key}_ci")
    return fmt_ci(-a[key], [-ci[1], -ci[0]] if ci else None, sign="+") + ("" if p is None else f", {fmt_p(p)}")


def noise_line(rep: dict[str, Any]) -> str:
    """Which differences are within noise: the students vs the teacher, the artifacts vs the FP
    student, the quantized teacher vs the teacher (paired tests on the same rows; p >= 0.05 is
    noise). Empty without any test."""
    tests = [(f"{k} vs teacher", rep[k]["vs_teacher"].get("p_value")) for k in ("student", "undistilled")
             if (rep.get(k) or {}).get("vs_teacher")]
    tests += [(f"{a['name']} vs FP", a.get("drop_vs_fp_p_value")) for a in rep.get("artifacts", [])]
    tests += [(f"{a['name']} vs teacher", a.get("drop_vs_teacher_p_value")) for a in rep.get("quantized_teacher") or []]
    tests = [(what, p) for what, p in tests if p is not None]
    if not tests:
        return ""
    quiet = [w for w, p in tests if p >= ALPHA]
    real = [w for w, p in tests if p < ALPHA]
    parts = ([f"within noise: {', '.join(quiet)}"] if quiet else []) + ([f"a real difference: {', '.join(real)}"] if real else [])
    return f"Paired tests on the same rows (p >= {ALPHA:g} is noise): {'; '.join(parts)}."


def report_markdown(rep: dict[str, Any]) -> str:
    metric = rep["task"]["metric"]
    lines = [f"# {rep['task']['name']}: from teacher to edge\n", "## Models (held-out test set)\n",
             f"| model | params | {metric} (95 % interval) | vs teacher | agreement with teacher | n |", "|---|---|---|---|---|---|"]
    for key in ("teacher", "student", "undistilled"):
        m = rep.get(key)
        if m:
            params = f"{m['params'] / 1e6:.1f}M" if m.get("params") else "-"
            lines.append(f"| {key} | {params} | {fmt_ci(m.get(metric), m.get(f'{metric}_ci'))} | {fmt_difference(m.get('vs_teacher'))} "
                         f"| {_f(m.get('agreement_with_teacher'))} | {m.get('n', '-')} |")
    lines += ["", "## Artifacts\n",
              (f"| artifact | bits | MB | {metric} (95 % interval) | change vs FP | token agreement | tokens/s | p50 latency ms | $ per 1k "
              "| ECE before → after calibration | gate |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in rep.get("artifacts", []):
        gate = "ERROR" if a.get("error") else ("pass" if a.get("passed_gate") else "FAIL")
        cal = a.get("calibration")
        ece = f"{cal['ece_before']:.3f} → {_f(cal.get('ece_after'))}" if cal else "-"
        lines.append(f"| {a['name']} | {a['bits']} | {_f(a.get('size_mb'), '.1f')} | {fmt_ci(a.get('accuracy'), a.get('accuracy_ci'))} | {_drop(a)} "
                     f"| {_f(a.get('token_agreement'))} | {_f(a.get('tokens_per_s'), '.0f')} | {_f(a.get('latency_ms_p50'), '.0f')} "
                     f"| {_f(a.get('cost_per_1k_usd'), '.4f')} | {ece} | {gate} |")
    if any(a.get("calibration") for a in rep.get("artifacts", [])):
        lines += ["", ("ECE: calibration error of each artifact's confidence on the test split, uncalibrated → with the temperature "
                  "compress fitted on the calibration split (teacher-labelled distillation data held out of training).")]
    qt = rep.get("quantized_teacher") or []
    if qt:
        lines += ["", "## Baseline: the teacher quantized\n",
                  f"| model | bits | MB | {metric} (95 % interval) | change vs teacher | p50 latency ms | $ per 1k |", "|---|---|---|---|---|---|---|"]
        for a in qt:
            lines.append(f"| {a['name']} | {a['bits']} | {_f(a.get('size_mb'), '.1f')} | {fmt_ci(a.get('accuracy'), a.get('accuracy_ci'))} "
                         f"| {_drop(a, 'drop_vs_teacher')} "
                         f"| {_f(a.get('latency_ms_p50'), '.0f')} | {_f(a.get('cost_per_1k_usd'), '.4f')} |")
    note = noise_line(rep)
    if note:
        lines += ["", note]
    c = rep.get("cascade")
    if c:
        on_rows = "" if c.get("n") is None else f" on {c['n']} rows"
        lines += ["", "## Cascade\n",
                  (f"Served: {c['artifact']} with the teacher behind it at threshold {c['threshold']} ({c.get('threshold_source', 'spec')}): {metric} "
                  f"{fmt_ci(c.get('accuracy'), c.get('accuracy_ci'))}, fallback rate {fmt_ci(c.get('fallback_rate'), c.get('fallback_rate_ci'))}"
                  f"{on_rows}, ${_f(c.get('cost_per_1k_usd'), '.4f')} per 1k requests, "
                  f"p50 latency {_f(c.get('latency_ms_p50'), '.0f')} ms.")]
        if c.get("threshold_note"):
            lines.append(f"\n{c['threshold_note'][0].upper()}{c['threshold_note'][1:]}.")
        lines += prediction_markdown(c, metric)
        r = c.get("recommended")
        if r:
            lines.append(f"\nThe bench's own sweep would pick threshold {r['threshold']} (target {metric} {r['target_accuracy']}; {r['split']}): "
                         f"{metric} {fmt_ci(r['on_test'].get('accuracy'), r['on_test'].get('accuracy_ci'))}, fallback rate "
                         f"{fmt_ci(r['on_test'].get('fallback_rate'), r['on_test'].get('fallback_rate_ci'))} on {r['on_test'].get('n', '-')} rows.")
    lines += ["", "## Stages\n", "| stage | seconds | status |", "|---|---|---|"]
    for name, s in rep.get("stages", {}).items():
        lines.append(f"| {name} | {_f(s.get('seconds'), '.0f')} | {s.get('status')} |")
    if rep.get("bench_report"):
        lines += ["", f"Full benchmark: `{rep['bench_report']}` (tables in `bench/report.md`); plot: `pareto.png`."]
    return "\n".join(lines) + "\n"
