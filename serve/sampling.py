"""Sampling one token from a logits row: OpenAI's logit_bias and penalties, temperature and top_p
(greedy below ``MIN_TEMPERATURE``). The engine's; numpy only."""

from __future__ import annotations

import numpy as np


def adjusted(
    logits: np.ndarray,
    logit_bias: dict[int, float] | None,
    presence_penalty: float,
    frequency_penalty: float,
    counts: dict[int, int],
) -> np.ndarray:
    """OpenAI's logit_bias and presence/frequency penalties on a copy of the row."""
    x = np.array(logits, dtype=np.float32)
    for t, b in (logit_bias or {}).items():
        if 0 <= t < x.size:
            x[t] += b
    if counts and (presence_penalty or frequency_penalty):
        ids = np.fromiter(counts.keys(), dtype=np.int64)
        n = np.fromiter(counts.values(), dtype=np.float32)
        x[ids] -= frequency_penalty * n + presence_penalty
    return x


MIN_TEMPERATURE = 1e-4  # below: greedy (logits / 1e-309 overflow to inf, and the probabilities to NaN)


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature < MIN_TEMPERATURE:
        return int(logits.argmax())
    x = logits.astype(np.float64) / temperature
    if top_p < 1.0:
        # the nucleus almost always lies in the top few hundred tokens: avoid sorting the vocabulary
        k = min(256, x.size - 1)
        cand = np.argpartition(-x, k)[:k]
        m = x.max()
        total = np.exp(x - m).sum()
        cand = cand[np.argsort(-x[cand])]
        probs = np.exp(x[cand] - m) / total
        if probs.sum() < top_p:  # flat distribution: fall back to the full sort
            cand = np.argsort(-x)
            probs = np.exp(x[cand] - m) / total
        cut = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        cand, probs = cand[:cut], probs[:cut]
        return int(cand[rng.choice(len(cand), p=probs / probs.sum())])
    m = x.max()
    probs = np.exp(x - m)
    probs /= probs.sum()
    return int(rng.choice(x.size, p=probs))
