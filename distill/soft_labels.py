"""Soft labels from an API teacher: its distribution over a classification task's labels, recovered
from the ``top_logprobs`` of one answer (OpenAI's chat ``logprobs.content`` shape).

The teacher's tokenizer is unknown here, so the labels cannot be put in a token trie of its
vocabulary (``runtimes.constrain.LabelSet`` is a trie in *our* tokenizer). The walk is over text
instead: a character-level trie of the labels, where a node is a string prefix. At generated
position i, with the text chosen so far ``P`` (the concatenation of the chosen tokens), every top
alternative token ``t`` continues the answer to ``P + t``; its probability (times the probability
of the chosen path up to i) goes to the labels consistent with ``P + t``:

- the text is read the way :meth:`Task.parse_answer` reads an answer: leading whitespace and
  quotes are skipped, comparison ignores case;
- a label ``L`` is consistent with a text when the text is a prefix of ``L`` (the label may still
  follow) or the text is ``L`` followed on its first line only by what parse_answer strips
  (whitespace, periods, closing quotes: the answer already is ``L``); an empty alternative (an end-of-turn or other special token) ends
  the answer at ``P``, so only the labels ``P`` already is are consistent with it;
- an alternative consistent with no label (not an answer among the labels) is dropped.

The chosen token continues the path and is refined by the next position. When the answer ends,
the chosen path's mass goes to the label the answer is (the teacher stopped there; dropped if it
is none). An alternative branch is never expanded: when exactly one label is consistent with it,
its mass is that label's; when several are, it is split among them **in proportion to the mass
the rest of the walk gave those labels** (the teacher's own preference among them, as far as the
walk saw it), and uniformly when the walk gave none of them anything. So an alternative that only
re-spells the chosen prefix (``" card"`` for ``"card"``) follows the chosen path's refinement
instead of being spread over every card_* label, and a branch the walk never entered (``"top"``
when ``"card"`` was chosen) is spread evenly over its labels. The mass outside the top k at each
position is unknown and dropped. The result is renormalised to sum to one; None when nothing of
the answer is consistent with any label, or when the answer has no logprobs (fall back to the hard
label).

Torch-free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

# what Task.parse_answer strips around a label: whitespace, then quotes, then whitespace before it;
# whitespace, periods, quotes, whitespace after it (on the answer's first line)
_LEADING = re.compile(r"^\s*[\"'`]*\s*")
_TRAILING = re.compile(r"\s*\.*[\"'`]*\s*")


def _text(entry: dict[str, Any]) -> bytes:
    """A token's bytes (OpenAI's ``bytes``, exact for a piece that splits a UTF-8 character), else its string."""
    raw = entry.get("bytes")
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw)
    tok = entry.get("token")
    return tok.encode("utf-8") if isinstance(tok, str) else b""


def _decode(data: bytes) -> str:
    """Text of bytes; an incomplete UTF-8 character at the end (a token boundary inside it) is left out."""
    return data.decode("utf-8", "ignore")


def consistent_labels(text: str, labels: Sequence[str], *, ended: bool = False) -> list[int]:
    """Indices of the labels an answer starting with ``text`` can still be (``ended``: the answer is exactly ``text``)."""
    norm = text.lstrip()  # a leading newline is stripped too; the first line is the one after it
    norm = _LEADING.sub("", norm, count=1).casefold()
    first_line, newline, _ = norm.partition("\n")
    out = []
    for i, label in enumerate(labels):
        lab = label.casefold()
        if not newline and not ended and lab.startswith(first_line):
            out.append(i)  # still a prefix of the label
        elif first_line.startswith(lab) and _TRAILING.fullmatch(first_line[len(lab) :]):
            out.append(i)  # the answer already is this label
    return out


def recover_label_distribution(labels: Sequence[str], content: Any) -> dict[str, float] | None:
    """The teacher's distribution over ``labels`` from one answer's ``logprobs.content`` (see the
    module docstring for the rule); None when ``content`` is empty or not that shape, or when no
    mass is left on any label. The values sum to one."""
    labels = list(labels)
    if not labels or not isinstance(content, list) or not content:
        return None
    if not all(isinstance(e, dict) and isinstance(e.get("logprob"), (int, float)) for e in content):
        return None
    resolved = [0.0] * len(labels)  # mass whose label is known
    branches: list[tuple[float, list[int]]] = []  # (mass, labels) of ambiguous alternatives
    prefix = b""
    path_logp = 0.0  # log-probability of the chosen path so far
    for entry in content:
        chosen = _text(entry)
        for alt in entry.get("top_logprobs") or []:
            if not isinstance(alt, dict) or not isinstance(alt.get("logprob"), (int, float)):
                continue
            piece = _text(alt)
            if piece == chosen:
                continue  # the chosen token: its mass stays on the path
            mass = math.exp(path_logp + float(alt["logprob"]))
            if not mass > 0.0:
                continue
            cands = consistent_labels(_decode(prefix + piece), labels, ended=not piece)
            if len(cands) == 1:
                resolved[cands[0]] += mass
            elif cands:
                branches.append((mass, cands))
        prefix += chosen
        path_logp += float(entry["logprob"])
        if not consistent_labels(_decode(prefix), labels):
            break  # the answer left the labels: nothing further down is one
    else:  # the answer ended: the chosen path is the label it is
        end = consistent_labels(_decode(prefix), labels, ended=True)
        mass = math.exp(path_logp)
        if len(end) == 1:
            resolved[end[0]] += mass
        elif end:  # labels equal up to case: the teacher's answer does not tell them apart
            branches.append((mass, end))
    dist = list(resolved)
    for mass, cands in branches:
        weights = [resolved[i] for i in cands]
        total = sum(weights)
        for i, w in zip(cands, weights):
            dist[i] += mass * (w / total if total > 0 else 1.0 / len(cands))
    z = sum(dist)
    if not z > 0.0 or not math.isfinite(z):
        return None
    return {lab: p / z for lab, p in zip(labels, dist) if p > 0.0}


def soften(dist: dict[str, float], temperature: float) -> dict[str, float]:
    """``p^(1/T)`` renormalised: the teacher's distribution at temperature T (T=1: unchanged)."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    powered = {k: math.exp(math.log(p) / temperature) for k, p in dist.items() if p > 0}
    z = sum(powered.values())
    return {k: v / z for k, v in powered.items()}
