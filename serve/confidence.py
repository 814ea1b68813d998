"""Per-response confidence from the student's own token probabilities, and its calibration.

Both kinds reduce to a vector of log-masses whose first entry is the answer's:

- classification: the answer label's probability normalised over the label set. The labels'
  token sequences form a trie; along the generated path the next-token distribution is
  renormalised over the trie node's children, and every sibling branch the sampler did not take is
  a competitor holding P(prefix) * q(sibling) -- exactly the total probability of the labels under
  that branch under label-constrained decoding. No label is scored separately, so this costs no
  extra forward pass. "End of answer here" (an end-of-generation token where a shorter label
  ends) is a branch too.
- generation: a low quantile q of the per-token probabilities of the sampled tokens (Gupta et al.,
  ICLR 2024: better than the length-biased mean log-probability), as the vector [log q, log(1-q)].

Calibration is temperature scaling on that vector: confidence = softmax(v / T)[0], with T fitted
on a calibration split (``fit_temperature``) and stored in the manifest as
``"calibration": {"temperature": T}`` (or per kind: ``{"classification": {"temperature": T}}``).
For generation this is sigmoid(logit(q) / T).

All of it needs only the logits of the position being sampled, which llama.cpp returns without
``logits_all`` (the ~3.4x slower path of llama-cpp-python's own logprobs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgedistill.runtimes.constrain import LABELS, TERMINAL, build_label_trie  # noqa: F401  (the trie lives with the mask)


def label_variants(label: str) -> list[str]:
    """Spellings parse_answer accepts for a label (it matches case-insensitively)."""
    return list(dict.fromkeys([label, label.lower(), label.capitalize(), label.upper(), label.title()]))


@dataclass
class LabelScorer:
    """Follows one generated sequence through the label trie, collecting the masses of the branches
    it did not take.

    At each trie node the next-token distribution is renormalised over the node's children (the
    continuations that still spell a label, plus "end here" where a label ends): the probability
    the model gives each label under label-constrained decoding. A sibling branch not taken keeps
    its whole renormalised mass, which is exactly the total of the labels under it, so no label is
    scored separately. A branch that spells only the answer's own label (another casing) counts
    for the answer; one that also leads to other labels counts against it (conservative). A token
    off the trie (a spelling the trie does not hold) is treated as one more branch, the answer's.
    """

    trie: dict
    eog_tokens: frozenset[int]
    node: dict | None = None
    prefix_logp: float = 0.0
    branches: list[tuple[float, frozenset[int]]] = field(default_factory=list)
    answer_logp: float | None = None

    def __post_init__(self):
        self.node = self.trie

    def step(self, logits: np.ndarray, lse: float, token: int) -> None:
        node = self.node
        if node is None:
            return
        children: dict[int, float] = {}
        for c in node:
            if c == LABELS:
                continue
            children[c] = (
                _logsumexp([float(logits[t]) - lse for t in self.eog_tokens]) if c == TERMINAL else float(logits[c]) - lse
            )
        taken = TERMINAL if token in self.eog_tokens else token
        off_trie = taken not in children
        own = float(logits[token]) - lse if off_trie else children[taken]
        log_z = _logsumexp([*children.values(), own] if off_trie else list(children.values()))
        for c, lp in children.items():
            if c != taken:
                self.branches.append((self.prefix_logp + lp - log_z, frozenset(node[c][LABELS])))
        self.prefix_logp += own - log_z
        if off_trie or taken == TERMINAL:
            self.node = None
            self.answer_logp = self.prefix_logp
        else:
            self.node = node[taken]

    def scores(self, answer_label: int | None = None) -> list[float]:
        """[answer log-mass, competitor log-masses...] once the parsed answer's label id is known."""
        answer = self.answer_logp if self.answer_logp is not None else self.prefix_logp
        competitors = []
        for lm, labels in self.branches:
            if answer_label is not None and labels == {answer_label}:
                answer = float(np.logaddexp(answer, lm))
            else:
                competitors.append(lm)
        return [answer, *competitors]


def _logsumexp(xs: Sequence[float]) -> float:
    if not xs:
        return -math.inf
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs)) if m > -math.inf else -math.inf


def generation_scores(token_probs: Sequence[float], quantile: float) -> list[float]:
    """[log q, log(1-q)] for the given low quantile q of per-token probabilities."""
    if not token_probs:
        return [-math.inf, 0.0]
    q = float(np.quantile(np.asarray(token_probs, dtype=np.float64), quantile))
    q = min(max(q, 1e-12), 1 - 1e-12)
    return [math.log(q), math.log1p(-q)]


def calibrated(scores: Sequence[float], temperature: float = 1.0) -> float:
    """softmax(scores / T)[0]: the calibrated probability that the answer is right."""
    v = np.asarray(scores, dtype=np.float64) / max(temperature, 1e-6)
    if not np.isfinite(v[0]):
        return 0.0
    v = v[np.isfinite(v)] if np.isfinite(v).sum() else v
    m = v.max()
    e = np.exp(v - m)
    return float(e[0] / e.sum())


def temperature_for(calibration: dict[str, Any] | None, kind: str) -> float:
    """The fitted temperature for 'classification' or 'generation' (1.0 when uncalibrated)."""
    cal = calibration or {}
    per_kind = cal.get(kind)
    if isinstance(per_kind, dict) and "temperature" in per_kind:
        return float(per_kind["temperature"])
    return float(cal.get("temperature", 1.0))


def fit_temperature(score_vectors: Sequence[Sequence[float]], correct: Sequence[bool]) -> float:
    """Temperature T minimising the negative log-likelihood of `correct` under softmax(v / T)[0].

    A 1-D problem: a log-spaced grid then a golden-section refinement; no optimiser dependency.
    """
    if len(score_vectors) != len(correct) or not score_vectors:
        raise ValueError("need one score vector per correctness flag, at least one")
    y = np.asarray(correct, dtype=bool)

    def nll(t: float) -> float:
        p = np.array([calibrated(v, t) for v in score_vectors]).clip(1e-9, 1 - 1e-9)
        return float(-(np.log(p[y]).sum() + np.log1p(-p[~y]).sum()))

    grid = np.exp(np.linspace(math.log(0.05), math.log(20.0), 61))
    i = int(np.argmin([nll(t) for t in grid]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)
