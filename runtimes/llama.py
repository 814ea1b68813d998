"""llama.cpp runtime (GGUF), on llama-cpp-python.

- :class:`LlamaRunner`: serve's ``Runner`` (and bench's ceiling), on the low-level API (no ``Llama``
  object). One context with ``n_seq_max = n_slots``; each slot is a sequence id with its own KV range
(``kv_unified=False``: ``ctx_per_slot`` tokens each). ``decode`` fills one ``llama_batch`` with
tokens of several sequences and returns a zero-copy view of the output rows' logits -- only the
rows asked for, which is why confidence needs no ``logits_all``.
- :class:`LlamaCppRuntime`: compress's greedy ``Runtime`` (quality gate, speed check): one sequence,
  only the last position's logits.
- :class:`LlamaChat`: llama-cpp-python's high-level ``Llama`` chat completion (the local GGUF teacher).

``llama_cpp`` is imported when one of them is made.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np
from edgedistill.runtimes.chat import CHATML, compile_template, raise_exception
from edgedistill.runtimes.constrain import Constraint, Matcher
from edgedistill.runtimes.masking import RowMatchers, pick

from edgedistill.errors import UserError


class LlamaRunner:
    def __init__(
        self,
        model_path: Path,
        *,
        n_slots: int = 4,
        ctx_per_slot: int = 2048,
        n_batch: int = 512,
        n_threads: int = 2,
        n_gpu_layers: int = 0,
        verbose: bool = False,
    ):
        try:
            import llama_cpp
            from llama_cpp import _internals, _logger
        except ImportError:
            raise UserError(
                "serving a GGUF needs llama-cpp-python: pip install 'edgedistill[llama]' (see README for build flags)"
            ) from None
        self._ll = llama_cpp
        _logger.set_verbose(verbose)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers
        try:
            self.model = _internals.LlamaModel(path_model=str(model_path), params=mp, verbose=verbose)
        except ValueError as e:
            raise UserError(
                f"llama.cpp could not load {model_path} ({e}); is it a complete GGUF for this llama.cpp version?"
            ) from None
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_slots * ctx_per_slot
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = n_slots
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.kv_unified = False
        cp.no_perf = True
        self.ctx = _internals.LlamaContext(model=self.model, params=cp, verbose=verbose)
        self.n_slots = n_slots
        self.ctx_per_slot = int(llama_cpp.llama_n_ctx_seq(self.ctx.ctx)) or ctx_per_slot
        self.n_batch = n_batch
        self.n_vocab = self.model.n_vocab()
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        vocab = self.model.vocab
        self.eog_tokens = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))
        self.pieces = [token_piece(llama_cpp, vocab, t) for t in range(self.n_vocab)]
        self.add_bos = bool(self.model.add_bos_token())
        meta = self.model.metadata()
        self._template = compile_template(meta.get("tokenizer.chat_template") or CHATML)
        self._bos = self._text(self.model.token_bos())
        self._eos = self._text(self.model.token_eos())
        self.description = self.model.desc()

    def _text(self, t: int) -> str:
        if t < 0:
            return ""
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self.model.vocab, t, buf, 64, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def tokenize(self, text: str, *, special: bool, add_bos: bool) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos and self.add_bos, special)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=True, bos_token=self._bos, eos_token=self._eos, raise_exception=raise_exception
        )

    def seq_rm(self, seq: int, p0: int) -> None:
        self._ll.llama_memory_seq_rm(self.ctx.memory, seq, p0, -1)

    def decode(self, tokens: list[int], pos: list[int], seqs: list[int], outputs: list[bool]) -> np.ndarray:
        b = self._batch
        n = len(tokens)
        b.n_tokens = n
        for i in range(n):
            b.token[i] = tokens[i]
            b.pos[i] = pos[i]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seqs[i]
            b.logits[i] = outputs[i]
        rc = self._ll.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n_out = sum(outputs)
        if not n_out:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = self._ll.llama_get_logits(self.ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def close(self) -> None:
        if self._batch is not None:
            self._ll.llama_batch_free(self._batch)
            self._batch = None
        self.ctx.close()
        self.model.close()



def token_piece(ll: Any, vocab: Any, t: int) -> bytes:
    """The bytes token ``t`` stands for (special tokens: none)."""
    buf = ctypes.create_string_buffer(64)
    n = ll.llama_token_to_piece(vocab, t, buf, 64, 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = ll.llama_token_to_piece(vocab, t, buf, -n, 0, False)
    return buf.raw[: max(n, 0)]


@contextlib.contextmanager
def _vocab_only(path: Path):
    """llama.cpp's model of the GGUF at ``path`` with its vocabulary only (no weights loaded), and
    ``llama_cpp``. ImportError without llama-cpp-python."""
    import llama_cpp
    from llama_cpp import _internals, _logger

    _logger.set_verbose(False)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.vocab_only = True
    try:
        model = _internals.LlamaModel(path_model=str(path), params=mp, verbose=False)
    except ValueError as e:
        raise UserError(f"llama.cpp could not load {path} ({e}); is it a complete GGUF for this llama.cpp version?") from None
    try:
        yield llama_cpp, model
    finally:
        model.close()


def end_token_texts(path: Path) -> list[str]:
    """The texts of the tokens llama.cpp ends a generation on (``llama_vocab_is_eog``: EOS, EOT and
    the end-of-turn and fill-in-the-middle tokens it knows by name), in id order, from the GGUF's
    vocabulary alone (no weights loaded). ImportError without llama-cpp-python."""
    with _vocab_only(path) as (llama_cpp, model):
        vocab = model.vocab
        out = []
        for t in range(model.n_vocab()):
            if llama_cpp.llama_vocab_is_eog(vocab, t):
                buf = ctypes.create_string_buffer(64)
                n = llama_cpp.llama_token_to_piece(vocab, t, buf, 64, 0, True)
                out.append(buf.raw[: max(n, 0)].decode("utf-8", "replace"))
        return [t for t in dict.fromkeys(out) if t]


def answer_token_ids(path: Path, texts: list[str]) -> list[list[int]]:
    """Each text tokenized as an answer's first text (no BOS, no special tokens), as
    ``runtimes.constrain.LabelSet`` tokenizes a label on this GGUF's vocabulary (no weights loaded).
    ImportError without llama-cpp-python."""
    with _vocab_only(path) as (_, model):
        return [list(model.tokenize(t.encode("utf-8"), False, False)) for t in texts]


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class LlamaCppRuntime:
    """Greedy decoding on llama.cpp's low-level API: one sequence, only the last position's logits."""

    def __init__(self, path: Path, *, n_ctx: int = 4096, n_batch: int = 512, n_threads: int | None = None):
        import llama_cpp
        from llama_cpp import _internals, _logger

        self._ll = llama_cpp
        _logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        try:
            self.model = _internals.LlamaModel(path_model=str(path), params=mp, verbose=False)
        except ValueError as e:
            raise UserError(f"llama.cpp could not load {path} ({e}); rebuild the artifact") from None
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = min(n_ctx, self.model.n_ctx_train()) if self.model.n_ctx_train() > 0 else n_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = n_threads or _threads()
        cp.no_perf = True
        self.ctx = _internals.LlamaContext(model=self.model, params=cp, verbose=False)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx.ctx))
        self.n_batch = n_batch
        self.n_vocab = self.model.n_vocab()
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        vocab = llama_cpp.llama_model_get_vocab(self.model.model)
        self.eog = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))

    def _decode(self, tokens: list[int], start: int, last_logits: bool) -> None:
        b = self._batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, start + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = last_logits and i == len(tokens) - 1
        if (rc := self._ll.llama_decode(self.ctx.ctx, b)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _next(self, matcher: Matcher | None) -> int:
        logits = np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self.ctx.ctx, -1), shape=(self.n_vocab,))
        return pick(logits, matcher)

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, *, ignore_eos: bool = False, constraint: Constraint | None = None
    ) -> list[int]:
        """Greedy tokens after the prompt (not the end token); with ``constraint``, the best token it
        allows at each step, until it is complete (its end token, when it takes one, is returned)."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if len(prompt_ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceed the context ({self.n_ctx})")
        self._ll.llama_memory_clear(self.ctx.memory, True)
        for s in range(0, len(prompt_ids), self.n_batch):
            chunk = prompt_ids[s : s + self.n_batch]
            self._decode(chunk, s, last_logits=s + len(chunk) == len(prompt_ids))
        out: list[int] = []
        pos = len(prompt_ids)
        matcher = constraint.start() if constraint is not None else None
        while len(out) < max_new_tokens:
            t = self._next(matcher)
            if t in self.eog and not ignore_eos:
                break
            out.append(t)
            if matcher is not None:
                matcher.advance(t)
                if matcher.done:
                    break
            if len(out) == max_new_tokens:
                break
            self._decode([t], pos, last_logits=True)
            pos += 1
        return out

    def close(self) -> None:
        if self._batch is not None:
            self._ll.llama_batch_free(self._batch)
            self._batch = None
            self.ctx.close()
            self.model.close()



