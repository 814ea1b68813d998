"""Filtering of teacher-labelled training rows before training.

A row is a dict with at least ``id``, ``input``, ``output`` (the parsed answer or None),
``raw_output`` (the teacher's text; absent for seeds, whose ``output`` is checked instead),
optionally ``finish_reason`` (why the teacher's answer stopped: ``"stop"``, or ``"length"`` when it
ran into the task's output budget) and
``source`` (``"seed"``, ``"pool"`` or ``"synthetic"``), and optionally ``consistency_output`` (the
teacher's second, sampled answer when self-consistency is on; None when it did not parse). An
input that is a conversation is checked as its canonical text (``conversation.input_text``: one
``role: content`` line per message), so two conversations differ when any turn does; against the
test set, though, only by what the user and the tools said (``conversation.said_texts``), each
message on its own: the assistant's turns are the system's own fixed words, which every test
conversation asking the same question shares.

Checks, in this order; a row gets the reason of the first one it fails:

1. ``truncated``       -- the teacher's answer stopped on the length limit (``finish_reason``
   ``"length"``): cut off, so not parsed even where the cut text would pass as an answer.
   ``parse``           -- the teacher's answer is not valid (not a label, not JSON, fails the schema).
2. ``too_short`` / ``too_long`` -- the stripped input is outside ``validation.min_chars/max_chars``.
3. ``contaminated``    -- the input overlaps the held-out test set (see :class:`_TestIndex`).
4. ``exact_duplicate`` -- same input as a kept row after :func:`normalize_text`.
5. ``near_duplicate``  -- Jaccard >= ``validation.near_dup_threshold`` with a kept row's shingles.
6. ``inconsistent``    -- ``consistency_output`` is present and disagrees with ``output``.

Duplicates keep the first row seen, with seeds registered before every other row, so a seed is
never dropped as a duplicate (seeds are still checked for contamination and parsing). Rejected rows
never block a later row. The result depends only on the inputs (fixed MinHash seed, exact Jaccard
verification of LSH candidates).

Near-duplicates use character 3-gram shingles of the input's words (casefolded, punctuation
dropped, padded with one space at each end), not word shingles or 4-grams, because the inputs are
short queries where one typo must not make two copies look different. Measured on BANKING77's
train split (median 46 characters) at Jaccard >= 0.8: a copy with one random typo is caught 91% of
the time with 3-grams, 80% with 4-grams, 61% with word unigrams and 20% with word bigrams, while
among 4.5 M pairs of distinct queries 3-grams flagged 45 pairs, of which one had different intents
("how to verify my identity" / "show me how to verify my identity", a labelling disagreement, not a
different request).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

from datasketch import MinHash, MinHashLSH

from edgedistill.conversation import input_text, said_texts
from edgedistill.metrics import normalize_text
from edgedistill.task import TRUNCATED

REASONS = ("truncated", "parse", "too_short", "too_long", "contaminated", "exact_duplicate", "near_duplicate", "inconsistent")
NUM_PERM = 128
MINHASH_SEED = 1
SHINGLE = 3
# Word n-grams shorter than this only match a whole input exactly, never by containment: a test
# input "refund" must not knock out every training row that says "refund".
MIN_CONTAINMENT_WORDS = 3

_WORD = re.compile(r"\w+")

__all__ = ["REASONS", "format_report_table", "normalize_text", "validate_rows"]


# --- text features -----------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Casefolded word tokens, punctuation dropped."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def shingles(text: str, k: int = SHINGLE) -> set[str]:
    """Character k-grams of the space-joined words, padded so first/last words count too."""
    s = " " + " ".join(words(text)) + " "
    return {s[i : i + k] for i in range(max(1, len(s) - k + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """Bands b and rows r such that a pair with Jaccard == threshold is an LSH candidate with
    probability >= 0.99, with as many rows per band as allowed (fewest false candidates).
    Candidates are then checked with the exact Jaccard, so the LSH only has to have high recall."""
    for r in range(num_perm // 2, 0, -1):
        b = num_perm // r
        if b >= 2 and 1.0 - (1.0 - threshold**r) ** b >= 0.99:
            return b, r
    return num_perm, 1


class _NearDupIndex:
    """MinHash LSH over shingle sets, with exact Jaccard verification of the candidates."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.lsh = MinHashLSH(num_perm=NUM_PERM, params=_lsh_params(threshold))
        self.sets: list[set[str]] = []
        self.keys: list[Any] = []

    def find(self, sh: set[str], mh: MinHash) -> Any | None:
        """Key of the first-inserted indexed item with Jaccard >= threshold, else None."""
        n = len(sh)
        for i in sorted(int(c) for c in self.lsh.query(mh)):
            other = self.sets[i]
            # |A & B| <= min(|A|, |B|), so sizes alone can rule a pair out.
            if min(n, len(other)) >= self.threshold * max(n, len(other)) and jaccard(sh, other) >= self.threshold:
                return self.keys[i]
        return None

    def add(self, sh: set[str], mh: MinHash, key: Any) -> None:
        self.lsh.insert(str(len(self.sets)), mh)
        self.sets.append(sh)
        self.keys.append(key)


