"""One greedy step for compress's runtimes: the argmax of a logits row, under a constraint's mask
when there is one (``runtimes.constrain``), so llama.cpp, ONNX Runtime and transformers pick the
same way from their own logits."""

from __future__ import annotations

import numpy as np
from edgedistill.runtimes.constrain import Matcher, masked


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