class LlamaChat:
    """llama-cpp-python's ``Llama``: chat completion with the GGUF's own chat template, one request at a time.

    Errors are llama-cpp-python's own (ImportError without it; ValueError/RuntimeError/OSError for a file it
    cannot load, ValueError for a prompt that does not fit ``n_ctx``); the caller words them for its stage.
    """

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        self._vocab: LlamaVocab | None = None

    @property
    def vocab(self) -> LlamaVocab:
        """The model's vocabulary (``runtimes.constrain``'s), built on first use."""
        if self._vocab is None:
            self._vocab = LlamaVocab(self.llm._model)
        return self._vocab

    def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str],
        seed: int | None,
        constraint: Constraint | None = None,
    ) -> dict[str, Any]:
        """``create_chat_completion``'s OpenAI-shaped response; with ``constraint`` (built on
        :attr:`vocab`), every token is drawn from the ones it allows (a logits processor)."""
        kwargs: dict[str, Any] = {
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": stop,
        }
        if seed is not None:
            kwargs["seed"] = seed
        if constraint is not None:
            from llama_cpp import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([_ChatMask(constraint, self.vocab.eog_tokens)])
        return self.llm.create_chat_completion(**kwargs)


class LlamaVocab:
    """A llama.cpp model's vocabulary as ``runtimes.constrain`` wants it (pieces, end tokens, tokenize)."""

    def __init__(self, model: Any):
        import llama_cpp

        self._model = model
        self.n_vocab = int(model.n_vocab())
        vocab = model.vocab
        self.eog_tokens = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))
        self.pieces = [token_piece(llama_cpp, vocab, t) for t in range(self.n_vocab)]
        self.add_bos = bool(model.add_bos_token())

    def tokenize(self, text: str, *, special: bool, add_bos: bool) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos and self.add_bos, special)


class _ChatMask:
    """llama-cpp-python logits processor: the scores of one completion masked by its matcher. It is
    handed every token so far (prompt first), so the first call marks where the answer starts."""

    def __init__(self, constraint: Constraint, end_ids: frozenset[int]):
        self._constraint, self._end = constraint, end_ids
        self._rows: RowMatchers | None = None

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        ids = [int(t) for t in input_ids]
        if self._rows is None:
            self._rows = RowMatchers(self._constraint, 1, len(ids), self._end)
        self._rows.feed([ids])
        return np.where(self._rows.mask(0, scores.shape[-1]), scores, -np.inf).astype(scores.dtype, copy=False)
