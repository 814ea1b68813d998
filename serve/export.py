"""`edgedistill export`: deploy bundles for runtimes other than ours (Ollama, llama.cpp's llama-server).

A bundle is a folder beside the artifact with what that runtime needs to give the answers our server
gives: the GGUF (referenced by a relative path, never copied), the task's system prompt exactly as
``/v1/predict`` renders it (``Task.student_messages``), the chat template, the end tokens, greedy
decoding, the answer budget and, where the runtime has one, the task's constraint; a short README
saying how a client calls it, and ``export.json`` (what was exported, from which artifact manifest,
with which settings, and the bundle's file hashes).

One module per runtime (``export_ollama``, ``export_llama_server``), each a ``write(Source)`` giving
a :class:`Bundle` (file name -> text, and the settings it chose); this one resolves the artifact
and writes the files. What no bundle carries:
the calibrated confidence and the teacher fallback (the cascade is our server's).

Torch-free; needs no llama.cpp (the GGUF's header is read by ``runtimes.gguf_meta``).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from edgedistill.runtimes.chat import CHATML, compile_template, raise_exception
from edgedistill.runtimes.gbnf import label_tokens
from edgedistill.runtimes.gguf_meta import GGUFInfo, read_metadata
from edgedistill.runtimes.vocab import EOG_NAMES
from edgedistill.serve.artifact import Artifact, load_artifact

from edgedistill import __version__
from edgedistill.errors import UserError
from edgedistill.manifest import MANIFEST, hash_files, read_manifest, sha256_file, write_json_atomic
from edgedistill.task import Task

EXPORT = "export.json"
SCHEMA = "edgedistill.export/v1"
# runtime -> the module that writes its bundle (``write(Source) -> Bundle``)
RUNTIMES = {"ollama": "edgedistill.serve.export_ollama", "llama-server": "edgedistill.serve.export_llama_server"}
EXECUTABLE = {"llama-server.sh"}


@dataclass
class Bundle:
    files: dict[str, str]  # file name -> text
    settings: dict[str, Any]  # what the runtime is told (export.json's settings, beside ctx and the end tokens)


@dataclass
class Source:
    """What every bundle is made from: the verified artifact, its GGUF's metadata, the settings."""

    artifact: Artifact
    path: Path  # what the user passed: an artifact folder or a .gguf file
    out: Path  # the bundle folder
    gguf: GGUFInfo
    ctx: int  # context length of one sequence (prompt + answer)
    manifest_sha256: str | None  # the artifact's manifest.json (None: a bare .gguf)
    model_sha256: str

    @property
    def task(self) -> Task | None:
        return self.artifact.task

    @property
    def system_prompt(self) -> str | None:
        """The system message our server sends the student for every input (None: no task)."""
        if self.task is None:
            return None
        first = self.task.student_messages("")[0]
        return first["content"] if first["role"] == "system" else None

    @property
    def model_ref(self) -> str:
        """The GGUF's path relative to the bundle folder."""
        return _relative(self.artifact.model_path, self.out)

    @property
    def max_tokens(self) -> int | None:
        """The answer budget /v1/predict decodes under (the task's output budget)."""
        return self.task.output_budget if self.task else None

    @cached_property
    def end_tokens(self) -> list[str]:
        """The texts of the tokens our server stops on: llama.cpp's end-of-generation tokens (the
        runner's ``eog_tokens``), or, without llama-cpp-python, those the GGUF's header names."""
        try:
            from edgedistill.runtimes.llama import end_token_texts

            return end_token_texts(self.artifact.model_path)
        except ImportError:
            return self.gguf.end_tokens(EOG_NAMES)

    @cached_property
    def label_tokens(self) -> list[list[int]] | None:
        """The labels in the token ids our server constrains a classification answer to (None: not
        classification, or no llama-cpp-python)."""
        return label_tokens(self.task, self.artifact.model_path)

    def chatml_faithful(self) -> tuple[bool, str]:
        """Whether ChatML renders every conversation our server sends (a system message first) exactly
        as the GGUF's own chat template does (as ``runtimes.llama`` renders it), and why not."""
        source = self.gguf.chat_template or CHATML
        try:
            template = compile_template(source)
            for messages in PROBES:
                got = template.render(
                    messages=messages, add_generation_prompt=True, bos_token=self.gguf.token_text("bos") or "",
                    eos_token=self.gguf.token_text("eos") or "", raise_exception=raise_exception,
                )  # fmt: skip
                if got != chatml(messages):
                    return False, "the GGUF's chat template is not ChatML (it renders a conversation differently)"
        except Exception as e:  # noqa: BLE001 -- any template error means: not one we can translate
            return False, f"the GGUF's chat template does not render ({type(e).__name__}: {str(e)[:120]})"
        return True, "ChatML"


