"""Teachers run in-process: a Hugging Face checkpoint (batched generation, ``runtimes.hf_generate``)
or a GGUF file (llama.cpp, ``runtimes.llama``). torch/transformers/llama_cpp are imported lazily.

A request that names its task (``ChatRequest.constrain_to``) is decoded under the task's constraint
(``runtimes.constrain.for_task``: one of the labels, the JSON schema), the same grammar serve
decodes under, built once per task on the teacher's own vocabulary.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgedistill.distill.cache import ResponseCache
from edgedistill.distill.teacher import ChatRequest, Teacher, one_line

from edgedistill.errors import UserError
from edgedistill.manifest import compact_json


class _Constraints:
    """The tasks' constraints on one vocabulary, each built once (compiling a grammar takes a while)."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, teacher: Teacher, req: ChatRequest, vocab: Callable[[], Any]) -> Any:
        shape = teacher.answer_format(req)
        if not shape:
            return None
        key = compact_json(shape)
        with self._lock:
            if key not in self._built:
                from edgedistill.runtimes.constrain import GrammarError, for_task

                try:
                    self._built[key] = for_task(req.constrain_to, vocab())
                except GrammarError as e:
                    raise UserError(f"the task's answer shape cannot be decoded under ({e}); fix output_schema in the spec") from None
            return self._built[key]


# --- local models ----------------------------------------------------------------------------
def _file_fingerprint(files: list[Path], root: Path) -> str:
    """Identity of local model files without reading them: names, sizes, modification times."""
    parts = []
    for f in sorted(files):
        st = f.stat()
        parts.append(f"{f.relative_to(root) if f != root else f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# files that decide a checkpoint's answers (not caches, logs or anything else kept beside it)
_MODEL_FILE_SUFFIXES = {".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".tiktoken", ".pt", ".pth", ".py"}


class LocalHFTeacher(Teacher):
    """A Hugging Face causal LM checkpoint run in-process: float32, eval mode, CPU.

    Requests are grouped by decoding settings and generated ``batch_size`` at a time with left
    padding (``edgedistill.runtimes.hf_generate.generate_batch``): greedy when temperature is 0, sampled
    otherwise (seeded per batch from the requests' cache keys, which include their seeds and sample
    indices, so runs are repeatable).
    Prompts longer than ``max_length`` tokens keep their last ``max_length`` tokens.
    ``.model`` and ``.tokenizer`` load on first use and can be reused (logit distillation); the
    tokenizer's own padding/truncation sides are left as the checkpoint set them.
    """

    kind = "local-hf"

    def __init__(
        self, path: str | Path, cache: ResponseCache, batch_size: int = 16, max_length: int = 2048, model_id: str | None = None
    ):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise UserError(
                f"teacher.path {self.path} is not a Hugging Face checkpoint (no config.json); point it at the model folder"
            )
        super().__init__(model_id or self.path.name, cache)
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length)
        self._model: Any = None
        self._tokenizer: Any = None
        self._load_lock = threading.Lock()
        self._fingerprint: str | None = None
        self._constraints = _Constraints()

    def _identity(self) -> dict[str, Any]:
        if self._fingerprint is None:
            files = [
                p for p in self.path.iterdir() if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES and p.name != "manifest.json"
            ]
            self._fingerprint = _file_fingerprint(files, self.path)
        return {"kind": "local-hf", "model": self.model_id, "files": self._fingerprint, "max_length": self.max_length}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "local-hf",
            "model": self.model_id,
            "path": str(self.path),
            "batch_size": self.batch_size,
            "max_length": self.max_length,
        }

    def _load(self) -> None:
        with self._load_lock:
            if self._model is not None:
                return
            try:
                import torch  # noqa: F401
                from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
            except ImportError as e:
                raise UserError(
                    f"a local HF teacher needs torch and transformers ({e.name} is missing); pip install 'edgedistill[distill]'"
                ) from None
            from edgedistill.runtimes.hf_generate import load_causal_lm

            try:
                tok, model = load_causal_lm(self.path)
            except (OSError, ValueError, KeyError) as e:
                raise UserError(
                    f"cannot load the teacher checkpoint {self.path} ({one_line(e, 160)}); check teacher.path"
                ) from None
            self._tokenizer, self._model = tok, model

    @property
    def model(self) -> Any:
        self._load()
        return self._model

    @property
    def tokenizer(self) -> Any:
        self._load()
        return self._tokenizer

    def prompt_text(self, messages: list[dict[str, Any]]) -> str:
        from edgedistill.runtimes.hf import render_chat

        # a base model without a chat template: a plain transcript ending in the assistant's turn
        return render_chat(self.tokenizer, messages, no_template="transcript")

    def _generate_batch(self, batch: list[tuple[str, ChatRequest]], prompts: list[str]) -> list[dict[str, Any]]:
        """Blocking: generate one batch (all with the same decoding settings and constraint) from its
        requests' prompt texts."""
        from edgedistill.runtimes.hf_generate import generate_batch, model_vocab

        req = batch[0][1]
        constraint = self._constraints.get(self, req, lambda: model_vocab(self.model, self.tokenizer))
        seed = None
        if req.temperature > 0:  # seeded per batch from the requests' cache keys (their seeds and sample indices)
            seed = int(hashlib.sha256("".join(k for k, _ in batch).encode()).hexdigest()[:15], 16)
        rows = generate_batch(
            self.model,
            self.tokenizer,
            prompts,
            max_length=self.max_length,
            max_new_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            seed=seed,
            constraint=constraint,
        )
        return [{**asdict(row), "cost_usd": 0.0} for row in rows]

    async def _run_uncached(self, todo: list[tuple[str, ChatRequest]], emit: Callable[[str, dict[str, Any]], None]) -> None:
        await asyncio.to_thread(self._load)
        groups: dict[str, list[tuple[str, ChatRequest]]] = {}
        for key, req in todo:
            d = {**req.decoding(), **self.answer_format(req)}  # one batch: one decoding, one constraint
            d.pop("sample")
            d.pop("seed")
            groups.setdefault(json.dumps(d, sort_keys=True), []).append((key, req))
        for items in groups.values():
            # Batches of similar prompt length: left padding to a batch's longest prompt is computed too.
            texts = {key: self.prompt_text(req.messages) for key, req in items}
            items.sort(key=lambda item: len(texts[item[0]]))
            for s in range(0, len(items), self.batch_size):
                batch = items[s : s + self.batch_size]
                answers = await asyncio.to_thread(self._generate_batch, batch, [texts[key] for key, _ in batch])
                for (key, _), answer in zip(batch, answers):
                    emit(key, answer)


