"""llama.cpp runner for the engine, on llama-cpp-python's low-level API (no ``Llama`` object).

One context with ``n_seq_max = n_slots``; each slot is a sequence id with its own KV range
(``kv_unified=False``: ``ctx_per_slot`` tokens each). ``decode`` fills one ``llama_batch`` with
tokens of several sequences and returns a zero-copy view of the output rows' logits -- only the
rows asked for, which is why confidence needs no ``logits_all``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from edgedistill.errors import UserError

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
        self.pieces = [self._piece(t) for t in range(self.n_vocab)]
        self.add_bos = bool(self.model.add_bos_token())
        meta = self.model.metadata()
        self._template = _compile_template(meta.get("tokenizer.chat_template") or CHATML)
        self._bos = self._text(self.model.token_bos())
        self._eos = self._text(self.model.token_eos())
        self.description = self.model.desc()

    def _piece(self, t: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self.model.vocab, t, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self.model.vocab, t, buf, -n, 0, False)
        return buf.raw[: max(n, 0)]

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
            messages=messages, add_generation_prompt=True, bos_token=self._bos, eos_token=self._eos, raise_exception=_raise
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


def _raise(message: str):
    raise ValueError(message)


def _compile_template(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    return env.from_string(source)
