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

import json
import math
from collections.abc import Sequence
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

    def forced(self, token: int) -> bool:
        """Whether ``token`` is the only branch here (or the walk is over): then ``step_forced`` is
        exactly ``step`` -- one child renormalised over itself has log-mass 0 and leaves no sibling."""
        node = self.node
        if node is None:
            return True
        children = [c for c in node if c != LABELS]
        if len(children) != 1:
            return False
        return children[0] == (TERMINAL if token in self.eog_tokens else token)

    def step_forced(self, token: int) -> None:
        """``step`` for a token that is the only branch (``forced``), which needs no logits."""
        node = self.node
        if node is None:
            return
        taken = TERMINAL if token in self.eog_tokens else token
        if taken == TERMINAL or taken not in node:
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


def json_leaf_spans(text: str) -> dict[str, tuple[int, int]]:
    """Character spans of the leaf values of the JSON object ``text`` starts with, by dotted path
    (``{"a": {"b": 1}}`` -> ``{"a.b": (11, 12)}``; a list of objects has fields ``a.0.b``, ``a.1.b``
    (tool calls); any other array or a scalar is one leaf). Empty when ``text`` is not a JSON object."""
    dec = json.JSONDecoder()
    spans: dict[str, tuple[int, int]] = {}

    def ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\n\r":
            i += 1
        return i

    def obj(i: int, prefix: str) -> int:  # i at "{"; returns the index after "}"
        i = ws(i + 1)
        if i < len(text) and text[i] == "}":
            return i + 1
        while True:
            key, i = dec.raw_decode(text, i)
            i = ws(ws(i) + 1)  # past ":"
            path = f"{prefix}{key}"
            if text[i] == "{":
                i = obj(i, path + ".")
            elif text[i] == "[" and text[ws(i + 1)] == "{":  # objects in a list: fields path.0.x, path.1.x ...
                i = objects(i, path + ".")
            else:
                _, end = dec.raw_decode(text, i)
                spans[path] = (i, end)
                i = end
            i = ws(i)
            if text[i] == "}":
                return i + 1
            i = ws(i + 1)  # past ","

    def objects(i: int, prefix: str) -> int:  # i at "["; returns the index after "]"
        k = 0
        while True:
            i = ws(i + 1)  # past "[" or ","
            if text[i] == "{":
                i = obj(i, f"{prefix}{k}.")
            else:
                _, end = dec.raw_decode(text, i)
                spans[f"{prefix}{k}"] = (i, end)
                i = end
            k += 1
            i = ws(i)
            if text[i] == "]":
                return i + 1

    start = ws(0)
    try:
        if start < len(text) and text[start] == "{":
            obj(start, "")
        else:
            return {}
    except (ValueError, IndexError):
        return {}
    return spans


@dataclass
class FieldConfidence:
    """The raw confidence of a JSON answer: one per leaf field (the low quantile of its value's
    tokens' probabilities) and one for the structure (the tokens outside every value: which keys to
    write, where the object ends). Tokens the constraint forced (the only allowed one) carry no
    information and are left out; a field with only forced tokens is certain (1.0)."""

    fields: dict[str, float]
    structure: float

    @property
    def lowest(self) -> float:
        return min([self.structure, *self.fields.values()])


def field_confidence(
    text: str, tokens: Sequence[int], pieces: Sequence[bytes], probs: Sequence[float], forced: Sequence[bool], quantile: float
) -> FieldConfidence | None:
    """Per-field confidence of a generated JSON object (None when ``text`` is not one).

    ``tokens``/``probs``/``forced`` are the engine's, one per generated token (probabilities already
    renormalised over what the constraint allowed). A token belongs to every value whose bytes it
    overlaps."""
    spans = json_leaf_spans(text)
    if not spans and not text.lstrip().startswith("{"):
        return None
    # byte offsets of the text, since tokens are bytes
    char_to_byte = [0]
    for ch in text:
        char_to_byte.append(char_to_byte[-1] + len(ch.encode("utf-8")))
    byte_spans = {k: (char_to_byte[a], char_to_byte[b]) for k, (a, b) in spans.items()}
    per_field: dict[str, list[float]] = {k: [] for k in spans}
    outside: list[float] = []
    pos = 0
    for tok, p, f in zip(tokens, probs, forced, strict=False):
        n = len(pieces[tok]) if 0 <= tok < len(pieces) else 0
        lo, hi = pos, pos + max(n, 1)
        pos += n
        if f:
            continue
        hit = [k for k, (a, b) in byte_spans.items() if lo < b and a < hi]
        for k in hit:
            per_field[k].append(p)
        if not hit:
            outside.append(p)

    def q(xs: list[float]) -> float:
        return float(np.quantile(np.asarray(xs, dtype=np.float64), quantile)) if xs else 1.0

    return FieldConfidence({k: q(v) for k, v in per_field.items()}, q(outside))


def raw_scores(q: float) -> list[float]:
    """[log q, log(1-q)]: a raw confidence as the score vector ``calibrated`` takes."""
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
