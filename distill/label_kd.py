"""Label distillation from soft labels (an API teacher's distribution over a classification
task's labels, ``distill.soft_labels``): the pieces ``distill.train`` builds its label KL from.

The student's score of a label is the sum of its log-probabilities of the label's answer tokens
(the label and the end-of-turn marker, as trained) after the prompt; its distribution over the
compared labels is ``softmax(score / T)``, the teacher's ``p^(1/T)`` renormalised over them, and
the loss ``T^2 * KL(teacher_T || student_T)`` per example, divided by the mean number of answer
tokens of its label rows: a label's score sums its tokens' log-probabilities, so without it the
KL is about that many times the per-token CE it is blended with (measured: 2.6x at the start of the
BANKING77 run, whose hard-label CE it then swamped under gradient clipping). The labels compared are the teacher's
with probability at least :data:`SOFT_LABEL_MIN_PROB` plus the hard label: one forward row per
compared label, so labels the teacher gives (next to) nothing cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from edgedistill.distill.soft_labels import soften

from edgedistill.errors import UserError

SOFT_LABEL_MIN_PROB = 1e-3  # teacher labels below this are left out of the label KL
IGNORE = -100


def compared_labels(soft_labels: dict[str, float], answer: str, temperature: float) -> tuple[list[str], list[float]]:
    """The labels one example's KL compares (sorted) and the teacher's distribution over them at ``temperature``."""
    kept = {k: float(p) for k, p in soft_labels.items() if float(p) >= SOFT_LABEL_MIN_PROB}
    kept.setdefault(answer, float(soft_labels.get(answer, 0.0)))
    if sum(kept.values()) <= 0:
        raise UserError("a training example's soft_labels give no probability to any label")
    soft = soften({k: p for k, p in kept.items() if p > 0}, temperature)
    names = sorted(kept)
    return names, [soft.get(name, 0.0) for name in names]


def soft_label_rows(encode: Callable[[str], dict[str, list[int]]], example: dict[str, Any], index: int, temperature: float) -> dict[str, Any]:
    """One training example's label-KL rows: ``kd_rows`` (``encode(label)`` per compared label) and
    ``kd_probs`` (the teacher's distribution over them at ``temperature``); none when only the hard
    label is compared (a teacher sure of it: the KL over one label is zero, its rows would be waste)."""
    soft = example["soft_labels"]
    if not isinstance(soft, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in soft.values()):
        raise UserError(f"training example {index}: soft_labels must map labels to probabilities")
    names, probs = compared_labels(soft, example["answer"], temperature)
    if len(names) < 2:
        return {}
    return {"kd_rows": [encode(name) for name in names], "kd_probs": probs}


def collate_soft(features: list[dict[str, Any]], pad: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The soft-label part of a batch: every compared label's row (``kd_rows``) padded by ``pad``
    as ``kd_input_ids``/``kd_attention_mask``/``kd_labels``, with ``kd_group`` (its example, 0..
    among those with soft labels) and ``kd_target`` (the teacher's probability); {} when none has any."""
    kd = [(g, row, p) for g, f in enumerate(features) for row, p in zip(f.get("kd_rows", ()), f.get("kd_probs", ()))]
    if not kd:
        return {}
    ids = {g: i for i, g in enumerate(dict.fromkeys(g for g, _, _ in kd))}
    out = {f"kd_{k}": v for k, v in pad([row for _, row, _ in kd]).items()}
    out["kd_group"] = torch.tensor([ids[g] for g, _, _ in kd], dtype=torch.long)
    out["kd_target"] = torch.tensor([p for _, _, p in kd], dtype=torch.float32)
    return out


def label_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(M,) the sum of log-probabilities of the ``target`` tokens (IGNORE elsewhere) under ``logits`` (M, L, vocab)."""
    mask = target != IGNORE
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def label_kl(scores: torch.Tensor, groups: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-group ``T^2 * KL(target || softmax(scores / T))``: ``scores`` (M,) the student's label
    log-probabilities, ``groups`` (M,) the example each belongs to (0..G-1), ``target`` (M,) the
    teacher's (already softened) probabilities, summing to one within each group. Returns (G,)."""
    t = temperature
    n = int(groups.max()) + 1 if groups.numel() else 0
    out = []
    for g in range(n):
        sel = groups == g
        s_logp = F.log_softmax(scores[sel].float() / t, dim=-1)
        p = target[sel].float()
        term = torch.where(p > 0, p * (torch.log(p.clamp(min=1e-30)) - s_logp), torch.zeros_like(p))
        out.append((t * t) * term.sum())
    return torch.stack(out) if out else scores.new_zeros(0)


def soft_label_kl(forward: Callable[[dict[str, torch.Tensor], torch.Tensor | None], torch.Tensor], inputs: dict[str, torch.Tensor],
                  keep_logits: bool, temperature: float) -> torch.Tensor:  # fmt: skip
    """Per-example label KL of the soft-label rows of a batch (:func:`collate_soft`); ``forward(rows,
    keep)`` is the student's logits (only at positions ``keep`` when ``keep_logits``)."""
    rows = {"input_ids": inputs["kd_input_ids"], "attention_mask": inputs["kd_attention_mask"]}
    target = inputs["kd_labels"][:, 1:]  # position t predicts token t+1
    keep = torch.nonzero((target != IGNORE).any(0)).squeeze(-1) if keep_logits else None
    logits = forward(rows, keep)
    scores = label_scores(logits[:, :-1], target) if keep is None else label_scores(logits, target[:, keep])
    kl = label_kl(scores, inputs["kd_group"], inputs["kd_target"], temperature)
    # per answer token, as the CE it is blended with: a label's score sums its tokens' log-probabilities
    return kl / answer_tokens(target, inputs["kd_group"])


def answer_tokens(target: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(G,) the mean number of answer tokens of each group's label rows (``target``: IGNORE elsewhere)."""
    counts = (target != IGNORE).sum(-1).float()
    sizes = torch.bincount(groups).float()
    return (counts.new_zeros(sizes.shape).index_add_(0, groups, counts) / sizes).clamp(min=1.0)
