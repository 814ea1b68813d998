"""A batch's common prefix run once: the same outputs, for a fraction of the compute.

Every training row of a task starts with the same tokens: the chat template's system turn with the
task's instructions -- and for a tool_call task the tools, ~330 of a row's ~420 tokens. A forward
pass over a right-padded batch computes that prefix once per row. Here it is computed once per
batch (one row), its keys and values are repeated for every row (``Cache.batch_repeat_interleave``,
whose backward sums the rows' gradients into the one prefix), and the rest of each row attends to
them through the model's own cache path. Causal attention makes this exact: a position's output
depends only on the positions before it, so the suffix sees the same keys and values it would
have seen in the full pass, and the prefix's own outputs are never needed (no answer token is in
it). The loss and its gradients are the full pass's up to float rounding (a test pins it).

Used where the result is the same: models whose cache is plain per-layer keys and values
(``DynamicLayer``; not recurrent or sliding-window layers), a prefix of at least ``MIN_PREFIX``
tokens, every needed position after it, and one process (the trainer does not share under DDP or
DeepSpeed, untested there). Anything else runs the plain full pass. One difference
in training: attention dropout (off in the models we ship) would draw one mask for the shared
prefix instead of one per row.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

MIN_PREFIX = 16  # below this the second call costs more than the prefix saves


def common_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """The number of leading positions where every row has the same, unpadded token."""
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    return int(same.int().cumprod(0).sum())


def _plain_kv(cache: Any) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor, first_needed: int) -> int:
    """How many leading tokens to run once for a batch whose outputs are needed from position
    ``first_needed`` on (0: do not share)."""
    if input_ids.shape[0] < 2:
        return 0
    n = min(common_prefix_len(input_ids, attention_mask), first_needed)
    return n if n >= MIN_PREFIX else 0


def _cache_kwarg(module: nn.Module) -> str:
    """The forward argument that takes a cache: ``cache`` (transformers >= 5.2x), else ``past_key_values``."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # a peft model: its model's
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def forward(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, **kwargs: Any) -> Any:
    """``module(input_ids, attention_mask, **kwargs)`` for positions ``n`` on, the first ``n``
    tokens (common to every row) run once; None when the model's cache is not plain keys and
    values (run the full pass instead). ``module`` is a causal LM or its decoder body."""
    rows = input_ids.shape[0]
    head = {"logits_to_keep": 1} if "logits_to_keep" in kwargs else {}
    pre = module(input_ids=input_ids[:1, :n], attention_mask=attention_mask[:1, :n], use_cache=True, **head)
    cache = getattr(pre, "cache", None) or getattr(pre, "past_key_values", None)
    if not _plain_kv(cache):
        return None
    cache.batch_repeat_interleave(rows)
    kwargs[_cache_kwarg(module)] = cache
    return module(input_ids=input_ids[:, n:], attention_mask=attention_mask, use_cache=True, **kwargs)
