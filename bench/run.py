"""``edgedistill bench``, top to bottom: discover the endpoints, load them (closed loop per
concurrency, open loop per rate), answer the test set, measure the in-process ceiling, then
costs, cascade sweep, report and figures.

Endpoints are measured one after the other (they usually share the machine); each gets its warm-up
requests first, which no number includes.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import httpx
from edgedistill.bench import cascade, client, load, quality, report, stats
from edgedistill.bench.ceiling import gguf_runner, run_ceiling
from edgedistill.bench.config import BenchConfig, Endpoint, build_config
from edgedistill.bench.cost import cascade_cost_per_1k, own_cost_per_1k, sig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgedistill.intervals import metric_interval

ROW_KEYS = ("name", "mode", "concurrency", "rate", "offered_rate", "sent")

# The student-only pass asks chat with X-Edgedistill-Fallback: off; a server older than that mode
# ignores the header and still lets the teacher answer unsure rows, whose student answers are then unknown.
NO_STUDENT_ONLY = (
    "{name}: the teacher answered {k} of {n} rows of the student-only pass (chat with X-Edgedistill-Fallback: off): "
    "the server predates edgedistill serve's student-only mode and ignored the header, so those rows' student answers "
    "are unknown and count as wrong in the sweep and the calibration; update the server (or serve it with --threshold 0) "
    "for an exact sweep"
)


@dataclass
class Measured:
    rows: list[dict[str, Any]] = field(default_factory=list)
    load_samples: list[list[client.Sample]] = field(default_factory=list)
    served: dict[str, list[client.Sample]] = field(default_factory=dict)  # test set, as served
    student: dict[str, list[client.Sample]] = field(default_factory=dict)  # test set, student's own answers
    student_via: dict[str, str] = field(default_factory=dict)
    student_predict: set[str] = field(default_factory=set)  # endpoints whose student-only passes used /v1/predict
    served_predict: set[str] = field(default_factory=set)  # endpoints whose as-served pass used /v1/predict
    cal_teacher: list[client.Sample] = field(default_factory=list)  # --calibration rows
    cal_student: dict[str, list[client.Sample]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def bench_command(**flags: Any) -> dict[str, Any]:
    """Parse the CLI's flags (see edgedistill.bench.config.build_config), run, write DIR/report.{json,md} and PNGs."""
    return run_bench(build_config(**flags))


def run_bench(cfg: BenchConfig, runner_factory=None) -> dict[str, Any]:
    """Everything; returns the report written to ``cfg.out/report.json``. ``runner_factory(path,
    n_slots, threads)`` builds the ceiling's runner (default: llama.cpp on a GGUF)."""
    console = Console(stderr=True, quiet=not cfg.progress)
    cfg.out.mkdir(parents=True, exist_ok=True)
    test_rows = _test_rows(cfg)
    cal_rows = _calibration_rows(cfg)
    m = asyncio.run(_http_phase(cfg, test_rows, cal_rows))
    ceilings = _ceiling_phase(cfg, test_rows, runner_factory or gguf_runner, console)
    rep = assemble(cfg, m, test_rows, cal_rows, ceilings)
    files = _write(cfg, rep)
    console.print(f"[bold]bench[/bold]: {len(rep['results'])} rows -> " + ", ".join(str(p) for p in files.values()))
    return rep


# ---- inputs -------------------------------------------------------------------------------------


def _test_rows(cfg: BenchConfig) -> list[Any]:
    if cfg.task is None:
        return []
    rows = cfg.spec.load_test_set()
    return rows[: cfg.eval_limit] if cfg.eval_limit else rows


def _calibration_rows(cfg: BenchConfig) -> list[Any]:
    if cfg.calibration is None:
        return []
    from edgedistill.spec import DataSource

    src = DataSource(
        path=cfg.calibration.resolve(), input_field=cfg.spec.test_set.input_field, output_field=cfg.spec.test_set.output_field
    )
    return cfg.spec.model_copy(update={"test_set": src}).load_test_set()


# ---- HTTP: load levels and test-set passes ------------------------------------------------------


