"""The task's constraint against free decoding, on one artifact and one test split: accuracy (with
its 95 % interval), ECE of the served confidence, invalid answers and the fallback rate at the
server's threshold, each from ``/v1/predict`` of ``edgedistill serve ARTIFACT --constrain`` and
``--no-constrain`` (started one after the other, the student alone: ``"fallback": false``).

A benchmark, not a test:

    python -m edgedistill.bench.constrained runs/demo/artifacts/gguf-q4_k_m \\
        --spec examples/banking77/task.yaml --threshold 0.9 --out runs/bench/constrained.json

The rows are the spec's test set (``test_set``; for the demo, BANKING77's held-out dev split
restricted to its 10 labels), or ``--data`` (JSONL rows ``{input, output}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from edgedistill.bench.serve_speed import _port, start

from edgedistill.metrics import expected_calibration_error, wilson_interval
from edgedistill.task import Task


def _serve(artifact: Path, port: int, threads: int, threshold: float, constrain: bool) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "edgedistill.serve.cli", str(artifact), "--port", str(port), "--n-threads", str(threads),
        "--threshold", str(threshold), "--log-level", "warning", "--constrain" if constrain else "--no-constrain",
    ]  # fmt: skip
    try:
        return start(cmd, port, ready="/ready", timeout_s=300)
    except RuntimeError as e:
        raise SystemExit(f"edgedistill serve: {e}") from None


async def _answers(base: str, inputs: list[str], concurrency: int) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:

        async def one(text: str) -> dict[str, Any]:
            async with sem:
                r = await http.post("/v1/predict", json={"input": text, "fallback": False})
                r.raise_for_status()
                return r.json()

        return await asyncio.gather(*[one(x) for x in inputs])


def measure(task: Task, rows: list[dict[str, Any]], answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (95 % Wilson interval), ECE, invalid answers, fallback rate, over the rows."""
    n = len(rows)
    correct = [task.is_correct(None if a["error"] else a["output"], r["output"]) for r, a in zip(rows, answers, strict=True)]
    conf = [float(a["confidence"] or 0.0) for a in answers]
    k = sum(correct)
    fallback = sum(a["edgedistill"]["fallback_reason"] is not None for a in answers)
    lo, hi = wilson_interval(k, n)
    flo, fhi = wilson_interval(fallback, n)
    return {
        "n": n,
        "accuracy": round(k / n, 4),
        "accuracy_ci95": [round(lo, 4), round(hi, 4)],
        "ece": round(expected_calibration_error(conf, correct), 4),
        "invalid_answers": sum(a["error"] is not None for a in answers),
        "fallback_rate": round(fallback / n, 4),
        "fallback_rate_ci95": [round(flo, 4), round(fhi, 4)],
        "mean_confidence": round(sum(conf) / n, 4),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path, help="an artifact folder with a task (its manifest)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", type=Path, help="a task spec: its test_set")
    src.add_argument("--data", type=Path, help="JSONL test rows: {input, output}")
    ap.add_argument("--limit", type=int, default=0, help="at most this many rows (0: all)")
    ap.add_argument("--threshold", type=float, default=0.9, help="the server's threshold (fallback rate)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    manifest = json.loads((args.artifact / "manifest.json").read_text())
    task = Task.from_manifest(manifest["task"])
    if args.spec:
        from edgedistill.spec import load_spec

        rows = [{"input": e.input, "output": e.output} for e in load_spec(args.spec).load_test_set()]
    else:
        rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    if args.limit:
        rows = rows[: args.limit]
    inputs = [r["input"] for r in rows]
    results: dict[str, Any] = {}
    for name, constrain in (("constrained", True), ("free", False)):
        port = _port()
        proc = _serve(args.artifact, port, args.threads, args.threshold, constrain)
        try:
            answers = asyncio.run(_answers(f"http://127.0.0.1:{port}", inputs, args.concurrency))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        results[name] = measure(task, rows, answers)
        print(json.dumps({name: results[name]}), flush=True)
    print(f"\n| decoding | n | accuracy (95 % CI) | ECE | invalid answers | fallback rate at {args.threshold} (95 % CI) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        lo, hi = r["accuracy_ci95"]
        flo, fhi = r["fallback_rate_ci95"]
        print(
            f"| {name} | {r['n']} | {r['accuracy']:.3f} ({lo:.3f}-{hi:.3f}) | {r['ece']:.3f} | {r['invalid_answers']} | "
            f"{r['fallback_rate']:.3f} ({flo:.3f}-{fhi:.3f}) |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"artifact": str(args.artifact), "rows": str(args.spec or args.data), "threshold": args.threshold, "threads": args.threads}
        args.out.write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