# conversations as our server renders them: the task's system message first, then the input
# (a text, or a conversation with earlier turns); contents with the characters a template may mangle
PROBES = [
    [{"role": "system", "content": "Classify the query.\nAnswer with one label."}, {"role": "user", "content": " Where is my card?  "}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "first {{ x }} {% raw %}"},
        {"role": "assistant", "content": '{"a": 1}'},
        {"role": "user", "content": "second\n\nline"},
    ],
]


def chatml(messages: list[dict[str, str]]) -> str:
    """ChatML with the generation prompt (``runtimes.chat.CHATML``, written out)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def export_bundle(artifact: Path | str, to: str, out: Path | None = None, *, ctx: int = 2048) -> Path:
    """Write the ``to`` runtime's bundle for a GGUF artifact folder (or a .gguf file) into ``out``
    (default: ``<artifact>-<runtime>`` beside it); returns the bundle folder."""
    if to not in RUNTIMES:
        raise UserError(f"--to {to}: not a runtime to export to; use one of {', '.join(RUNTIMES)}")
    if ctx < 64:
        raise UserError(f"--ctx {ctx}: too small for a prompt and an answer; use at least 64 (our server's default is 2048)")
    src = _source(Path(artifact).expanduser(), to, out, ctx)
    bundle: Bundle = importlib.import_module(RUNTIMES[to]).write(src)
    src.out.mkdir(parents=True, exist_ok=True)
    for name, text in bundle.files.items():
        path = src.out / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        if name in EXECUTABLE:
            tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(tmp, path)
    write_json_atomic(src.out / EXPORT, _record(src, to, bundle))
    return src.out


def _source(path: Path, to: str, out: Path | None, ctx: int) -> Source:
    if not path.exists():
        raise UserError(f"artifact {path} does not exist; pass a GGUF artifact folder (runs/<task>/artifacts/gguf-*) or a .gguf file")
    if path.is_dir():  # the format first: an ONNX or GPTQ folder is refused before its weights are hashed
        fmt = str(read_manifest(path).get("format", ""))
        if fmt != "gguf":
            raise UserError(
                f"{path} is a {fmt or 'format-less'} artifact: only GGUF artifacts export to {to}; "
                "export a gguf artifact (compress --formats gguf:q4_k_m) or serve this one with `edgedistill serve`"
            )
    elif path.suffix.lower() != ".gguf":
        raise UserError(f"{path}: only GGUF artifacts export to {to}; pass a GGUF artifact folder or a .gguf file")
    art = load_artifact(path)  # hash-verified
    manifest_sha = sha256_file(path / MANIFEST) if path.is_dir() else None
    files = (art.manifest or {}).get("files") or {}
    model_sha = files.get(art.model_path.name) if path.is_dir() else None
    model_sha = model_sha or sha256_file(art.model_path)
    base = path if path.is_dir() else path.with_suffix("")
    out = Path(out).expanduser() if out is not None else base.parent / f"{base.name}-{to}"
    if out.resolve() == path.resolve():  # its files (README.md) would overwrite the artifact's own
        raise UserError(f"--out {out} is the artifact folder; pass another folder for the bundle")
    if out.is_file():
        raise UserError(f"--out {out} is a file; pass a folder for the bundle")
    info = GGUFInfo(read_metadata(art.model_path))
    trained = info.context_length
    return Source(art, path, out, info, min(ctx, trained) if trained else ctx, manifest_sha, model_sha)


def _record(src: Source, to: str, bundle: Bundle) -> dict[str, Any]:
    task = src.task
    return {
        "schema": SCHEMA,
        "runtime": to,
        "created_by": f"edgedistill {__version__} export",
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "artifact": {
            "path": _relative(src.path, src.out),
            "name": src.artifact.name,
            "format": src.artifact.format,
            "manifest_sha256": src.manifest_sha256,
            "model_file": src.model_ref,
            "model_sha256": src.model_sha256,
        },
        "task": None if task is None else {"name": task.name, "type": task.type, "labels": task.labels},
        "settings": {"ctx": src.ctx, "temperature": 0, "max_tokens": src.max_tokens, "end_tokens": src.end_tokens, **bundle.settings},
        "not_exported": ["calibrated confidence", "teacher fallback (the cascade)"],
        "files": hash_files(src.out, sorted(bundle.files)),
    }


def _relative(path: Path, start: Path) -> str:
    # not resolve(): a symlinked GGUF is referenced where the artifact has it, not where it points
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(start))).as_posix()