def _progress(cfg: BenchConfig) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("errors {task.fields[errors]}"),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not cfg.progress,
    )


def _tracker(prog: Progress, description: str, total: int):
    tid = prog.add_task(description, total=total, errors=0, speed="")
    state = {"errors": 0, "tokens": 0, "t0": None}

    def on_done(s: client.Sample) -> None:
        state["errors"] += not s.ok
        state["tokens"] += s.output_tokens if s.ok else 0
        state["t0"] = s.start if state["t0"] is None else min(state["t0"], s.start)
        dt = s.end - state["t0"]
        speed = f"{state['tokens'] / dt:.1f} tok/s" if dt > 0 else ""
        prog.update(tid, advance=1, errors=state["errors"], speed=speed)

    return on_done


async def _http_phase(cfg: BenchConfig, test_rows: list[Any], cal_rows: list[Any]) -> Measured:
    m = Measured()
    timeout = httpx.Timeout(cfg.timeout_s, connect=min(10.0, cfg.timeout_s))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    inputs = [r.input for r in test_rows]
    pool = max(cfg.concurrency or [4])
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        for ep in cfg.endpoints:
            await client.discover(http, ep)
        with _progress(cfg) as prog:
            for ep in cfg.endpoints:
                await _load_endpoint(cfg, http, ep, inputs, prog, m)
                if cfg.task is not None:
                    await _test_passes(cfg, http, ep, test_rows, cal_rows, pool, prog, m)
    return m


def _sender(cfg: BenchConfig, http: httpx.AsyncClient, ep: Endpoint, inputs: list[str]):
    """Load request ``i``: a task's test rows in a fixed-seed order (``quality.load_order``), else the generic prompts."""
    teacher = ep.name == cfg.teacher
    rf = quality.response_format_for(cfg.task, ep.edgedistill, teacher)
    order = quality.load_order(len(inputs), cfg.seed) if cfg.task is not None else list(range(len(quality.GENERIC_PROMPTS)))

    async def send(i: int) -> client.Sample:
        row = order[i % len(order)]
        messages = quality.prompt_messages(cfg.task, inputs, row, teacher)
        return await client.chat(http, ep, messages, cfg.max_tokens, row, response_format=rf)

    return send


async def _load_endpoint(cfg: BenchConfig, http, ep: Endpoint, inputs: list[str], prog: Progress, m: Measured) -> None:
    send = _sender(cfg, http, ep, inputs)
    if cfg.warmup:
        done = _tracker(prog, f"{ep.name} warm-up", cfg.warmup)
        await load.closed_loop(send, cfg.warmup, max(cfg.concurrency or [1]), done)
    for c in cfg.concurrency:
        samples = await load.closed_loop(send, cfg.requests, c, _tracker(prog, f"{ep.name} c={c}", cfg.requests))
        m.rows.append(
            {"name": ep.name, "mode": "closed", "concurrency": c, "rate": None, "offered_rate": None, "sent": len(samples)}
        )
        m.load_samples.append(samples)
    for k, rate in enumerate(cfg.rates):
        done = _tracker(prog, f"{ep.name} {rate:g} req/s", cfg.requests)
        samples = await load.open_loop(send, cfg.requests, rate, seed=cfg.seed + k, on_done=done)
        arrivals = load.poisson_arrivals(cfg.requests, rate, cfg.seed + k)
        offered = round((len(arrivals) - 1) / float(arrivals[-1]), 4) if arrivals[-1] > 0 else None
        m.rows.append(
            {"name": ep.name, "mode": "open", "concurrency": None, "rate": rate, "offered_rate": offered, "sent": len(samples)}
        )
        m.load_samples.append(samples)
    mine = [s for meta, ss in zip(m.rows, m.load_samples) if meta["name"] == ep.name for s in ss]
    if any(s.answered_by for s in mine):  # a server that does not list itself as edgedistill in /v1/models
        ep.edgedistill = True


