"""Constrained decoding: a token mask applied to the logits every runtime already returns.

One engine for every backend: llguidance (the grammar engine llama.cpp and vLLM use; pure Rust,
no dependencies, torch-free). Whatever the runtime (llama.cpp, ONNX Runtime, transformers), the
model's next-token logits go through the same mask, so the three behave the same.

- :class:`Grammar`: a JSON schema (or Lark grammar) compiled once for a vocabulary; each answer
  starts a cheap copy of the compiled matcher (``start``), never a recompilation.
- :class:`LabelSet`: exactly one of N labels, spelled the way the tokenizer spells it. A grammar
  would admit every tokenization of a label (``c``+``ard_...``, ``ca``+``rd_...``: 11 first tokens
  for three BANKING77 labels) and split a label's probability across spellings the model never saw
  in training; the trie of canonical tokenizations keeps one spelling per label, so the masked
  distribution is the distribution over labels.

Both give a :class:`Matcher` per answer: ``allowed()`` (a boolean mask over the vocabulary, or
``None`` when anything goes), ``advance(token)``. :func:`masked` applies a mask to a logits row; the
probabilities of the masked row are the model's, renormalised over the tokens the constraint allows
(what the confidence is computed from).

A vocabulary is anything with ``n_vocab``, ``pieces`` (bytes per token id; b"" for special tokens),
``eog_tokens`` and ``tokenize(text, special=, add_bos=)``: every serve ``Runner`` is one, and
:func:`hf_vocab` makes one from a transformers tokenizer (compress and distill decode token ids of
the source tokenizer).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgedistill.errors import UserError

TERMINAL = -1  # trie key: a label ends here
LABELS = "labels"  # trie key: the label ids spelled under this node


def build_label_trie(label_tokens: Iterable[tuple[int, Sequence[int]]]) -> dict:
    """Trie over (label id, token sequence) pairs; several spellings may share a label id."""
    root: dict = {LABELS: set()}
    for label_id, toks in label_tokens:
        node = root
        node[LABELS].add(label_id)
        for t in [*toks, TERMINAL]:
            node = node.setdefault(int(t), {LABELS: set()})
            node[LABELS].add(label_id)
    return root


class Vocab(Protocol):
    n_vocab: int
    pieces: list[bytes]
    eog_tokens: frozenset[int]

    def tokenize(self, text: str, *, special: bool, add_bos: bool) -> list[int]: ...


class GrammarError(ValueError):
    """The engine cannot compile this schema or grammar (the message says why)."""


class Matcher(Protocol):
    def allowed(self) -> np.ndarray | None: ...

    def advance(self, token: int) -> None: ...

    @property
    def done(self) -> bool: ...


class Constraint(Protocol):
    kind: str

    def start(self) -> Matcher: ...


def masked(logits: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """The logits row with every disallowed token at -inf (a new array; ``logits`` may be a view
    into the runtime's buffer). ``allowed`` None: the row as it is."""
    if allowed is None:
        return logits
    return np.where(allowed[: logits.shape[-1]], logits, -np.inf).astype(np.float32, copy=False)


# ---- llguidance ------------------------------------------------------------------------------------


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy
    except ImportError:
        raise UserError("structured output needs llguidance: pip install llguidance (it has no dependencies)") from None
    return llguidance


class _Tokens:
    """A vocabulary as llguidance's ``TokenizerWrapper`` wants it."""

    def __init__(self, vocab: Vocab):
        eog = sorted(vocab.eog_tokens)
        self.eos_token_id = eog[0] if eog else None
        self.bos_token_id = None
        # special tokens have no bytes; llguidance marks them by a leading 0xff and never allows them
        # inside a grammar (only EOS, when the grammar is complete)
        self.tokens = [p if p else b"\xff<special_%d>" % i for i, p in enumerate(vocab.pieces)]
        self.special_token_ids = [i for i, p in enumerate(vocab.pieces) if not p]
        self._vocab = vocab

    def __call__(self, text: Any) -> list[int]:
        s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        return list(self._vocab.tokenize(s, special=False, add_bos=False))


def lltokenizer(vocab: Vocab) -> Any:
    """llguidance's tokenizer for a vocabulary (~0.1-1 s), cached on the vocabulary object."""
    cached = getattr(vocab, "_lltokenizer", None)
    if cached is not None:
        return cached
    llg = _llguidance()
    eog = sorted(vocab.eog_tokens)
    tok = llg.LLTokenizer(llg.TokenizerWrapper(_Tokens(vocab)), n_vocab=vocab.n_vocab, eos_token=eog or None)
    try:
        vocab._lltokenizer = tok  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return tok


def json_schema_grammar(schema: dict[str, Any], *, compact: bool = True) -> str:
    """llguidance's grammar for a JSON schema. ``compact``: one fixed spelling, ``json.dumps``'s
    separators (``", "``, ``": "``) and no free whitespace -- the spelling a student is trained on, and
    a sampled answer cannot wander off into blank lines."""
    llg = _llguidance()
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    s = dict(schema)
    if compact:
        s["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", **(s.get("x-guidance") or {})}
    try:
        return llg.LLMatcher.grammar_from_json_schema(s)
    except (ValueError, TypeError, RuntimeError) as e:
        raise GrammarError(_short(e)) from None


def lark_grammar(text: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(text)


class Grammar:
    """A grammar compiled once for one vocabulary; ``start`` gives each answer its own matcher."""

    kind = "grammar"

    def __init__(self, vocab: Vocab, grammar: str):
        llg = _llguidance()
        self.n_vocab = vocab.n_vocab
        self._tok = lltokenizer(vocab)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self._tok)
        if is_error:
            raise GrammarError(_short(messages[0] if messages else "invalid grammar"))
        self._pristine = llg.LLMatcher(self._tok, grammar)
        if self._pristine.is_error():
            raise GrammarError(_short(self._pristine.get_error()))
        self._bitmask_words = (self._tok.vocab_size + 31) // 32

    @classmethod
    def json_schema(cls, vocab: Vocab, schema: dict[str, Any], *, compact: bool = True) -> Grammar:
        return cls(vocab, json_schema_grammar(schema, compact=compact))

    def start(self) -> GrammarMatcher:
        return GrammarMatcher(self._pristine.deep_copy(), self._bitmask_words, self.n_vocab)


class GrammarMatcher:
    def __init__(self, matcher: Any, words: int, n_vocab: int):
        from llguidance.numpy import fill_next_token_bitmask

        self._m = matcher
        self._fill = fill_next_token_bitmask
        self._bits = np.full((1, words), -1, dtype=np.int32)
        self._n = n_vocab

    def allowed(self) -> np.ndarray:
        self._fill(self._m, self._bits)
        mask = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")[: self._n].astype(bool)
        if mask.size < self._n:  # a runtime whose logits rows are longer than the tokenizer's vocabulary
            mask = np.concatenate([mask, np.zeros(self._n - mask.size, dtype=bool)])
        return mask

    def advance(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise RuntimeError(f"the grammar refused token {token}: {self._m.get_error()}")

    def forced(self) -> list[int]:
        """Tokens the grammar forces from here (jump-forward), possibly none."""
        return list(self._m.compute_ff_tokens())

    @property
    def done(self) -> bool:
        return bool(self._m.is_stopped())


# ---- one of N labels -------------------------------------------------------------------------------


@dataclass
class LabelSet:
    """Exactly one of the labels, each in its canonical tokenization, then end of generation.

    ``trie`` is also what ``serve.confidence.LabelScorer`` walks: the constrained distribution and
    the label confidence come from the same tree."""

    trie: dict
    n_vocab: int
    eog_tokens: frozenset[int]
    kind = "labels"

    @classmethod
    def build(cls, vocab: Vocab, labels: Sequence[str]) -> LabelSet:
        """Each label tokenized as the answer's first text (no BOS, no special tokens)."""
        if not labels:
            raise GrammarError("a label set needs at least one label")
        trie = build_label_trie((i, vocab.tokenize(lab, special=False, add_bos=False)) for i, lab in enumerate(labels))
        return cls(trie, vocab.n_vocab, frozenset(vocab.eog_tokens))

    def start(self) -> LabelMatcher:
        return LabelMatcher(self)


class LabelMatcher:
    def __init__(self, labels: LabelSet):
        self._set = labels
        self._node: dict | None = labels.trie

    def allowed(self) -> np.ndarray:
        mask = np.zeros(self._set.n_vocab, dtype=bool)
        node = self._node or {}
        for c in node:
            if c == TERMINAL:
                mask[list(self._set.eog_tokens)] = True
            elif isinstance(c, int) and 0 <= c < mask.size:
                mask[c] = True
        return mask

    def advance(self, token: int) -> None:
        node = self._node
        if node is None:
            raise RuntimeError("the label is complete: only end of generation is allowed")
        key = TERMINAL if token in self._set.eog_tokens else int(token)
        if key not in node:
            raise RuntimeError(f"token {token} spells no label here")
        self._node = None if key == TERMINAL else node[key]

    @property
    def done(self) -> bool:
        return self._node is None


def for_task(task: Any, vocab: Vocab) -> Constraint | None:
    """The constraint a task's answer is decoded under (``edgedistill.task.Task``): classification,
    one of its labels; extraction and tool_call, its JSON schema; qa and generation, none."""
    if task.type == "classification" and task.labels:
        return LabelSet.build(vocab, task.labels)
    schema = task.answer_schema()
    if schema is not None:
        return Grammar.json_schema(vocab, schema)
    return None


def _short(e: Any) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