def _minhashes(sets: list[set[str]]) -> list[MinHash]:
    # Sorted so the hash order (and hence nothing at all) depends on set iteration order.
    return MinHash.bulk([[s.encode("utf-8") for s in sorted(sh)] for sh in sets], num_perm=NUM_PERM, seed=MINHASH_SEED)


def said_shingles(value: Any) -> set[str]:
    """The shingles of what an input says (its user and tool messages), one per line."""
    return shingles("\n".join(said_texts(value)))


# --- test-set contamination --------------------------------------------------------------------
class _TestIndex:
    """Overlap with the held-out test set.

    A row is contaminated when it is a test input (the same canonical text), when one of its
    messages shares a word n-gram (n = ``validation.contamination_ngram``) with a test input's
    message, or when what it says (its messages joined) is a MinHash near-duplicate of what a test
    input says. The messages are a text input itself, or a conversation's user and tool turns
    (:func:`~edgedistill.conversation.said_texts`); an n-gram never spans two messages. A message
    shorter than n words has one "n-gram", the whole message: a row's message contains a short test
    message (or is contained in a test message, when the row's is the short one) as a contiguous word
    sequence. Under :data:`MIN_CONTAINMENT_WORDS` words only an identical word sequence counts.
    """

    def __init__(self, test_inputs: list[Any], n: int, threshold: float) -> None:
        self.n = n
        self.identical = {normalize_text(input_text(t)) for t in test_inputs}
        said = [said_texts(t) for t in test_inputs]
        self.tokens = [tuple(words(m)) for parts in said for m in parts]
        self.whole = set(self.tokens)
        # Whole short test inputs by length, for containment in a longer row.
        self.short: dict[int, set[tuple[str, ...]]] = {}
        for t in self.tokens:
            if MIN_CONTAINMENT_WORDS <= len(t) < n:
                self.short.setdefault(len(t), set()).add(t)
        self._grams: dict[int, set[tuple[str, ...]]] = {}
        self.near = _NearDupIndex(threshold)
        sets = [said_shingles(t) for t in test_inputs]
        for i, (sh, mh) in enumerate(zip(sets, _minhashes(sets))):
            self.near.add(sh, mh, i)

    def grams(self, k: int) -> set[tuple[str, ...]]:
        """All contiguous k-grams of the test inputs (built once per k)."""
        if k not in self._grams:
            self._grams[k] = {t[i : i + k] for t in self.tokens for i in range(len(t) - k + 1)}
        return self._grams[k]

    def hit(self, value: Any, sh: set[str], mh: MinHash) -> str | None:
        """A short description of ``value``'s (an input's) overlap, or None; ``sh``/``mh``: the
        shingles and MinHash of what it says (:func:`said_shingles`)."""
        if normalize_text(input_text(value)) in self.identical:
            return "same as a test input"
        for text in said_texts(value):
            found = self._message_hit(tuple(words(text)))
            if found:
                return found
        j = self.near.find(sh, mh)
        if j is not None:
            return f"near-duplicate of test input {j}"
        return None

    def _message_hit(self, w: tuple[str, ...]) -> str | None:
        m = len(w)
        if w in self.whole:
            return "same words as a test input"
        if m >= MIN_CONTAINMENT_WORDS:
            k = min(m, self.n)
            grams = self.grams(k)
            if any(w[i : i + k] in grams for i in range(m - k + 1)):
                return f"shares a {k}-word sequence with a test input"
            for k, short in self.short.items():
                if k <= m and any(w[i : i + k] in short for i in range(m - k + 1)):
                    return f"contains a whole {k}-word test input"
        return None


