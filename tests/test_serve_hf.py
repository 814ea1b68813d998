"""The transformers runner: a tiny random Llama behind the real engine and app. Its logits must be the
model's own (chunked prefill, per-slot caches, cropping), its greedy answers transformers' own, and
a GPTQ (compressed-tensors) artifact must serve like any other checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgedistill.serve.app import create_app
from edgedistill.serve.artifact import Artifact
from edgedistill.serve.engine import Engine
from edgedistill.serve.settings import Settings
from fastapi.testclient import TestClient

pytest.importorskip("transformers")
MODEL = "tiny-hf"


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    from edgedistill.runtimes.hf import HFRunner

    r = HFRunner(tiny_model_dir, n_slots=3, ctx_per_slot=128, n_batch=16, n_threads=1, device="cpu")
    yield r
    r.close()


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        tiny_model_dir
    )


def _full_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _greedy(model, ids: list[int], n: int, eog: frozenset[int]) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        t = int(_full_logits(model, ids + out)[-1].argmax())
        out.append(t)
        if t in eog:
            break
    return out


def test_runner_attributes_and_pieces(runner, hf):
    _, tok = hf
    assert runner.n_vocab == len(tok) and len(runner.pieces) == runner.n_vocab
    assert tok.eos_token_id in runner.eog_tokens and tok.convert_tokens_to_ids("<|endoftext|>") in runner.eog_tokens
    assert runner.pieces[tok.eos_token_id] == b"" and runner.pieces[tok.pad_token_id] == b""
    text = "My top up failed: 20€ — déjà vu ✓\nwhen?"
    ids = runner.tokenize(text, special=False, add_bos=True)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]  # this tokenizer adds no BOS
    assert b"".join(runner.pieces[t] for t in ids) == text.encode()  # byte-exact, multi-byte characters included
    # special=True reads <|im_end|> as the control token, special=False as plain text
    assert runner.tokenize("hi<|im_end|>", special=True, add_bos=False)[-1] == tok.eos_token_id
    assert tok.eos_token_id not in runner.tokenize("hi<|im_end|>", special=False, add_bos=False)
    chat = runner.render_chat([{"role": "user", "content": "Where is my card?"}])
    assert chat == tok.apply_chat_template(
        [{"role": "user", "content": "Where is my card?"}], tokenize=False, add_generation_prompt=True
    )


def test_chunked_prefill_decode_and_crop_match_the_full_forward(runner, hf):
    model, _ = hf
    ids = list(range(5, 40))
    ref = _full_logits(model, ids)
    runner.seq_rm(0, 0)
    got = [runner.decode(ids[:16], list(range(16)), [0] * 16, [False] * 15 + [True])]  # prompt chunk 1
    got.append(runner.decode(ids[16:30], list(range(16, 30)), [0] * 14, [True] * 14))  # chunk 2, every row
    for p in range(30, 35):  # decode steps
        got.append(runner.decode([ids[p]], [p], [0], [True]))
    np.testing.assert_allclose(got[0][0], ref[15], atol=1e-4)
    np.testing.assert_allclose(got[1], ref[16:30], atol=1e-4)
    np.testing.assert_allclose(np.concatenate(got[2:]), ref[30:35], atol=1e-4)
    # crop back to 20 tokens (a shared prefix kept by the engine) and continue on another path
    runner.seq_rm(0, 20)
    other = ids[:20] + [7, 8, 9]
    row = runner.decode([7, 8, 9], [20, 21, 22], [0, 0, 0], [False, False, True])
    np.testing.assert_allclose(row[0], _full_logits(model, other)[-1], atol=1e-4)
    with pytest.raises(RuntimeError, match="cache holds 23 tokens"):
        runner.decode([1], [5], [0], [True])
    runner.seq_rm(0, 0)


def test_uncroppable_cache_prefills_the_kept_prefix_again(runner, hf, monkeypatch):
    import edgedistill.runtimes.hf

    model, _ = hf
    monkeypatch.setattr(edgedistill.runtimes.hf, "_exactly_croppable", lambda cache: False)  # as for sliding-window layers
    ids = list(range(50, 62))
    runner.seq_rm(1, 0)
    runner.decode(ids, list(range(12)), [1] * 12, [False] * 12)
    runner.seq_rm(1, 8)
    rows = runner.decode([3, 4], [8, 9], [1, 1], [True, True])
    np.testing.assert_allclose(rows, _full_logits(model, ids[:8] + [3, 4])[8:10], atol=1e-4)
    row = runner.decode([5], [10], [1], [True])  # and the cache goes on from there
    np.testing.assert_allclose(row[0], _full_logits(model, ids[:8] + [3, 4, 5])[-1], atol=1e-4)
    runner.seq_rm(1, 0)


def test_a_failed_forward_forgets_the_slot(runner, hf, monkeypatch):
    model, _ = hf
    runner.seq_rm(0, 0)
    real = runner.model.forward

    def half_step(*args, past_key_values=None, **kw):  # fills part of the cache, then fails (as an OOM would)
        real(input_ids=kw["input_ids"][:, :2], past_key_values=past_key_values, use_cache=True)
        raise MemoryError("out of memory")

    monkeypatch.setattr(runner.model, "forward", half_step)
    with pytest.raises(RuntimeError, match="slot 0: forward failed: MemoryError"):
        runner.decode([5, 6, 7], [0, 1, 2], [0, 0, 0], [False, False, True])
    monkeypatch.undo()
    row = runner.decode([5, 6, 7], [0, 1, 2], [0, 0, 0], [False, False, True])  # the engine retries from position 0
    np.testing.assert_allclose(row[0], _full_logits(model, [5, 6, 7])[-1], atol=1e-4)
    runner.seq_rm(0, 0)


def test_slots_are_independent_and_rows_keep_batch_order(runner, hf):
    model, _ = hf
    a, b = [11, 12, 13, 14], [21, 22]
    for s in range(runner.n_slots):
        runner.seq_rm(s, 0)
    rows = runner.decode(a + b, [0, 1, 2, 3, 0, 1], [2, 2, 2, 2, 1, 1], [False, True, False, True, False, True])
    assert rows.shape == (3, runner.n_vocab) and rows.dtype == np.float32
    np.testing.assert_allclose(rows[0], _full_logits(model, a)[1], atol=1e-4)
    np.testing.assert_allclose(rows[1], _full_logits(model, a)[3], atol=1e-4)
    np.testing.assert_allclose(rows[2], _full_logits(model, b)[1], atol=1e-4)
    # a decode step for slot 1 first, then a prompt for slot 0: rows in that order
    rows = runner.decode([23, 31, 32], [2, 0, 1], [1, 0, 0], [True, False, True])
    np.testing.assert_allclose(rows[0], _full_logits(model, b + [23])[-1], atol=1e-4)
    np.testing.assert_allclose(rows[1], _full_logits(model, [31, 32])[-1], atol=1e-4)
    assert runner.decode([33], [2], [0], [False]).shape == (0, runner.n_vocab)
    for s in range(runner.n_slots):
        runner.seq_rm(s, 0)


def _app(tiny_dir: Path, **kw):
    from edgedistill.runtimes.hf import HFRunner

    s = Settings.load(artifact="unused", model_alias=MODEL, n_threads=1, threshold=0.0, max_tokens_limit=64)
    runner = HFRunner(tiny_dir, n_slots=3, ctx_per_slot=256, n_batch=32, n_threads=1, device="cpu", **kw)
    engine = Engine(runner, max_queue=s.max_queue)
    return create_app(s, engine=engine, artifact=Artifact(name=MODEL, format="hf", model_path=tiny_dir)), runner


def test_served_greedy_answers_are_transformers_greedy(tiny_model_dir, hf):
    model, tok = hf
    app, runner = _app(tiny_model_dir)
    prompt = tok("Where is my card?", add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "What is the exchange rate?"}]
    chat_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        want = _greedy(model, prompt, 12, runner.eog_tokens)
        text = b"".join(runner.pieces[t] for t in want if t not in runner.eog_tokens).decode("utf-8", "replace")
        assert r.json()["choices"][0]["text"] == text
        assert r.json()["usage"]["completion_tokens"] == len(want)

        body = {"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0, "n": 3}
        r = c.post("/v1/chat/completions", json=body)  # three slots decoded side by side
        assert r.status_code == 200, r.text
        answers = [ch["message"]["content"] for ch in r.json()["choices"]]
        want = _greedy(model, chat_ids, 10, runner.eog_tokens)
        text = b"".join(runner.pieces[t] for t in want if t not in runner.eog_tokens).decode("utf-8", "replace")
        assert answers == [text] * 3
        assert r.json()["edgedistill"]["answered_by"] == "student"

        with c.stream("POST", "/v1/chat/completions", json={**body, "n": 1, "stream": True}) as s:
            assert s.status_code == 200
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert c.get("/ready").json()["status"] == "ready"


@pytest.mark.slow
def test_serves_a_gptq_artifact(tmp_path, tiny_model_dir):
    """edgedistill.compress.gptq's artifact (compressed-tensors INT4) served: same greedy tokens as the gate's runtime."""
    pytest.importorskip("compressed_tensors")
    from edgedistill.compress import gptq
    from edgedistill.compress.formats import parse_formats

    from tests.conftest import CORPUS

    out = tmp_path / "gptq-int4"
    out.mkdir()
    gptq.build(tiny_model_dir, parse_formats("gptq:int4:group_size=32")[0], out, CORPUS, tmp_path / "work")
    app, runner = _app(out)
    assert runner.description.startswith("llama") and runner.n_vocab > 0
    prompt = [2, 10, 20, 30, 40]
    rt = gptq.load(out, {})
    try:
        want = rt.generate(prompt, 8, ignore_eos=True)
    finally:
        rt.close()
    with TestClient(app) as c:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
    got_tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    k = next((i for i, t in enumerate(want) if t in runner.eog_tokens), len(want))  # the gate ignored the end token
    assert got_tokens == [runner.pieces[t].decode("utf-8", "replace") for t in want[:k]]
