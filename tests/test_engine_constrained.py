"""The engine under a constraint (runtimes.constrain), on the byte-level fake model: every token it
samples is allowed, the probabilities it reports are the model's renormalised over the allowed
tokens (they sum to one there), and OpenAI's logit_bias and penalties act on the logits."""

from __future__ import annotations

import asyncio
import json
import math

import jsonschema
import numpy as np
import pytest
from edgedistill.runtimes.constrain import Grammar, LabelSet
from edgedistill.serve.engine import Engine, GenParams

from tests.serve_fakes import ASSISTANT, FakeRunner

LABELS = ["card_arrival", "card_linking", "exchange_rate"]
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "size": {"enum": ["s", "m", "l"]}},
    "required": ["n", "size"],
    "additionalProperties": False,
}


def generate(runner, params: GenParams, prompt="user: hi\n", n=1):
    engine = Engine(runner)

    async def go():
        ids = runner.tokenize(prompt + "<|assistant|>", special=True, add_bos=False)
        assert ids[-1] == ASSISTANT
        return await engine.submit([ids] * n, [params] * n, asyncio.get_running_loop()).results()

    try:
        return asyncio.run(go())
    finally:
        engine.close()


class NoisyRunner(FakeRunner):
    """Random logits (seeded by the history): a model with no idea, so the mask does all the work."""

    def _logits(self, history):
        rng = np.random.default_rng(len(history) * 7919 + sum(history))
        return rng.normal(0, 3, self.n_vocab).astype(np.float32)


def test_masked_distribution_sums_to_one_over_the_allowed_tokens():
    runner = NoisyRunner()
    labels = LabelSet.build(runner, LABELS)
    res = generate(runner, GenParams(max_tokens=32, temperature=1.0, seed=3, logprobs=20, constraint=labels))[0]
    assert res.text in LABELS and res.finish_reason == "stop"
    # at each step the top 20 alternatives hold every allowed token (at most 2 here): their
    # renormalised probabilities sum to one, and no disallowed token appears
    for entry in res.logprobs:
        alts = entry["top_logprobs"]
        assert math.isclose(sum(math.exp(a["logprob"]) for a in alts), 1.0, rel_tol=1e-5)
        assert len(alts) <= 2
    # the first byte is a choice (c or e); within a label's unique stretch, bytes are forced
    assert not res.forced[0] and any(res.forced)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_answers_always_parse(temperature):
    runner = NoisyRunner()
    grammar = Grammar.json_schema(runner, SCHEMA)
    labels = LabelSet.build(runner, LABELS)
    for seed in range(8):
        obj = generate(runner, GenParams(max_tokens=48, temperature=temperature, seed=seed, constraint=grammar))[0]
        assert obj.finish_reason == "stop", obj.text
        jsonschema.validate(json.loads(obj.text), SCHEMA)
        lab = generate(runner, GenParams(max_tokens=32, temperature=temperature, seed=seed, constraint=labels))[0]
        assert lab.text in LABELS


def test_forced_tokens_have_probability_one():
    runner = NoisyRunner()
    res = generate(runner, GenParams(max_tokens=48, temperature=0.0, constraint=Grammar.json_schema(runner, SCHEMA)))[0]
    assert res.forced and res.forced[0]  # '{' is the only way to start
    assert all(p == pytest.approx(1.0) for p, f in zip(res.token_probs, res.forced, strict=True) if f)
    assert not all(res.forced)  # the number and the size are choices


def test_logit_bias_and_penalties_act_on_the_logits():
    runner = FakeRunner(lambda p: ("aaaa", 5.0))
    plain = generate(runner, GenParams(max_tokens=4, temperature=0.0))[0]
    assert plain.text == "aaaa"
    banned = generate(runner, GenParams(max_tokens=4, temperature=0.0, logit_bias={ord("a") + 1: -100.0}))[0]
    assert "a" not in banned.text
    forced = generate(runner, GenParams(max_tokens=4, temperature=0.0, logit_bias={ord("z") + 1: 100.0}))[0]
    assert forced.text == "zzzz"
    # a frequency penalty of 2 per repeat: after three a's (logit 5 - 6 < 0) another token wins
    pen = generate(runner, GenParams(max_tokens=4, temperature=0.0, frequency_penalty=2.0))[0]
    assert pen.text.startswith("aaa") and pen.text != "aaaa"
    pres = generate(runner, GenParams(max_tokens=4, temperature=0.0, presence_penalty=2.0))[0]
    assert pres.text == "aaaa"  # presence costs 2 once: 5 - 2 still wins
