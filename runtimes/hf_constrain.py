"""A constraint (``runtimes.constrain``) inside transformers' ``generate``: a logits processor that
holds one matcher per row of the batch (``runtimes.masking.RowMatchers``) and masks each row's
scores to the tokens its matcher allows.

Rows are left-padded, so every row's new tokens start at the same column. A row ends at one of the
end tokens (``generate``'s ``eos_token_id`` is set to them, so transformers stops it there) or when
its matcher is complete; from then on it may only take an end token, which is what transformers
pads a finished row with anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from edgedistill.runtimes.constrain import Constraint
from edgedistill.runtimes.masking import RowMatchers


class ConstraintProcessor:
    """``LogitsProcessor``: scores of row *i* masked by matcher *i* (disallowed tokens at -inf)."""

    def __init__(self, constraint: Constraint, n_rows: int, prompt_len: int, end_ids: Iterable[int]):
        self.rows = RowMatchers(constraint, n_rows, prompt_len, end_ids)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.rows.feed(input_ids.tolist())
        allowed = torch.from_numpy(self.rows.masks(int(scores.shape[-1]))).to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))


def constrained_kwargs(constraint: Constraint, n_rows: int, prompt_len: int, end_ids: Iterable[int]) -> dict[str, Any]:
    """``generate`` keyword arguments that decode every row under ``constraint`` and stop a row at
    any of ``end_ids``."""
    from transformers import LogitsProcessorList

    ends = sorted(set(end_ids))
    return {"logits_processor": LogitsProcessorList([ConstraintProcessor(constraint, n_rows, prompt_len, ends)]), "eos_token_id": ends}