# --- per-row checks ----------------------------------------------------------------------------
def _check_parse(spec: Any, row: dict) -> tuple[Any, str | None]:
    raw = row.get("raw_output")
    if raw is None:  # a seed, or a row built without the teacher's text: check its output
        if row.get("output") is None:
            return None, "no answer"
        raw = spec.task.format_answer(row["output"])
    return spec.task.parse_answer(raw, row.get("finish_reason"))


def _consistency(spec: Any, row: dict, value: Any) -> str | None:
    if "consistency_output" not in row:
        return None
    other = row["consistency_output"]
    if other is None:
        return "second answer did not parse"
    if isinstance(other, str) and spec.type != "generation" and spec.type != "qa":
        other, err = spec.task.parse_answer(other)
        if err:
            return f"second answer invalid ({err})"
    if spec.task.same_answer(value, other):
        return None
    return f"second answer {str(other)[:40]!r} != {str(value)[:40]!r}"


def validate_rows(spec: Any, rows: list[dict], test_inputs: list[str]) -> tuple[list[dict], list[dict], dict]:
    """Split teacher-labelled rows into (kept, rejected, report).

    Rows come back as shallow copies in their original order; a rejected row has ``reject_reason``
    (one of :data:`REASONS`) and ``reject_detail`` (a short human-readable explanation). A kept row
    whose ``output`` was None gets the answer parsed from ``raw_output``. The report is
    ``{"total", "kept", "rejected": {reason: n, every reason}, "by_source": {source: {"total",
    "kept", "rejected": {reason: n}}}, "label_counts": {label: n kept}}`` (label_counts is empty
    unless the task is a classification).
    """
    v = spec.validation
    n_rows = len(rows)
    out = [dict(r) for r in rows]
    reason: list[str | None] = [None] * n_rows
    detail: list[str] = [""] * n_rows
    values: list[Any] = [None] * n_rows
    texts = [input_text(r.get("input") or "") for r in rows]  # a conversation as its canonical text

    # 1-2: parse and length.
    for i, row in enumerate(out):
        value, err = _check_parse(spec, row)
        values[i] = value
        if err == TRUNCATED:
            reason[i], detail[i] = TRUNCATED, f"stopped on the length limit ({spec.task.output_budget} tokens)"
            continue
        if err:
            reason[i], detail[i] = "parse", err
            continue
        n_chars = len(texts[i].strip())
        if n_chars < v.min_chars:
            reason[i], detail[i] = "too_short", f"{n_chars} < {v.min_chars} chars"
        elif n_chars > v.max_chars:
            reason[i], detail[i] = "too_long", f"{n_chars} > {v.max_chars} chars"

    # Shingles and MinHashes only for rows still in play.
    live = [i for i in range(n_rows) if reason[i] is None]
    sets = {i: shingles(texts[i]) for i in live}
    mhs = dict(zip(live, _minhashes([sets[i] for i in live])))

    # 3: contamination.
    tests = [getattr(t, "input", t) for t in test_inputs]  # inputs, or spec.load_test_set()'s Examples
    test = _TestIndex(tests, v.contamination_ngram, v.near_dup_threshold)
    # what a text input says is the text itself: its shingles and MinHash are the ones above
    convs = [i for i in live if not isinstance(rows[i].get("input") or "", str)]
    said = sets | {i: said_shingles(rows[i]["input"]) for i in convs}
    said_mh = mhs | dict(zip(convs, _minhashes([said[i] for i in convs])))
    for i in live:
        hit = test.hit(rows[i].get("input") or "", said[i], said_mh[i])
        if hit:
            reason[i], detail[i] = "contaminated", hit

    # 4-6: duplicates (seeds first, never dropped as duplicates) then consistency.
    exact: dict[str, Any] = {}
    near = _NearDupIndex(v.near_dup_threshold)
    order = [i for i in live if rows[i].get("source") == "seed"] + [i for i in live if rows[i].get("source") != "seed"]
    for i in order:
        if reason[i] is not None:
            continue
        is_seed = rows[i].get("source") == "seed"
        key = normalize_text(texts[i])
        if not is_seed:
            if key in exact:
                reason[i], detail[i] = "exact_duplicate", f"same as {exact[key]}"
                continue
            other = near.find(sets[i], mhs[i])
            if other is not None:
                reason[i], detail[i] = "near_duplicate", f"near {other}"
                continue
        bad = _consistency(spec, rows[i], values[i])
        if bad:
            reason[i], detail[i] = "inconsistent", bad
            continue
        row_id = rows[i].get("id", i)
        exact.setdefault(key, row_id)
        near.add(sets[i], mhs[i], row_id)

    kept, rejected = [], []
    for i, row in enumerate(out):
        if reason[i] is None:
            if row.get("output") is None:
                row["output"] = values[i]
            kept.append(row)
        else:
            row["reject_reason"], row["reject_detail"] = reason[i], detail[i]
            rejected.append(row)
    return kept, rejected, _report(spec, rows, reason, kept)


