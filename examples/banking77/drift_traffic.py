"""The drift scenario's traffic (``drift.py``): real BANKING77 customer messages, rewritten in a
style the demo's generator never wrote, in three disjoint sets.

Source: the *train* split rows of the task's intents, read with the spec's own ``pool`` settings
(its path, ``input_field`` and ``filter_field``; the category column is the known label). Never
the dev split: a row whose text is a dev text is left out, and every set is checked with the
distill stage's own contamination test against the test set (``distill.validate.validate_rows``;
a row it would reject as contaminated, or as a duplicate, is never sent).

The style, "a chatty e-mail from a phone", deterministic for a seed (``restyle``):

* a greeting line ("hi there,", "dear support team,", ...), a context sentence that says nothing
  about the intent ("sorry to bother you on a sunday.", ...), the message, a sign-off with a first
  name ("thanks in advance,\\nsam"), one per line;
* all lower case, and 1-3 keyboard typos (fewer in a short message) in its words of 4+ letters (a neighbouring key, two
  letters swapped, a letter dropped or doubled).

The sets, disjoint by source row (each row used once), stratified over the intents:
``before`` (the rows as written: what the student was trained on), ``drifted`` (restyled: the
traffic during which the student drifts) and ``fresh`` (restyled, other rows: the traffic after
re-distillation).
"""

from __future__ import annotations

import random
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgedistill.datafiles import read_rows
from edgedistill.errors import UserError
from edgedistill.metrics import normalize_text
from edgedistill.spec import TaskSpec

SEED = 77
SETS = ("before", "drifted", "fresh")
RESTYLED = {"before": False, "drifted": True, "fresh": True}

GREETINGS = ["hi there,", "hello,", "dear support team,", "hey guys,", "good morning,", "hi all,", "good evening,",
             "hello again,", "dear sir or madam,", "hiya,"]
CONTEXTS = ["hope you are all well.", "sorry to bother you on a sunday.", "i have been with you for a few years now.",
            "writing from my phone so excuse the typos.", "quick question for you.", "my friend told me to email you.",
            "i could not find this in the faq.", "apologies if this was asked before.", "first time emailing you.",
            "the chat in the app was not working."]
SIGNOFFS = ["thanks in advance,", "cheers,", "best regards,", "kind regards,", "many thanks,", "thank you so much,",
            "regards,", "thx,", "all the best,", "speak soon,"]
NAMES = ["sam", "alex", "maria", "tom", "priya", "chris", "dan", "lena", "omar", "kate", "yuki", "ben"]
KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


@dataclass(frozen=True)
class Row:
    text: str  # what is sent
    label: str  # the known intent (the train split's category)
    source: str  # the train split's text it was made from
    set: str  # before, drifted or fresh


def _neighbours(ch: str) -> str:
    for r, line in enumerate(KEYBOARD):
        if ch in line:
            c = line.index(ch)
            near = line[max(0, c - 1) : c] + line[c + 1 : c + 2]
            near += "".join(KEYBOARD[o][min(c, len(KEYBOARD[o]) - 1)] for o in (r - 1, r + 1) if 0 <= o < len(KEYBOARD))
            return near
    return ""


def typo(word: str, rng: random.Random) -> str:
    """One keyboard slip in ``word`` (4+ letters): a neighbouring key, two letters swapped, a letter
    dropped or doubled; never the first letter."""
    i = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("neighbour", "swap", "drop", "double"))
    if kind == "neighbour" and _neighbours(word[i]):
        return word[:i] + rng.choice(_neighbours(word[i])) + word[i + 1 :]
    if kind == "swap" and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "drop":
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # doubled (also what a slip that changes nothing becomes)


