"""`edgedistill serve`: run the OpenAI-compatible server for an artifact folder or a .gguf file.

``serve_command`` is the typed entry the CLI registry wires; ``python -m edgedistill.serve.cli`` runs the same
function with argparse (used by the tests and by a slim install without typer).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edgedistill.errors import UserError


def serve_command(
    artifact: str,
    teacher_url: str | None = None,
    teacher_model: str | None = None,
    teacher_api_key_env: str | None = None,
    threshold: float | None = None,
    host: str | None = None,
    port: int | None = None,
    api_key_env: str | None = None,
    config: Path | None = None,
    n_threads: int | None = None,
    n_slots: int | None = None,
    ctx_per_slot: int | None = None,
    n_gpu_layers: int | None = None,
    max_queue: int | None = None,
    confidence: bool | None = None,
    model_alias: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve an artifact behind an OpenAI-compatible API with per-request confidence and teacher fallback.

    Flags left out come from EDGEDISTILL_* environment variables, then the --config file, then defaults.
    """
    import uvicorn
    from edgedistill.serve.app import create_app
    from edgedistill.serve.settings import Settings

    settings = Settings.load(
        config,
        artifact=artifact,
        teacher_url=teacher_url,
        teacher_model=teacher_model,
        teacher_api_key_env=teacher_api_key_env,
        threshold=threshold,
        host=host,
        port=port,
        api_key_env=api_key_env,
        n_threads=n_threads,
        n_slots=n_slots,
        ctx_per_slot=ctx_per_slot,
        n_gpu_layers=n_gpu_layers,
        max_queue=max_queue,
        confidence=confidence,
        model_alias=model_alias,
    )
    if not settings.artifact:
        raise UserError("serve needs an artifact: a folder with manifest.json or a .gguf file")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    st = app.state.st
    teacher = (
        f"teacher {settings.teacher_model} at {settings.teacher_url}, threshold {settings.threshold}"
        if st.teacher
        else "no teacher"
    )
    print(
        f"serving {st.model_id} ({st.artifact.backend if st.artifact else '?'}) on http://{settings.host}:{settings.port}/v1 -- {teacher}",
        file=sys.stderr,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, timeout_graceful_shutdown=5)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="edgedistill serve", description=serve_command.__doc__)
    ap.add_argument("artifact", help="artifact folder (manifest.json) or .gguf file")
    ap.add_argument("--teacher-url")
    ap.add_argument("--teacher-model")
    ap.add_argument("--teacher-api-key-env")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--api-key-env")
    ap.add_argument("--config", type=Path)
    ap.add_argument("--n-threads", type=int)
    ap.add_argument("--n-slots", type=int)
    ap.add_argument("--ctx-per-slot", type=int)
    ap.add_argument("--n-gpu-layers", type=int)
    ap.add_argument("--max-queue", type=int)
    ap.add_argument("--no-confidence", dest="confidence", action="store_false", default=None)
    ap.add_argument("--model-alias")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    try:
        serve_command(**vars(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
