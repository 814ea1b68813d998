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
    from distill.pipeline import run_distill

    run_distill(spec, out, skip_gate=skip_gate, gate_only=gate_only)


@app.command()
def compress() -> None:
    """Quantize a student into GGUF / ONNX / GPTQ artifacts (not yet: issue #4)."""
    _not_yet("compress", 4)


@app.command()
def serve(
    artifact: Annotated[str, typer.Argument(help="Artifact folder (with manifest.json) or a .gguf file.")],
    teacher_url: Annotated[str | None, typer.Option(help="Teacher's OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1.")] = None,
    teacher_model: Annotated[str | None, typer.Option(help="Teacher model name.")] = None,
    teacher_api_key_env: Annotated[str | None, typer.Option(help="Name of the env var holding the teacher's API key.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Calibrated confidence below which the teacher answers (default 0.9).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Name of the env var holding the bearer key clients must send.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML/JSON settings file (flags > EDGEDISTILL_* env > file).")] = None,
    n_threads: Annotated[int | None, typer.Option(help="CPU threads for llama.cpp.")] = None,
    n_slots: Annotated[int | None, typer.Option(help="Sequences decoded together (continuous batching).")] = None,
    n_gpu_layers: Annotated[int | None, typer.Option(help="Layers offloaded to the GPU; -1 for all.")] = None,
    confidence: Annotated[bool | None, typer.Option("--confidence/--no-confidence", help="Score confidence per response.")] = None,
) -> None:
    """Serve an artifact behind an OpenAI-compatible API with per-request confidence and teacher fallback."""
    from serve.cli import serve_command

    serve_command(
        artifact, teacher_url, teacher_model, teacher_api_key_env, threshold, host, port, api_key_env, config,
        n_threads=n_threads, n_slots=n_slots, n_gpu_layers=n_gpu_layers, confidence=confidence,
    )


@app.command()
def bench() -> None:
    """Benchmark endpoints: latency, throughput, cost, accuracy, Pareto frontier (not yet: issue #5)."""
    _not_yet("bench", 5)


@app.command()
def run() -> None:
    """Run every stage from a task spec to the Pareto plot, resuming where it stopped (not yet: issue #6)."""
    _not_yet("run", 6)


def _not_yet(stage: str, issue: int) -> None:
    raise UserError(f"`edgedistill {stage}` is not implemented yet (issue #{issue}); use `edgedistill distill` for now")


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