async def _test_passes(cfg, http, ep: Endpoint, rows: list[Any], cal_rows: list[Any], pool: int, prog: Progress, m: Measured):
    """Every test row once as served (an edgedistill server with a task: /v1/predict at its own
    threshold, the route and confidence the sweep measures; else chat); for an edgedistill endpoint
    also the student's own answers (student-only mode: the teacher is never called); with
    --calibration, the teacher's and the students' answers to those rows too."""
    teacher = ep.name == cfg.teacher
    if ep.predict and not teacher:
        m.served_predict.add(ep.name)
        m.served[ep.name] = await _predict_pass(http, ep, [r.input for r in rows], pool, prog, "test set", served=True)
    else:
        m.served[ep.name] = await _chat_pass(cfg, http, ep, [r.input for r in rows], pool, prog, "test set")
    if any(s.answered_by for s in m.served[ep.name]):
        ep.edgedistill = True
    if teacher and cal_rows:
        m.cal_teacher = await _chat_pass(cfg, http, ep, [r.input for r in cal_rows], pool, prog, "calibration set")
    if teacher or not ep.edgedistill:
        return
    if ep.predict:
        if ep.student_only:
            m.student_via[ep.name] = "/v1/predict with fallback: false (the teacher never called; label-normalised confidence)"
        else:
            m.student_via[ep.name] = (
                "/v1/predict with threshold 0 (a server without the student-only mode: an invalid answer still went to the "
                "teacher and counts as wrong; label-normalised confidence)"
            )
        m.student_predict.add(ep.name)
        m.student[ep.name] = await _predict_pass(http, ep, [r.input for r in rows], pool, prog, "test set")
        if cal_rows:
            m.cal_student[ep.name] = await _predict_pass(http, ep, [r.input for r in cal_rows], pool, prog, "calibration set")
        return
    if ep.has_teacher is False:  # no teacher: the answers as served are the student's own
        m.student_via[ep.name] = "chat answers as served (the server has no teacher)"
    else:
        m.student_via[ep.name] = "chat with X-Edgedistill-Fallback: off (the teacher never called; the server has no /v1/predict)"
        m.student[ep.name] = await _chat_pass(cfg, http, ep, [r.input for r in rows], pool, prog, "test set", student_only=True)
    if cal_rows:
        inputs = [r.input for r in cal_rows]
        m.cal_student[ep.name] = await _chat_pass(cfg, http, ep, inputs, pool, prog, "calibration set", student_only=True)


async def _chat_pass(
    cfg, http, ep: Endpoint, inputs: list[str], pool: int, prog: Progress, what: str, student_only: bool = False
) -> list[client.Sample]:
    """Each input once, as a chat request with the endpoint's template, ``pool`` at a time;
    ``student_only``: the student's own answers (X-Edgedistill-Fallback: off)."""
    teacher = ep.name == cfg.teacher
    rf = quality.response_format_for(cfg.task, ep.edgedistill, teacher)

    async def send(i: int) -> client.Sample:
        messages = quality.messages_for(cfg.task, inputs[i], teacher)
        return await client.chat(http, ep, messages, cfg.max_tokens, i, student_only=student_only, response_format=rf)

    label = f"{ep.name} {'student-only, ' if student_only else ''}{what}"
    return await load.fixed_pool(send, len(inputs), pool, _tracker(prog, label, len(inputs)))


async def _predict_pass(
    http, ep: Endpoint, inputs: list[str], pool: int, prog: Progress, what: str, served: bool = False
) -> list[client.Sample]:
    """The student's own answer and confidence per input: /v1/predict with ``fallback: false`` (the
    teacher is never called); a server without that field gets threshold 0 instead, so only an
    invalid answer still goes to the teacher (and then counts as the student's mistake).
    ``served``: the answers as served instead (the server's own threshold and teacher)."""

    async def send(i: int) -> client.Sample:
        if served:
            return await client.predict(http, ep, inputs[i], i)
        if ep.student_only:
            return await client.predict(http, ep, inputs[i], i, fallback=False)
        return await client.predict(http, ep, inputs[i], i, threshold=0.0)

    label = f"{ep.name} {'' if served else 'student-only, '}{what}"
    return await load.fixed_pool(send, len(inputs), pool, _tracker(prog, label, len(inputs)))