def _report(spec: Any, rows: list[dict], reason: list[str | None], kept: list[dict]) -> dict:
    counts = Counter(r for r in reason if r is not None)
    by_source: dict[str, dict] = {}
    for row, r in zip(rows, reason):
        s = by_source.setdefault(
            str(row.get("source", "unknown")), {"total": 0, "kept": 0, "rejected": dict.fromkeys(REASONS, 0)}
        )
        s["total"] += 1
        if r is None:
            s["kept"] += 1
        else:
            s["rejected"][r] += 1
    label_counts: dict[str, int] = {}
    if spec.type == "classification":
        label_counts = dict.fromkeys(spec.labels, 0)
        for row in kept:
            label_counts[row["output"]] = label_counts.get(row["output"], 0) + 1
    return {
        "total": len(rows),
        "kept": len(kept),
        "rejected": {r: counts.get(r, 0) for r in REASONS},
        "by_source": by_source,
        "label_counts": label_counts,
    }


def format_report_table(report: dict) -> str:
    """The validation report as a plain-text table (for the terminal and the run's log)."""
    total, kept = report["total"], report["kept"]
    pct = f" ({100.0 * kept / total:.1f}%)" if total else ""
    lines = [f"Validation: {total} rows, {kept} kept{pct}, {total - kept} rejected", ""]

    def table(header: tuple[str, ...], body: list[tuple[Any, ...]]) -> None:
        cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in body]
        widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
        fmt = lambda r: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
        lines.append(fmt(cells[0]))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend(fmt(r) for r in cells[1:])
        lines.append("")

    table(("rejected", "rows"), [(r, n) for r, n in report["rejected"].items()])
    if report.get("by_source"):
        table(
            ("source", "total", "kept", "rejected"),
            [(s, d["total"], d["kept"], d["total"] - d["kept"]) for s, d in sorted(report["by_source"].items())],
        )
    if report.get("label_counts"):
        table(("label", "kept"), sorted(report["label_counts"].items(), key=lambda kv: (-kv[1], kv[0])))
    return "\n".join(lines).rstrip() + "\n"
