"""A constraint (``runtimes.constrain``) inside transformers' ``generate``: a logits processor that
holds one matcher per row of the batch and masks each row's scores to the tokens its matcher allows.

Rows are left-padded, so every row's new tokens start at the same column. A row ends at one of the
end tokens (``generate``'s ``eos_token_id`` is set to them, so transformers stops it there) or when
its matcher is complete; from then on it may only take an end token, which is what transformers
pads a finished row with anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from edgedistill.runtimes.constrain import Constraint


class ConstraintProcessor:
    """``LogitsProcessor``: scores of row *i* masked by matcher *i* (disallowed tokens at -inf)."""

    def __init__(self, constraint: Constraint, n_rows: int, prompt_len: int, end_ids: Iterable[int]):
        self.matchers = [constraint.start() for _ in range(n_rows)]
        self.finished = [False] * n_rows
        self.seen = prompt_len  # columns of input_ids already given to the matchers
        self.end_ids = sorted(set(end_ids))
        self._end = set(self.end_ids)

    def _feed(self, row: int, tokens: list[int]) -> None:
        m = self.matchers[row]
        for t in tokens:
            if self.finished[row]:
                return
            if t in self._end:
                self.finished[row] = True
            else:
                m.advance(t)
                self.finished[row] = m.done

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

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        new = input_ids[:, self.seen :].tolist()
        self.seen = int(input_ids.shape[1])
        for r, toks in enumerate(new):
            self._feed(r, toks)
        width = int(scores.shape[-1])
        allowed = torch.from_numpy(np.stack([self.mask(r, width) for r in range(len(self.matchers))])).to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))


def constrained_kwargs(constraint: Constraint, n_rows: int, prompt_len: int, end_ids: Iterable[int]) -> dict[str, Any]:
    """``generate`` keyword arguments that decode every row under ``constraint`` and stop a row at
    any of ``end_ids``."""
    from transformers import LogitsProcessorList

    ends = sorted(set(end_ids))
    return {"logits_processor": LogitsProcessorList([ConstraintProcessor(constraint, n_rows, prompt_len, ends)]), "eos_token_id": ends}