# ---- ceiling -----------------------------------------------------------------------------------


def _ceiling_phase(cfg: BenchConfig, test_rows: list[Any], factory, console: Console) -> list[dict[str, Any]]:
    out = []
    levels = cfg.concurrency or [1]
    inputs = [r.input for r in test_rows]
    msgs = [quality.prompt_messages(cfg.task, inputs, i, teacher=False) for i in range(max(levels))]
    for c in cfg.ceilings:
        console.print(f"ceiling: decoding {c.path} in-process at concurrency {', '.join(map(str, levels))}")
        runner = factory(c.path, max(levels), cfg.threads)
        try:
            res = run_ceiling(runner, msgs, levels, cfg.max_tokens)
        finally:
            runner.close()
        out.append({"names": c.names, "path": c.path, "threads": cfg.threads, "levels": res})
    return out


# ---- putting it together -----------------------------------------------------------------------


def _teacher_calls(row: dict[str, Any]) -> float | None:
    """The share of a row's requests its server asked the teacher for (answered or failed)."""
    rate = row.get("teacher_call_rate")
    return row.get("fallback_rate") if rate is None else rate


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
    for r in rows:
        ep = by_name[r["name"]]
        own = r["own_cost_per_1k_usd"]
        if ep.price is None:
            r["cost_per_1k_usd"], r["cost_basis"] = None, "no --price"
        elif r["name"] != cfg.teacher and _teacher_calls(r):
            # every teacher call the cascade made at this load level is paid for: answered or failed. The
            # student's part is the same artifact served alone at this level where the bench has it: the
            # cascade's own throughput also counts its waits on the teacher, which the teacher's share pays.
            alone = _student_alone(by_name, rows, r)
            student = alone[0]["own_cost_per_1k_usd"] if alone else own
            r["cost_per_1k_usd"] = sig(cascade_cost_per_1k(student, _teacher_calls(r), t_cost))
            part = f"student alone ({alone[0]['name']})" if alone else f"{ep.price.kind} (its own throughput)"
            r["cost_basis"] = f"cascade: {part} + teacher calls x teacher" + ("" if t_cost is not None else " (teacher cost unknown)")
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


def _manifest_calibrations(cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """Each endpoint's artifact manifest ``calibration`` block, where the endpoint names its artifact
    folder and the manifest has one (an unreadable manifest only leaves it out of the figure)."""
    from pathlib import Path

    from edgedistill.errors import UserError
    from edgedistill.manifest import read_manifest

    out = {}
    for ep in cfg.endpoints:
        try:
            cal = read_manifest(Path(ep.artifact)).get("calibration") if ep.artifact else None
        except (UserError, OSError):
            cal = None
        if isinstance(cal, dict) and cal:
            out[ep.name] = cal
    return out


def _write(cfg: BenchConfig, rep: dict[str, Any]) -> dict[str, str]:
    from edgedistill.bench import plot, plot_load

    files: dict[str, str] = {"report_json": str(cfg.out / "report.json"), "report_md": str(cfg.out / "report.md")}
    if rep["pareto"] is not None:
        served = next((e["name"] for e in rep["endpoints"] if e.get("has_teacher") and e["name"] in (rep["cascade"] or {})), None)
        path = cfg.out / "pareto.png"
        files["pareto"] = str(plot.pareto_png(rep["results"], path, rep["cascade"], rep.get("metric") or "accuracy", served=served))
    else:
        rep["notes"].append("no --task: no accuracy, so no pareto.png, cascade sweep or calibration")
    cals = {n: q["calibration"] for n, q in (rep["quality"] or {}).items() if q.get("calibration")}
    if cals:
        files["reliability"] = str(plot.reliability_png(cals, cfg.out / "reliability.png", _manifest_calibrations(cfg)))
    if any(r.get("latency_ms") for r in rep["results"]):
        files["latency"] = str(plot_load.latency_png(rep["results"], cfg.out / "latency.png"))
    rep["files"] = files
    report.write_json(rep, cfg.out)
    report.write_markdown(rep, cfg.out)
    return files
