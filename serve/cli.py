"""`edgedistill serve`: run the OpenAI-compatible server for an artifact folder or a .gguf file.

The options are generated from ``serve.settings.Settings`` (its fields, descriptions, defaults and
environment variables): ``serve_cli`` is the typer command that ``edgedistill serve`` registers,
and ``python -m edgedistill.serve.cli`` runs the same command (``edgedistill run`` starts servers
that way). ``serve_command`` is the plain function both call.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
from edgedistill.serve.settings import Settings, threshold_note

from edgedistill.errors import UserError

HELP = "Serve an artifact behind an OpenAI-compatible API with per-request confidence and teacher fallback."
FLAG_ALIASES: dict[str, list[str]] = {}  # field -> old spellings a renamed flag keeps (none renamed so far)
CONFIG_HELP = "YAML/JSON settings file (flags > EDGEDISTILL_* env > file). (env: EDGEDISTILL_CONFIG)"


def serve_command(artifact: str, config: Path | None = None, **flags: Any) -> None:
    """Serve ``artifact`` with the settings ``flags`` (``Settings`` fields; None: not given).
    Flags left out come from EDGEDISTILL_* environment variables, then the config file, then defaults."""
    from edgedistill.serve.app import create_app
    from edgedistill.serve.artifact import run_artifact
    from edgedistill.serve.shutdown import serve_app

    settings = Settings.load(config, artifact=artifact, **flags)
    if not settings.artifact:
        raise UserError("serve needs an artifact: a folder with manifest.json, a .gguf file or a run folder")
    if (resolved := run_artifact(settings.artifact)) is not None:
        print(f"{settings.artifact} is a run folder: serving {resolved[0]} (from {resolved[1]})", file=sys.stderr)
        settings = settings.model_copy(update={"artifact": str(resolved[0])})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    st = app.state.st
    teacher = (
        f"teacher {settings.teacher_model} at {settings.teacher_url}, threshold {st.settings.threshold} ({st.threshold_source})"
        if st.teacher
        else "no teacher"
    )
    print(
        f"serving {st.model_id} ({st.artifact.backend if st.artifact else '?'}) on http://{settings.host}:{settings.port}/v1 -- {teacher}",
        file=sys.stderr,
    )
    note = threshold_note(st.threshold_source, st.artifact.calibration if st.artifact else None) if st.teacher else None
    if note:
        print(note, file=sys.stderr)
    serve_app(app, settings)  # SIGTERM/SIGINT: drain within --shutdown-grace-s, then exit 0


def _scalar(annotation: Any) -> type:
    """``str | None`` -> str: the type the flag parses (pydantic checks ranges and the rest)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def _help(name: str, field) -> str:
    default = field.get_default(call_default_factory=True)
    shown = "" if default in (None, "") else f"; default: {default}"
    return f"{field.description or ''} (env: EDGEDISTILL_{name.upper()}{shown})"


def _parameters() -> list[inspect.Parameter]:
    fields = Settings.model_fields
    art = Annotated[str, typer.Argument(help=fields["artifact"].description, show_default=False)]
    params = [inspect.Parameter("artifact", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=art)]
    for name, field in fields.items():
        if name == "artifact":
            continue
        kind = _scalar(field.annotation)
        flag = name.replace("_", "-")
        decls = [f"--{flag}/--no-{flag}"] if kind is bool else [f"--{flag}"]
        decls += FLAG_ALIASES.get(name, [])
        option = typer.Option(*decls, help=_help(name, field), show_default=False)
        params.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option])
        )
    config = Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP, show_default=False)]
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=config))
    return params


def serve_cli(**kwargs: Any) -> None:
    serve_command(**kwargs)


serve_cli.__doc__ = HELP + "\n\nFlags left out come from EDGEDISTILL_* environment variables, then the --config file, then defaults."
serve_cli.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]
serve_cli.__annotations__ = {p.name: p.annotation for p in serve_cli.__signature__.parameters.values()}  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name="serve")(serve_cli)
    try:
        app(args=argv, prog_name="edgedistill serve")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
