"""The machine's ceiling: decode tokens/s of the same model in-process, with no server in between.

The endpoints' prompts are prefilled, one sequence per slot, then ``concurrency`` sequences are
decoded together, greedy, for a fixed number of steps (end-of-generation ignored so every level
decodes the same number of tokens), on llama-cpp-python's low-level batch API through
``edgedistill.runtimes.llama.LlamaRunner`` -- the same calls the server makes, without HTTP, queueing,
sampling options or confidence. Only the decode steps are timed (prefill is reported apart).
``llama_cpp`` is imported only here, and only when a ceiling is asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MIN_TOKENS = 64  # decode at least this many steps: fewer is too short to time


def _prefill(runner: Any, seq: int, prompt: list[int]) -> np.ndarray:
    runner.seq_rm(seq, 0)
    last = None
    for p0 in range(0, len(prompt), runner.n_batch):
        chunk = prompt[p0 : p0 + runner.n_batch]
        outputs = [False] * len(chunk)
        if p0 + len(chunk) == len(prompt):
            outputs[-1] = True
        rows = runner.decode(chunk, list(range(p0, p0 + len(chunk))), [seq] * len(chunk), outputs)
        if outputs[-1]:
            last = np.array(rows[-1])
    return last


def measure(runner: Any, prompts: Sequence[list[int]], concurrency: int, new_tokens: int) -> dict[str, Any]:
    """Decode ``new_tokens`` greedy tokens for ``concurrency`` sequences together; tokens/s of the decode steps."""
    if concurrency > runner.n_slots:
        raise ValueError(f"concurrency {concurrency} is more than the runner's {runner.n_slots} slots")
    seqs = list(range(concurrency))
    ps = [list(prompts[i % len(prompts)]) for i in seqs]
    t0 = time.perf_counter()
    nxt = [int(np.argmax(_prefill(runner, s, ps[s]))) for s in seqs]
    prefill_s = time.perf_counter() - t0
    pos = [len(p) for p in ps]
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits = runner.decode(nxt, pos, seqs, [True] * concurrency)
        nxt = [int(i) for i in np.argmax(logits, axis=1)]
        pos = [p + 1 for p in pos]
    decode_s = time.perf_counter() - t1
    tokens = concurrency * new_tokens
    return {
        "concurrency": concurrency,
        "decode_tokens": tokens,
        "decode_s": round(decode_s, 4),
        "prefill_s": round(prefill_s, 4),
        "decode_tokens_per_s": float(f"{tokens / decode_s:.6g}") if decode_s > 0 else None,
    }


def run_ceiling(
    runner: Any, messages: Sequence[list[dict[str, str]]], concurrencies: Sequence[int], new_tokens: int
) -> list[dict[str, Any]]:
    """The ceiling at each concurrency, after one short warm-up decode."""
    prompts = [runner.tokenize(runner.render_chat(m), special=True, add_bos=True) for m in messages]
    new_tokens = max(new_tokens, MIN_TOKENS)
    room = runner.ctx_per_slot - max(len(p) for p in prompts)
    if room < 1:
        raise ValueError("the prompts do not fit in the runner's context")
    new_tokens = min(new_tokens, room)
    measure(runner, prompts, 1, min(8, new_tokens))
    return [measure(runner, prompts, c, new_tokens) for c in concurrencies]


def gguf_runner(path: str, n_slots: int, threads: int, ctx_per_slot: int = 1024) -> Any:
    """A llama.cpp runner for a GGUF (``pypi:<package>/<file>`` paths work as in task specs)."""
    from edgedistill.errors import UserError
    from edgedistill.spec import resolve_path

    p = resolve_path(path, Path("."))
    if not p.is_file():
        raise UserError(f"--ceiling: {p} is not a file; give the GGUF the endpoint serves")
    from edgedistill.runtimes.llama import LlamaRunner  # imports llama_cpp

    return LlamaRunner(p, n_slots=n_slots, ctx_per_slot=ctx_per_slot, n_batch=512, n_threads=threads)


RunnerFactory = Callable[[str, int, int], Any]
