"""The engine: one thread owns the model and runs continuous batching over a fixed set of slots.

Why one thread: on a small CPU box the model saturates the cores; a thread per request (or a global
lock, as in llama-cpp-python's server) only queues requests behind each other. Here every running
sequence advances in the same forward pass: each step's batch holds one new token per decoding
sequence plus chunks of prompts being prefilled, up to ``n_batch`` tokens. The asyncio side only
enqueues work and reads results: requests enter a bounded inbox (full -> ``QueueFull`` -> 429), and
tokens travel back through per-request asyncio queues fed with ``loop.call_soon_threadsafe``. A slot
keeps its KV cache after a request, so the next prompt with the same prefix (a system prompt, the
task template) only prefills what differs.

Jump-forward: under a constraint, a token the mask admits alone (after ``card_`` only ``arrival``
spells a label) needs no logits to be chosen -- greedy or sampled, it is the only choice, with
probability 1. The engine appends such tokens to the sequence right after the sampled one and
decodes them all in the same ``decode`` call (logits only at the last), instead of one step each;
when the mask admits nothing more, or only one end token, the answer ends without another decode.
The tokens, their probabilities (1.0, marked ``forced``) and the label scorer's walk are the ones
stepping one token at a time gives (see docs/performance.md).

The model itself is behind ``Runner`` (``edgedistill.runtimes.base``; opened by ``runtimes.registry``; a numpy
fake in the tests).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from edgedistill.runtimes.base import Runner, common_prefix
from edgedistill.runtimes.constrain import Constraint, Matcher, masked
from edgedistill.serve.confidence import LabelScorer
from edgedistill.serve.sampling import adjusted, sample

log = logging.getLogger("edgedistill.serve")


class QueueFull(Exception):
    """More requests are waiting than the server admits; answer 429."""


@dataclass
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the sampled token's logprob plus the top k
    confidence: bool = True
    label_trie: dict | None = None
    stream: bool = False
    constraint: Constraint | None = None  # a token mask (labels, a JSON schema, a tool call): see runtimes.constrain
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to the token's logit before sampling
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the number of times it was generated


@dataclass
class SeqResult:
    index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_probs: list[float]
    label_scorer: LabelScorer | None
    logprobs: list[dict[str, Any]]
    first_token_s: float | None
    tokens: list[int] = field(default_factory=list)  # the generated token ids (an end-of-generation one included)
    forced: list[bool] = field(default_factory=list)  # per token in token_probs: the constraint allowed only it


@dataclass(eq=False)
class _Seq:
    index: int
    prompt: list[int]
    params: GenParams
    handle: RequestHandle
    rng: np.random.Generator
    slot: int = -1
    n_past: int = 0  # tokens of this sequence already in the KV cache
    pending: list[int] | None = None  # tokens chosen, not yet decoded: the sampled one and those the constraint forced after it
    allowed: Any = None  # the matcher's mask for the next token, computed while jumping forward (consumed by _on_logits)
    generated: list[int] = field(default_factory=list)
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    flushed: str = ""
    held: str = ""
    lp_pending: list[dict[str, Any]] = field(default_factory=list)
    lp_all: list[dict[str, Any]] = field(default_factory=list)
    token_probs: list[float] = field(default_factory=list)
    scorer: LabelScorer | None = None
    matcher: Matcher | None = None
    forced: list[bool] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> times (penalties)
    first_token_s: float | None = None
    done: bool = False


class RequestHandle:
    """What a request holds: its event queue (async side) and its sequences (engine side)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n = n
        self.cancelled = False
        self.submitted_at = time.perf_counter()

    def put(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # loop closed: the client is gone
            self.cancelled = True

    async def results(self) -> list[SeqResult]:
        """Wait for every choice (non-streaming use)."""
        out: list[SeqResult | None] = [None] * self.n
        remaining = self.n
        while remaining:
            kind, index, payload = await self.queue.get()
            if kind == "error":
                raise RuntimeError(payload)
            if kind == "done":
                out[index] = payload
                remaining -= 1
        return [r for r in out if r is not None]


def _deliver(batch: list[tuple[RequestHandle, tuple]]) -> None:
    for h, ev in batch:
        h.queue.put_nowait(ev)


class Engine:
    def __init__(self, runner: Runner, *, max_queue: int = 32, name: str = "engine", jump_forward: bool = True):
        self.runner = runner
        self.max_queue = max_queue
        self.jump_forward = jump_forward
        # a chain of forced tokens per sequence and step: every slot's chain fits one decode call
        self._max_chain = max(1, runner.n_batch // max(1, runner.n_slots))
        self._inbox: deque[_Seq] = deque()
        self._slots: list[_Seq | None] = [None] * runner.n_slots
        self._cached: list[list[int]] = [[] for _ in range(runner.n_slots)]  # tokens in each slot's KV
        self._outbox: list[tuple[RequestHandle, tuple]] = []  # this step's events, delivered together by _post
        self._cv = threading.Condition()
        self._stop = False
        self.steps = 0
        self.failed: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- async side ---------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._inbox)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def ready(self) -> bool:
        return self.failed is None and self._thread.is_alive()

    def submit(self, prompts: list[list[int]], params: list[GenParams], loop: asyncio.AbstractEventLoop) -> RequestHandle:
        handle = RequestHandle(loop, len(prompts))
        with self._cv:
            free = sum(s is None for s in self._slots)
            if len(self._inbox) + len(prompts) > self.max_queue + free:
                raise QueueFull
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                # numpy wants a non-negative seed; OpenAI's is any integer (clients send -1)
                rng = np.random.default_rng(None if p.seed is None else (p.seed + i) % 2**64)
                seq = _Seq(index=i, prompt=prompt, params=p, handle=handle, rng=rng)
                if p.label_trie is not None:
                    seq.scorer = LabelScorer(p.label_trie, self.runner.eog_tokens)
                if p.constraint is not None:
                    seq.matcher = p.constraint.start()
                self._inbox.append(seq)
            self._cv.notify()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        handle.cancelled = True
        with self._cv:
            self._cv.notify()

    def stop(self) -> None:
        """Stop the engine thread, leaving the runner open (its owner closes it)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def close(self) -> None:
        self.stop()
        self.runner.close()

    # ---- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    self._drop_cancelled()
                    while not self._stop and not self._inbox and not any(self._slots):
                        self._cv.wait()
                        self._drop_cancelled()
                    if self._stop:
                        return
                    self._admit()
                try:
                    self._step()
                except RuntimeError as e:  # a failed llama_decode: fail the running requests, keep serving
                    log.error("decode failed: %s", e)
                    for s in list(self._slots):
                        if s is not None:
                            self.runner.seq_rm(s.slot, 0)
                            s.n_past = 0
                            s.generated = []
                            self._release(s)
                            self._send(s.handle, ("error", s.index, str(e)))
                self._post()
        except Exception as e:  # a runner bug must not leave requests hanging forever
            log.exception("engine thread failed")
            self.failed = f"{type(e).__name__}: {e}"
            self._post()
            for s in [*self._slots, *self._inbox]:
                if s is not None:
                    s.handle.put(("error", s.index, self.failed))

    def _send(self, handle: RequestHandle, event: tuple) -> None:
        self._outbox.append((handle, event))

    def _post(self) -> None:
        """Deliver the step's events: one wakeup of each event loop per step, not one per token and
        sequence (a woken loop thread takes a core from the decode threads; docs/performance.md H1)."""
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, tuple]]] = {}
        for h, ev in items:
            by_loop.setdefault(h.loop, []).append((h, ev))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # loop closed: the clients are gone
                for h, _ in batch:
                    h.cancelled = True

    def _drop_cancelled(self) -> None:
        if any(s.handle.cancelled for s in self._inbox):
            self._inbox = deque(s for s in self._inbox if not s.handle.cancelled)
        for i, s in enumerate(self._slots):
            if s is not None and s.handle.cancelled:
                self._release(s)

    def _admit(self) -> None:
        while self._inbox and None in self._slots:
            seq = self._inbox.popleft()
            free = [i for i, s in enumerate(self._slots) if s is None]
            # the free slot whose cached tokens share the longest prefix with this prompt
            best = max(free, key=lambda i: common_prefix(self._cached[i], seq.prompt))
            keep = min(common_prefix(self._cached[best], seq.prompt), len(seq.prompt) - 1)
            self.runner.seq_rm(best, keep)
            self._cached[best] = self._cached[best][:keep]
            seq.slot, seq.n_past = best, keep
            self._slots[best] = seq

    def _release(self, seq: _Seq) -> None:
        seq.done = True
        self._slots[seq.slot] = None
        self._cached[seq.slot] = (seq.prompt + seq.generated)[: seq.n_past]

    def _step(self) -> None:
        r = self.runner
        tokens: list[int] = []
        pos: list[int] = []
        seqs: list[int] = []
        outputs: list[bool] = []
        samplers: list[_Seq] = []
        # decoding sequences first: their tokens (one, or a forced chain) keep every stream moving while prompts prefill
        for s in self._slots:
            if s is not None and s.pending is not None:
                last = len(s.pending) - 1
                for j, t in enumerate(s.pending):
                    tokens.append(t)
                    pos.append(s.n_past + j)
                    seqs.append(s.slot)
                    outputs.append(j == last)
                samplers.append(s)
        budget = r.n_batch - len(tokens)
        chunks: dict[int, int] = {}
        for s in self._slots:
            if s is None or s.pending is not None or budget <= 0:
                continue
            chunk = s.prompt[s.n_past : s.n_past + budget]
            last = s.n_past + len(chunk) == len(s.prompt)
            for j, t in enumerate(chunk):
                tokens.append(t)
                pos.append(s.n_past + j)
                seqs.append(s.slot)
                outputs.append(last and j == len(chunk) - 1)
            budget -= len(chunk)
            chunks[s.slot] = len(chunk)
            if last:
                samplers.append(s)
        if not tokens:
            return
        logits = r.decode(tokens, pos, seqs, outputs)
        self.steps += 1
        for s in self._slots:
            if s is None:
                continue
            if s.pending is not None:
                s.n_past += len(s.pending)
                s.pending = None
            else:
                s.n_past += chunks.get(s.slot, 0)
        # rows come in output order: decoding sequences first, then prompts that just finished
        for row, s in enumerate(samplers):
            try:
                self._on_logits(s, logits[row])
            except Exception as e:  # one request's failure must not stop the engine for every request
                log.exception("sampling failed")
                if not s.done:
                    self._release(s)
                self._send(s.handle, ("error", s.index, f"{type(e).__name__}: {e}"))

    def _on_logits(self, s: _Seq, logits: np.ndarray) -> None:
        p = s.params
        if p.logit_bias or (s.counts and (p.presence_penalty or p.frequency_penalty)):
            logits = adjusted(logits, p.logit_bias, p.presence_penalty, p.frequency_penalty, s.counts)
        forced = False
        if s.matcher is not None:
            allowed = s.allowed if s.allowed is not None else s.matcher.allowed()
            s.allowed = None
            n_allowed = int(np.count_nonzero(allowed))
            if n_allowed == 0:  # the constraint admits nothing more (complete): end here
                return self._finish(s, "stop")
            forced = n_allowed == 1
            # every probability below is the model's renormalised over what the constraint allows
            logits = masked(logits, allowed)
        tok = sample(logits, p.temperature, p.top_p, s.rng)
        if s.first_token_s is None:
            s.first_token_s = time.perf_counter() - s.handle.submitted_at
        if not self._emit(s, tok, forced, logits):
            s.pending = [tok]
            if self.jump_forward and s.matcher is not None:
                self._jump(s)

    def _jump(self, s: _Seq) -> None:
        """Append the tokens the constraint forces after ``s.pending`` (each the only one its mask
        admits) without asking the model; they are decoded with it in one call. Stops at a choice
        (its mask kept for ``_on_logits``), or where the answer ends."""
        while len(s.pending) < self._max_chain:
            allowed = s.matcher.allowed()
            if allowed is None:
                return
            ids = np.flatnonzero(allowed)
            if ids.size == 0:  # complete: the step after would end it before sampling anything
                return self._finish(s, "stop")
            tok = int(ids[0])
            if ids.size > 1 or (s.scorer is not None and not s.scorer.forced(tok)):
                s.allowed = allowed
                return
            if self._emit(s, tok, True, None):
                return
            s.pending.append(tok)

    def _emit(self, s: _Seq, tok: int, forced: bool, logits: np.ndarray | None) -> bool:
        """Record a chosen token (``logits`` None: forced, chosen without them); True when it ended the sequence."""
        p = s.params
        s.generated.append(tok)
        if p.presence_penalty or p.frequency_penalty:
            s.counts[tok] = s.counts.get(tok, 0) + 1
        if s.matcher is not None and tok not in self.runner.eog_tokens:
            s.matcher.advance(tok)
        if logits is None:  # the only token allowed: probability 1 (what the masked softmax gives it exactly)
            if p.confidence:
                s.token_probs.append(1.0)
                s.forced.append(True)
            if s.scorer is not None and s.scorer.node is not None:
                s.scorer.step_forced(tok)
            if p.logprobs is not None and tok not in self.runner.eog_tokens:
                entry = self._forced_entry(tok, p.logprobs)
                s.lp_pending.append(entry)
                s.lp_all.append(entry)
        elif p.confidence or p.logprobs is not None or s.scorer is not None:
            m = float(logits.max())
            lse = m + math.log(float(np.exp(logits - m).sum()))
            if p.confidence:
                s.token_probs.append(math.exp(float(logits[tok]) - lse))
                s.forced.append(forced)
            if s.scorer is not None and s.scorer.node is not None:
                s.scorer.step(logits, lse, tok)
            if p.logprobs is not None and tok not in self.runner.eog_tokens:
                entry = self._logprob_entry(tok, float(logits[tok]) - lse, logits, lse, p.logprobs)
                s.lp_pending.append(entry)
                s.lp_all.append(entry)
        if tok in self.runner.eog_tokens:
            self._finish(s, "stop")
            return True
        text = s.decoder.decode(self.runner.pieces[tok])
        if text and self._add_text(s, text):
            self._finish(s, "stop", stopped=True)
            return True
        if len(s.generated) >= p.max_tokens:
            self._finish(s, "length")
            return True
        return False

    def _forced_entry(self, tok: int, k: int) -> dict[str, Any]:
        """A forced token's logprobs entry: log 1 = 0, and it is the only alternative."""
        piece = self.runner.pieces[tok]
        alt = {"token": piece.decode("utf-8", "replace"), "logprob": 0.0, "bytes": list(piece)}
        return {**alt, "top_logprobs": [dict(alt)] if k else []}

    def _logprob_entry(self, tok: int, logp: float, logits: np.ndarray, lse: float, k: int) -> dict[str, Any]:
        piece = self.runner.pieces[tok]
        entry: dict[str, Any] = {
            "token": piece.decode("utf-8", "replace"),
            "logprob": logp,
            "bytes": list(piece),
            "top_logprobs": [],
        }
        if k:
            top = np.argpartition(-logits, k)[:k]
            top = top[np.argsort(-logits[top])]
            for t in top:
                if not math.isfinite(float(logits[t])):  # masked out by the constraint
                    continue
                pc = self.runner.pieces[int(t)]
                entry["top_logprobs"].append(
                    {"token": pc.decode("utf-8", "replace"), "logprob": float(logits[t]) - lse, "bytes": list(pc)}
                )
        return entry

    def _add_text(self, s: _Seq, text: str) -> bool:
        """Append text, hold back what could start a stop string; True when a stop string ended it."""
        buf = s.held + text
        stops = s.params.stop
        if stops:
            hits = [i for i in (buf.find(x) for x in stops) if i >= 0]
            if hits:
                s.held = ""
                self._flush(s, buf[: min(hits)])
                return True
            keep = 0
            for x in stops:
                for k in range(min(len(buf), len(x) - 1), 0, -1):
                    if buf.endswith(x[:k]):
                        keep = max(keep, k)
                        break
            s.held = buf[len(buf) - keep :] if keep else ""
            buf = buf[: len(buf) - keep]
        else:
            s.held = ""
        self._flush(s, buf)
        return False

    def _flush(self, s: _Seq, text: str) -> None:
        if not text and not s.lp_pending:
            return
        s.flushed += text
        if s.params.stream:
            self._send(s.handle, ("delta", s.index, (text, s.lp_pending)))
        s.lp_pending = []

    def _finish(self, s: _Seq, reason: str, stopped: bool = False) -> None:
        if not stopped:
            tail = s.held + s.decoder.decode(b"", final=True)
            s.held = ""
            if tail:
                if s.params.stop and self._add_text(s, tail):
                    reason = "stop"
                elif not s.params.stop:
                    self._flush(s, tail)
                if s.held:  # an unfinished stop-string prefix at the very end is text after all
                    self._flush(s, s.held)
                    s.held = ""
        if s.lp_pending and s.params.stream:
            self._flush(s, "")
        n_gen = len(s.generated)
        result = SeqResult(
            index=s.index,
            text=s.flushed,
            finish_reason=reason,
            prompt_tokens=len(s.prompt),
            completion_tokens=n_gen,
            token_probs=s.token_probs,
            label_scorer=s.scorer,
            logprobs=s.lp_all,
            first_token_s=s.first_token_s,
            tokens=list(s.generated),
            forced=s.forced,
        )
        self._release(s)
        self._send(s.handle, ("done", s.index, result))
