"""``edgedistill bench``, top to bottom: discover the endpoints, load them (closed loop per
concurrency, open loop per rate), answer the test set, measure the in-process ceiling, then
costs, cascade sweep, report and figures.

Endpoints are measured one after the other (they usually share the machine); each gets its warm-up
requests first, which no number includes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx
from edgedistill.bench import client, load, quality, report
from edgedistill.bench.assemble import assemble
from edgedistill.bench.ceiling import gguf_runner, run_ceiling
from edgedistill.bench.config import BenchConfig, Endpoint, build_config
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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
    also the student's own answers (student-only mode: the teacher is never called; a server without a
    teacher is asked once, its answers as served being the student's own: the sweep reads those); with
    --calibration, the teacher's and the students' answers to those rows too."""
    teacher = ep.name == cfg.teacher
    inputs = [r.input for r in rows]
    if ep.predict and not teacher:
        m.served_predict.add(ep.name)
        m.served[ep.name] = await _predict_pass(http, ep, inputs, pool, prog, "test set", served=True)
    else:
        m.served[ep.name] = await _chat_pass(cfg, http, ep, inputs, pool, prog, "test set")
    if any(s.answered_by for s in m.served[ep.name]):
        ep.edgedistill = True
    if teacher and cal_rows:
        m.cal_teacher = await _chat_pass(cfg, http, ep, [r.input for r in cal_rows], pool, prog, "calibration set")
    if teacher or not ep.edgedistill:
        return
    if ep.predict:
        m.student_predict.add(ep.name)
    if ep.has_teacher is False:  # no teacher: the answers as served are the student's own (asked once)
        m.student_via[ep.name] = f"{'/v1/predict' if ep.predict else 'chat'} answers as served (the server has no teacher)"
    elif ep.predict:
        if ep.student_only:
            m.student_via[ep.name] = "/v1/predict with fallback: false (the teacher never called; label-normalised confidence)"
        else:
            m.student_via[ep.name] = (
                "/v1/predict with threshold 0 (a server without the student-only mode: an invalid answer still went to the "
                "teacher and counts as wrong; label-normalised confidence)"
            )
        m.student[ep.name] = await _predict_pass(http, ep, inputs, pool, prog, "test set")
    else:
        m.student_via[ep.name] = "chat with X-Edgedistill-Fallback: off (the teacher never called; the server has no /v1/predict)"
        m.student[ep.name] = await _chat_pass(cfg, http, ep, inputs, pool, prog, "test set", student_only=True)
    if cal_rows:
        cal = [r.input for r in cal_rows]
        if ep.predict:
            m.cal_student[ep.name] = await _predict_pass(http, ep, cal, pool, prog, "calibration set")
        else:
            m.cal_student[ep.name] = await _chat_pass(cfg, http, ep, cal, pool, prog, "calibration set", student_only=True)


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