class LocalGGUFTeacher(Teacher):
    """A GGUF model run with llama-cpp-python (``edgedistill.runtimes.llama.LlamaChat``), one request at a
    time in a worker thread."""

    kind = "local-gguf"

    def __init__(
        self, path: str | Path, cache: ResponseCache, n_ctx: int = 2048, n_threads: int | None = None, model_id: str | None = None
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"teacher.path {self.path} does not exist; point it at a .gguf file")
        super().__init__(model_id or self.path.name, cache)
        self.n_ctx = int(n_ctx)
        self.n_threads = n_threads or os.cpu_count() or 1
        self._llm: Any = None
        self._load_lock = threading.Lock()
        self._constraints = _Constraints()

    def _identity(self) -> dict[str, Any]:
        return {
            "kind": "local-gguf",
            "model": self.model_id,
            "files": _file_fingerprint([self.path], self.path),
            "n_ctx": self.n_ctx,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "local-gguf",
            "model": self.model_id,
            "path": str(self.path),
            "n_ctx": self.n_ctx,
            "n_threads": self.n_threads,
        }

    @property
    def llm(self) -> Any:
        with self._load_lock:
            if self._llm is None:
                try:
                    import llama_cpp  # noqa: F401
                except ImportError:
                    raise UserError("a .gguf teacher needs llama-cpp-python; pip install 'edgedistill[llama]'") from None
                from edgedistill.runtimes.llama import LlamaChat

                try:
                    self._llm = LlamaChat(self.path, n_ctx=self.n_ctx, n_threads=self.n_threads)
                except (ValueError, RuntimeError, OSError) as e:
                    raise UserError(
                        f"cannot load the GGUF teacher {self.path} ({one_line(e, 160)}); check teacher.path"
                    ) from None
        return self._llm

    def _complete(self, req: ChatRequest) -> dict[str, Any]:
        try:
            out = self.llm.complete(
                req.messages,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                stop=list(req.stop) if req.stop else [],
                seed=req.seed,
                constraint=self._constraints.get(self, req, lambda: self.llm.vocab),
            )
        except ValueError as e:  # e.g. the prompt does not fit n_ctx
            raise UserError(
                f"GGUF teacher {self.path.name} failed on a request ({one_line(e, 160)}); shorten inputs or raise n_ctx"
            ) from None
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return {
            "text": choice["message"].get("content") or "",
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            "finish_reason": str(choice.get("finish_reason") or "stop"),
            "cost_usd": 0.0,
        }

    async def _run_uncached(self, todo: list[tuple[str, ChatRequest]], emit: Callable[[str, dict[str, Any]], None]) -> None:
        for key, req in todo:
            emit(key, await asyncio.to_thread(self._complete, req))


