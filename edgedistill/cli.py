"""The `edgedistill` command: one subcommand per stage, each a thin typed wrapper around the stage's
entry function (heavy imports happen inside, so `edgedistill --help` and `serve` stay light).

A UserError becomes one line on stderr and a non-zero exit; a traceback is a bug."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from edgedistill.errors import UserError

app = typer.Typer(
    name="edgedistill",
    help="Distill a task from a big model into a small one, compress it, serve it, benchmark it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def distill(
    spec: Annotated[Path, typer.Argument(help="Task spec YAML (see examples/).")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<task name>).")] = None,
    skip_gate: Annotated[bool, typer.Option(help="Continue even if the teacher scores below teacher.gate.min_score.")] = False,
    gate_only: Annotated[bool, typer.Option(help="Only evaluate the teacher on the test set, then stop.")] = False,
) -> None:
    """Teacher gate -> synthetic data -> validation -> student training -> evaluation."""
    from edgedistill.distill.pipeline import run_distill

    run_distill(spec, out, skip_gate=skip_gate, gate_only=gate_only)


@app.command()
def compress(
    checkpoint: Annotated[Path, typer.Argument(help="Student checkpoint folder (HF format), e.g. runs/demo/student.")],
    formats: Annotated[
        str | None, typer.Option(help="Comma-separated family:variant, e.g. gguf:q8_0,gguf:q4_k_m,onnx:int8,onnx:int4,gptq:int4 (default: the spec's compress.formats).")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="Calibration data: the distill run's data/ folder (default: <checkpoint>/../data) or a CSV/JSONL with input,output.")
    ] = None,
    task: Annotated[Path | None, typer.Option(help="Task spec YAML (default: the one stored in the checkpoint's manifest).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <checkpoint>/../artifacts).")] = None,
    max_drop: Annotated[float | None, typer.Option(help="Allowed accuracy drop vs the FP student (default: the spec's compress.max_accuracy_drop).")] = None,
    keep_failed: Annotated[bool, typer.Option(help="Keep artifacts that fail the quality gate and exit 0 (with a warning).")] = False,
    eval_limit: Annotated[int | None, typer.Option(help="Evaluate on at most this many test rows (stratified).")] = None,
) -> None:
    """Quantize a student into GGUF / ONNX / GPTQ artifacts, each measured against the FP student and gated."""
    from edgedistill.compress.pipeline import run_compress

    run_compress(checkpoint, formats=formats, calibration=calibration, task=task, out=out, max_drop=max_drop,
                 keep_failed=keep_failed, eval_limit=eval_limit)


# serve: every option comes from edgedistill.serve.settings.Settings (one declaration for this command,
# `python -m edgedistill.serve.cli`, the EDGEDISTILL_* variables and the config file)
from edgedistill.serve.cli import serve_cli

app.command(name="serve")(serve_cli)


@app.command()
def export(
    artifact: Annotated[Path, typer.Argument(help="A GGUF artifact folder (e.g. runs/demo/artifacts/gguf-q4_k_m) or a .gguf file.")],
    to: Annotated[str, typer.Option("--to", help="The runtime: ollama (a Modelfile) or llama-server (llama.cpp's C++ server command line).")],
    out: Annotated[Path | None, typer.Option(help="Bundle folder (default: <artifact>-<runtime> beside the artifact).")] = None,
    ctx: Annotated[int, typer.Option(help="Context length of one sequence, prompt + answer (Ollama's num_ctx; llama-server: -c of 4 such).")] = 2048,
) -> None:
    """Write a deploy bundle for Ollama or llama.cpp's llama-server: the task's system prompt, chat template, stop tokens, grammar."""
    from edgedistill.serve.export import export_bundle

    print(f"wrote {export_bundle(artifact, to, out, ctx=ctx)}")


@app.command()
def bench(
    endpoint: Annotated[list[str], typer.Option(help="NAME=URL or NAME=URL#model, repeatable; e.g. ours=http://127.0.0.1:8000/v1 (the model from GET /v1/models unless #model).")],
    task: Annotated[Path | None, typer.Option(help="Task spec YAML: prompts from its test set, accuracy, calibration, cascade sweep.")] = None,
    concurrency: Annotated[str, typer.Option(help="Closed-loop levels: clients each sending their next request when answered, e.g. 1,4,8 ('' for none).")] = "1,4",
    rate: Annotated[str | None, typer.Option(help="Open-loop levels: Poisson arrivals, requests/s, e.g. 2,5.")] = None,
    requests: Annotated[int, typer.Option(help="Measured requests per endpoint and load level.")] = 32,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per endpoint, excluded from every number.")] = 2,
    max_tokens: Annotated[int | None, typer.Option(help="max_tokens per request (default: the task's output budget, else 64).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder: report.json, report.md, pareto.png, reliability.png, latency.png.")] = Path("runs/bench"),
    price: Annotated[list[str] | None, typer.Option(help="NAME=0.10/h ($ per hour, local) or NAME=0.15,0.60 ($ per 1M input,output tokens, API); repeatable.")] = None,
    teacher: Annotated[str | None, typer.Option(help="The endpoint that is the teacher (agreement, cascade cost and sweep).")] = None,
    api_key_env: Annotated[list[str] | None, typer.Option(help="NAME=VAR: send the key in env var VAR to endpoint NAME; repeatable.")] = None,
    ceiling: Annotated[list[str] | None, typer.Option(help="NAME=model.gguf or NAME1,NAME2=model.gguf: in-process decode tokens/s of that model (llama.cpp), compared with those endpoints.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for the ceiling's in-process decode (default: all cores).")] = None,
    calibration: Annotated[Path | None, typer.Option(help="Labelled file (test-set columns) to choose the cascade threshold on (default: a fixed-seed half of the test set).")] = None,
    target: Annotated[float, typer.Option(help="Cascade target: this fraction of the teacher's accuracy.")] = 0.99,
    target_accuracy: Annotated[float | None, typer.Option(help="Cascade target as an absolute accuracy (instead of --target).")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Use only the first N test rows.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds without a byte from the server before a request counts as an error (timeout).")] = 120.0,
    seed: Annotated[int, typer.Option(help="Seed of the Poisson arrivals and of the calibration/test halves.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Live progress display.")] = True,
) -> None:
    """Benchmark OpenAI-compatible endpoints: latency, throughput, cost, accuracy, cascade sweep, Pareto frontier."""
    from edgedistill.bench.run import bench_command

    bench_command(
        endpoint=endpoint, task=task, concurrency=concurrency, rate=rate, requests=requests, warmup=warmup, max_tokens=max_tokens,
        out=out, price=price, teacher=teacher, api_key_env=api_key_env, ceiling=ceiling, threads=threads, calibration=calibration,
        target=target, target_accuracy=target_accuracy, eval_limit=eval_limit, timeout=timeout, seed=seed, progress=progress,
    )


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Task spec YAML (see examples/).")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<task name>).")] = None,
    skip_gate: Annotated[bool, typer.Option(help="Continue even if the teacher scores below teacher.gate.min_score.")] = False,
    force: Annotated[
        list[str] | None, typer.Option(help="Rerun this stage (and every later one) even if unchanged: distill, compress or bench; repeatable.")
    ] = None,
) -> None:
    """Teacher gate -> data -> student -> artifacts -> serve -> bench, resuming where it stopped (unchanged stages are skipped)."""
    from edgedistill.run import STAGES, run_all

    bad = [f for f in force or [] if f not in STAGES]
    if bad:
        raise UserError(f"--force {bad[0]}: not a stage; use one of {', '.join(STAGES)}")
    run_all(spec, out, skip_gate=skip_gate, force=force)


@app.command()
def retrain(
    spec: Annotated[Path, typer.Argument(help="Task spec YAML (the one the run was made with).")],
    traffic: Annotated[Path, typer.Option(help="Traffic log folder: the DIR of `edgedistill serve --traffic-log DIR` (its *.jsonl files).")],
    run: Annotated[Path | None, typer.Option("--run", help="The `edgedistill run` output folder to improve (default runs/<task name>).")] = None,
) -> None:
    """Re-distil from traffic: label the logged inputs (reusing the teacher's answers), train the current student further,
    compress, and promote the new artifact (RUN/serving.json) only if it is at least as good on the test set."""
    from edgedistill.run.retrain import run_retrain

    run_retrain(spec, traffic, run)


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept (teacher cache, checkpoints); run the same command again to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
