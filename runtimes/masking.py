"""A constraint (``runtimes.constrain``) applied to the logits the runtimes return, the same way
for llama.cpp, ONNX Runtime and transformers:

- :func:`pick`: one greedy step, the best token the matcher allows (compress's ``Runtime``\\ s);
- :class:`RowMatchers`: one matcher per row of a decoder that hands over the tokens so far and the
  next scores (transformers' ``generate``, llama-cpp-python's chat completion): it feeds each row's
  new tokens to its matcher and gives the row's mask; a row that ended (an end token, or its
  matcher complete) may only take an end token.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from edgedistill.runtimes.constrain import Constraint, Matcher, masked


def pick(logits: np.ndarray, matcher: Matcher | None) -> int:
    """The greedy token of one logits row; with ``matcher``, the best token it allows.

    A mask shorter than the row (a runtime whose rows are padded past the tokenizer's vocabulary)
    forbids the extra ids; a mask that allows nothing is a constraint bug, not an answer."""
    if matcher is None:
        return int(np.argmax(logits))
    allowed = matcher.allowed()
    if allowed is not None:
        n = logits.shape[-1]
        if allowed.size < n:
            allowed = np.concatenate([allowed, np.zeros(n - allowed.size, dtype=bool)])
        if not allowed[:n].any():
            raise RuntimeError("the answer's constraint allows no token here")
    return int(np.argmax(masked(logits, allowed)))


class RowMatchers:
    """A matcher per row; ``prompt_len``: where each row's generated tokens start (rows left-padded
    to one length, or a single row)."""

    def __init__(self, constraint: Constraint, n_rows: int, prompt_len: int, end_ids: Iterable[int]):
        self.matchers = [constraint.start() for _ in range(n_rows)]
        self.finished = [False] * n_rows
        self.seen = prompt_len  # tokens of each row already given to its matcher
        self.end_ids = sorted(set(end_ids))
        self._end = set(self.end_ids)

    def feed(self, rows: Sequence[Sequence[int]]) -> None:
        """Every row's tokens so far (prompt included); the new ones go to the matchers."""
        for r, row in enumerate(rows):
            for t in row[self.seen :]:
                if self.finished[r]:
                    break
                if int(t) in self._end:
                    self.finished[r] = True
                else:
                    self.matchers[r].advance(int(t))
                    self.finished[r] = self.matchers[r].done
        if rows:
            self.seen = len(rows[0])

    def mask(self, row: int, width: int) -> np.ndarray:
        """Row ``row``'s allowed tokens over ``width`` ids."""
        out = np.zeros(width, dtype=bool)
        if self.finished[row]:
            out[[t for t in self.end_ids if t < width]] = True
            return out
        allowed = self.matchers[row].allowed()
        if allowed is None:
            out[:] = True
        else:
            n = min(width, allowed.size)
            out[:n] = allowed[:n]
        if not out.any():
            raise RuntimeError("the answer's constraint allows no token here")
        return out

    def masks(self, width: int) -> np.ndarray:
        return np.stack([self.mask(r, width) for r in range(len(self.matchers))])
