"""The frozen KD teacher's pass over the training rows, once: its final hidden states at the answer
positions, from which its logits are one matmul away.

Logit distillation needs the teacher's distribution at every answer token of every step. Running
the whole teacher for that at every step of every epoch was about half of a training step on a CPU
(restaurant8k: 30 teacher layers beside a 12-layer student). The teacher is frozen and in eval mode,
so its output for a row never changes: its last hidden state at each answer position (after the
final norm) is computed once, and each step applies only its output layer to it -- the exact
distribution, not a top-k approximation (at T=2 the tail beyond the teacher's top 64 tokens held
13 % of the mass on restaurant8k), for ``hidden_size`` numbers per answer token (576 in bfloat16 here: 1.2 KB).

A model whose logits are more than its output layer applied to the last hidden state (a final
soft-cap or a logit scale) fails the check on the first batch and keeps the per-step teacher pass.
After that first batch, each batch's common prefix (the system turn) runs once (``distill.shared_prefix``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from edgedistill.distill import shared_prefix
from edgedistill.distill.encode import IGNORE
from torch import nn


def answer_positions(labels: list[int]) -> list[int]:
    """Positions whose next token is an answer token (position t predicts token t+1), in order:
    the rows of ``DistillTrainer``'s ``logits[sel]`` for this example."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]


def _batch(rows: list[dict[str, list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return ids, mask


def _head_reproduces_logits(teacher: nn.Module, ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor) -> bool:
    """Whether the output layer applied to ``hidden`` gives the model's own logits (one batch)."""
    logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
    ours = teacher.get_output_embeddings()(hidden)
    return logits.shape == ours.shape and torch.allclose(ours.float(), logits.float(), rtol=1e-2, atol=1e-2)


@torch.no_grad()
def teacher_hidden(
    teacher: nn.Module,
    rows: list[dict[str, list[int]]],
    *,
    pad_id: int,
    batch_size: int = 32,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    device: Any = "cpu",
) -> list[torch.Tensor] | None:
    """Per row, the teacher's final hidden states at its answer positions, ``(n_answer, hidden)``
    in the teacher's dtype; None when the model's logits are not its output layer of them.

    Rows are run longest first in batches of ``batch_size`` (right-padded: causal attention makes
    a row's states independent of the padding after it)."""
    teacher.eval()
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    body = teacher.base_model
    checked = False
    share = True
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = _batch([rows[i] for i in idx], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        positions = [answer_positions(rows[i]["labels"]) for i in idx]
        # After the first batch (the check needs the full pass), the rows' common prefix runs once.
        first = min((p[0] for p in positions if p), default=0)
        n = shared_prefix.prefix_len(ids, mask, first) if checked and share else 0
        with autocast():
            run = shared_prefix.forward(body, ids, mask, n) if n else None
            if run is None:
                share = share and not n  # a model whose cache cannot be shared: stop trying
                n = 0
                run = body(input_ids=ids, attention_mask=mask, use_cache=False)
            hidden = run.last_hidden_state  # positions n.. of each row
            if not checked:
                if not _head_reproduces_logits(teacher, ids, mask, hidden):
                    return None
                checked = True
        for b, i in enumerate(idx):
            out[i] = hidden[b, [t - n for t in positions[b]]].detach().cpu()
    return out


def load_or_compute(path: Path, compute: Callable[[], list[torch.Tensor] | None]) -> list[torch.Tensor] | None:
    """The cache at ``path`` (kept beside the run's checkpoints, so a resumed run does not pay for
    the teacher pass again), else ``compute()`` saved there."""
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a half-written file from a killed run: compute it again
            path.unlink(missing_ok=True)
    hidden = compute()
    if hidden is not None:
        tmp = path.with_suffix(".tmp")
        torch.save(hidden, tmp)
        tmp.replace(path)
    return hidden
