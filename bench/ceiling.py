"""The machine's ceiling: decode tokens/s of the same model in-process, with no server in between.

The endpoints' prompts are prefilled, one sequence per slot, then ``concurrency`` sequences are
decoded together, greedy, for a fixed number of steps (end-of-generation ignored so every level
decodes the same number of tokens), on llama-cpp-python's low-level batch API through
``edgedistill.runtimes.llama.LlamaRunner`` -- the same calls the server makes, without HTTP, queueing,
sampling options or confidence. Only the decode steps are timed (prefill is reported apart).
``llama_cpp`` is imported only here, and only when a ceiling is asked for.

:func:`request_ceiling` is the ceiling of a request workload (a task's answers): the same prompts,
greedy under the task's constraint, on the same runner in this process, with the scheduling the
server uses (one decode per step, forced tokens chained, prompt prefixes kept per slot) and nothing
else, so a server's requests/s over it is what the rest of the server costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edgedistill.runtimes.base import common_prefix
from edgedistill.runtimes.masking import pick

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


@dataclass
class _Request:
    prompt: list[int]
    todo: list[int]  # tokens to decode next: the prompt's uncached rest, then each step's chosen (and forced) tokens
    n_past: int
    matcher: Any
    out: list[int] = field(default_factory=list)


def request_ceiling(
    runner: Any, prompts: Sequence[list[int]], constraint: Any, concurrency: int, max_tokens: int, *, warmup: int = 0
) -> dict[str, Any]:
    """Requests/s of ``prompts`` answered in this process on the runner alone: ``concurrency`` in
    flight, one ``decode`` per step for all of them, greedy under ``constraint``
    (``runtimes.constrain``), the tokens it forces decoded with the chosen one, each slot's KV kept
    for the next prompt's common prefix -- the work ``/v1/predict`` does, without HTTP, queueing or
    confidence. ``warmup`` requests first (the slots' caches filled, as a server's in steady state)."""
    if concurrency > runner.n_slots:
        raise ValueError(f"concurrency {concurrency} is more than the runner's {runner.n_slots} slots")
    cached: list[list[int]] = [[] for _ in range(runner.n_slots)]

    def admit(slot: int, prompt: list[int]) -> _Request:
        keep = min(common_prefix(cached[slot], prompt), len(prompt) - 1)
        runner.seq_rm(slot, keep)
        return _Request(prompt, prompt[keep:], keep, constraint.start() if constraint is not None else None)

    def chosen(r: _Request, tok: int) -> bool:
        """Record ``tok`` and the tokens forced after it; True when the answer is complete."""
        while True:
            if tok in runner.eog_tokens or len(r.out) >= max_tokens:
                return True
            r.out.append(tok)
            r.todo.append(tok)
            if r.matcher is None:
                return False
            r.matcher.advance(tok)
            allowed = r.matcher.allowed()
            ids = np.flatnonzero(allowed) if allowed is not None else None
            if ids is not None and ids.size == 0:
                return True
            if ids is None or ids.size > 1:
                return False
            tok = int(ids[0])

    def run(batch: Sequence[list[int]]) -> float:
        queue = list(batch)[::-1]
        live: dict[int, _Request] = {}
        t0 = time.perf_counter()
        while queue or live:
            for slot in range(concurrency):
                if slot not in live and queue:
                    live[slot] = admit(slot, queue.pop())
            tokens, pos, seqs, outputs, rows = [], [], [], [], []
            for slot, r in live.items():
                n = min(len(r.todo), runner.n_batch - len(tokens))
                if n <= 0:
                    continue
                tokens += r.todo[:n]
                pos += range(r.n_past, r.n_past + n)
                seqs += [slot] * n
                outputs += [False] * (n - 1) + [n == len(r.todo)]
                if n == len(r.todo):
                    rows.append(slot)
                r.n_past += n
                del r.todo[:n]
            logits = runner.decode(tokens, pos, seqs, outputs)
            for row, slot in enumerate(rows):
                r = live[slot]
                if chosen(r, pick(logits[row], r.matcher)):
                    cached[slot] = (r.prompt + r.out)[: r.n_past]
                    del live[slot]
        return time.perf_counter() - t0

    if warmup:
        run([prompts[i % len(prompts)] for i in range(warmup)])
    wall = run(prompts)
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "wall_s": round(wall, 4),
        "requests_per_s": float(f"{len(prompts) / wall:.6g}") if wall > 0 else None,
    }


def gguf_runner(path: str, n_slots: int, threads: int, ctx_per_slot: int = 1024) -> Any:
    """A llama.cpp runner for a GGUF (``pypi:<package>/<file>`` paths work as in task specs)."""
    from edgedistill.datafiles import resolve_path
    from edgedistill.errors import UserError

    p = resolve_path(path, Path("."))
    if not p.is_file():
        raise UserError(f"--ceiling: {p} is not a file; give the GGUF the endpoint serves")
    from edgedistill.runtimes.llama import LlamaRunner  # imports llama_cpp

    return LlamaRunner(p, n_slots=n_slots, ctx_per_slot=ctx_per_slot, n_batch=512, n_threads=threads)


RunnerFactory = Callable[[str, int, int], Any]
