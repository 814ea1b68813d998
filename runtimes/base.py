"""The two contracts a runtime fulfils.

- :class:`Runner`: what serve's engine (and bench's ceiling) drives: a fixed set of slots, each one
  sequence with its own KV cache; ``decode`` runs tokens of several slots and returns only the
  logits rows asked for.
- :class:`Runtime`: what compress's quality gate and speed check drive: greedy decoding over token
  ids of the source tokenizer, one prompt at a time; under a ``constraint`` (``runtimes.constrain``,
  built on the source tokenizer's vocabulary), the best token it allows at each step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from edgedistill.runtimes.constrain import Constraint


class Runner(Protocol):
    n_vocab: int
    n_slots: int
    ctx_per_slot: int
    n_batch: int
    eog_tokens: frozenset[int]
    pieces: list[bytes]

    def tokenize(self, text: str, *, special: bool, add_bos: bool) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, str]]) -> str: ...

    def seq_rm(self, seq: int, p0: int) -> None: ...

    def decode(self, tokens: list[int], pos: list[int], seqs: list[int], outputs: list[bool]) -> np.ndarray: ...

    def close(self) -> None: ...


class Runtime(Protocol):
    """An artifact opened by its own runtime; greedy decoding over token ids of the source tokenizer."""

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, *, ignore_eos: bool = False, constraint: Constraint | None = None
    ) -> list[int]: ...

    def close(self) -> None: ...


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share (the KV a slot can keep; bench's ceiling reuses it)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