def restyle(text: str, seed: int = SEED) -> str:
    """``text`` as a chatty, lower-cased e-mail with 1-3 typos; the same text and seed, the same result."""
    rng = random.Random(zlib.crc32(f"{seed}\0{text}".encode()))
    words = text.strip().lower().split(" ")
    long_words = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    for i in rng.sample(long_words, min(len(long_words), rng.randint(1, min(3, 1 + len(long_words) // 3)))):
        words[i] = typo(words[i], rng)
    lines = [rng.choice(GREETINGS), rng.choice(CONTEXTS), " ".join(words), rng.choice(SIGNOFFS), rng.choice(NAMES)]
    return "\n".join(lines)


def train_rows(spec: TaskSpec) -> list[tuple[str, str]]:
    """(text, intent) of the pool's rows of the task's intents (the spec's pool settings), in file
    order, each distinct text once, without any text of the test set."""
    src = spec.pool
    if src is None or not src.filter_field:
        raise UserError("the drift scenario reads its traffic from the spec's pool with a filter_field (the label column); this spec has none")
    rows = read_rows(spec.resolve(src.path), "pool", [src.input_field, src.filter_field], None)
    dev = {normalize_text(str(e.input)) for e in spec.load_test_set()}
    out, seen = [], set()
    for r in rows:
        text, label = str(r[src.input_field]).strip(), r[src.filter_field]
        key = normalize_text(text)
        if label in (spec.labels or []) and text and key not in dev and key not in seen:
            seen.add(key)
            out.append((text, label))
    return out


def stratified(rows: Sequence[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """The rows shuffled within each intent, then dealt one intent at a time (round robin), so that
    any prefix is balanced over the intents."""
    rng = random.Random(seed)
    by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r in rows:
        by_label[r[1]].append(r)
    queues = [by_label[k] for k in sorted(by_label)]
    for q in queues:
        rng.shuffle(q)
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop())
    return out


def usable(spec: TaskSpec, texts: list[str], labels: list[str]) -> list[bool]:
    """Whether distill's validation keeps each text (labelled with its intent) against the test set:
    not contaminated, not a duplicate or near-duplicate of an earlier one, of a valid length."""
    from edgedistill.distill.validate import validate_rows

    rows = [{"id": str(i), "input": t, "output": lab, "raw_output": spec.task.format_answer(lab), "source": "pool"}
            for i, (t, lab) in enumerate(zip(texts, labels))]
    kept, _, _ = validate_rows(spec, rows, [e.input for e in spec.load_test_set()])
    ids = {r["id"] for r in kept}
    return [str(i) in ids for i in range(len(texts))]


def make_sets(spec: TaskSpec, sizes: dict[str, int], seed: int = SEED) -> dict[str, list[Row]]:
    """The three sets (``sizes``: rows per set), disjoint by source row, from the train split."""
    candidates = stratified(train_rows(spec), seed)
    originals = [t for t, _ in candidates]
    styled = [restyle(t, seed) for t in originals]
    labels = [lab for _, lab in candidates]
    ok = {False: usable(spec, originals, labels), True: usable(spec, styled, labels)}
    sets: dict[str, list[Row]] = {name: [] for name in SETS}
    i = 0
    for name in SETS:
        want, drifted = sizes.get(name, 0), RESTYLED[name]
        while len(sets[name]) < want and i < len(candidates):
            if ok[drifted][i]:
                text = styled[i] if drifted else originals[i]
                sets[name].append(Row(text, labels[i], originals[i], name))
            i += 1
        if len(sets[name]) < want:
            raise UserError(
                f"the train split gives only {len(sets[name])} usable rows for {name!r} (asked {want}); ask for fewer rows per set"
            )
    return sets


def describe(sets: dict[str, list[Row]], seed: int = SEED) -> dict[str, Any]:
    """Counts per set and intent, and the style, for the report."""
    return {
        "source": "BANKING77 train split (the spec's pool), rows of the task's intents; no dev row",
        "style": "chatty e-mail: greeting, context sentence, the message, sign-off and name, one per line; lower case; 1-3 keyboard typos",
        "seed": seed,
        "sets": {k: {"n": len(v), "restyled": RESTYLED[k], "by_intent": dict(sorted(_count(v).items()))} for k, v in sets.items()},
        "example": {k: v[0].text for k, v in sets.items() if v},
    }


def _count(rows: list[Row]) -> dict[str, int]:
    c: dict[str, int] = defaultdict(int)
    for r in rows:
        c[r.label] += 1
    return c
