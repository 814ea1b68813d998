"""Serving an ONNX artifact: ``OnnxRunner`` (onnxruntime-genai, one Generator per slot) behind the
real app and engine, on a tiny INT4 artifact made by ``edgedistill.compress.onnx``: greedy answers equal the
artifact's own greedy decoding, alone, streamed, and with several requests sharing the slots."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

pytest.importorskip("onnxruntime_genai")

from edgedistill.compress import onnx as connx
from edgedistill.compress.formats import FormatSpec
from edgedistill.runtimes.onnx import OnnxRunner, token_pieces
from edgedistill.serve.app import create_app
from edgedistill.serve.artifact import Artifact
from edgedistill.serve.engine import Engine
from edgedistill.serve.settings import Settings

from tests.test_compress_onnx import build_onnx_llama, shared_work

MODEL = "tiny-onnx"
QUESTIONS = ["When will my card arrive?", "What is the exchange rate for euros today?", "My top up failed, please help me."]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("serve_onnx")
    src = build_onnx_llama(root / "src", tiny_tokenizer_dir)
    out = root / "onnx-int4"
    out.mkdir()
    calib = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\ncard_arrival<|im_end|>\n" for q in QUESTIONS]
    connx.build(src, FormatSpec("onnx", "int4"), out, calib, shared_work(tmp_path_factory))
    return out


@pytest.fixture(scope="module")
def expected(artifact):
    """question -> (prompt ids, greedy ids) from compress's runtime, the reference the server must match."""
    runner = OnnxRunner(artifact, n_slots=1, ctx_per_slot=256)
    rt = connx.load(artifact, {})
    try:
        out = {}
        for q in QUESTIONS:
            ids = runner.tokenize(runner.render_chat([{"role": "user", "content": q}]), special=True, add_bos=True)
            out[q] = (ids, rt.generate(ids, 12))
        return out, runner.pieces, runner.eog_tokens
    finally:
        runner.close()
        rt.close()


def make_app(artifact: Path, **overrides):
    s = Settings.load(artifact=str(artifact), model_alias=MODEL, threshold=0.0, **{"n_threads": 1, "n_slots": 2, "ctx_per_slot": 256, **overrides})
    runner = OnnxRunner(artifact, n_slots=s.n_slots, ctx_per_slot=s.ctx_per_slot, n_batch=s.n_batch, n_threads=s.n_threads)
    art = Artifact(name=MODEL, format="onnx", model_path=artifact)
    return create_app(s, engine=Engine(runner, max_queue=s.max_queue), artifact=art)


def answer_text(expected, q: str) -> str:
    by_q, pieces, eog = expected
    return b"".join(pieces[t] for t in by_q[q][1] if t not in eog).decode("utf-8", "replace")


def chat(q: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 12, "temperature": 0, **kw}


def test_runner_matches_the_artifacts_greedy_decoding(artifact, expected):
    by_q, _, _ = expected
    runner = OnnxRunner(artifact, n_slots=2, ctx_per_slot=256, n_batch=8)
    try:
        assert runner.n_vocab == len(runner.pieces) and runner.ctx_per_slot == 256
        (ids_a, want_a), (ids_b, want_b) = by_q[QUESTIONS[0]], by_q[QUESTIONS[1]]
        # both prompts in one call, in chunks as the engine sends them, slot 1 first for good measure
        logits = runner.decode(ids_b + ids_a, [*range(len(ids_b)), *range(len(ids_a))], [1] * len(ids_b) + [0] * len(ids_a),
                               [False] * (len(ids_b) - 1) + [True] + [False] * (len(ids_a) - 1) + [True])
        got = {0: [int(logits[1].argmax())], 1: [int(logits[0].argmax())]}
        for step in range(5):
            rows = runner.decode([got[0][-1], got[1][-1]], [len(ids_a) + step, len(ids_b) + step], [0, 1], [True, True])
            got[0].append(int(rows[0].argmax()))
            got[1].append(int(rows[1].argmax()))
        assert got[0] == want_a[:6] and got[1] == want_b[:6]
        # keep the shared prefix, rewind the rest (what the engine does when a slot is reused)
        runner.seq_rm(0, 3)
        rows = runner.decode(ids_a[3:], list(range(3, len(ids_a))), [0] * (len(ids_a) - 3), [False] * (len(ids_a) - 4) + [True])
        assert int(rows[0].argmax()) == want_a[0]
        with pytest.raises(RuntimeError):  # past the slot's context: the engine fails the batch, the slot starts clean
            runner.decode([5] * 300, list(range(len(ids_a), len(ids_a) + 300)), [0] * 300, [False] * 299 + [True])
        assert runner.decode(ids_a, list(range(len(ids_a))), [0] * len(ids_a), [False] * (len(ids_a) - 1) + [True]).shape == (1, runner.n_vocab)
    finally:
        runner.close()


def test_chat_completions_stream_and_concurrency(artifact, expected):
    from fastapi.testclient import TestClient

    by_q, _, eog = expected
    with TestClient(make_app(artifact)) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == MODEL
        for q in QUESTIONS:
            r = c.post("/v1/chat/completions", json=chat(q))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["message"]["content"] == answer_text(expected, q)
            want = by_q[q][1]
            assert body["usage"]["completion_tokens"] == len(want) and body["usage"]["prompt_tokens"] == len(by_q[q][0])
            assert body["choices"][0]["finish_reason"] == ("stop" if want[-1] in eog else "length")
            assert r.headers["x-answered-by"] == "student" and 0.0 <= body["edgedistill"]["confidence"] <= 1.0
        with c.stream("POST", "/v1/chat/completions", json=chat(QUESTIONS[0], stream=True)) as r:
            chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
        assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"]) == answer_text(expected, QUESTIONS[0])
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "When will", "max_tokens": 4, "temperature": 0, "logprobs": 2})
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) == r.json()["usage"]["completion_tokens"]

    async def together():  # 5 requests on 2 slots: queued, batched, slots reused with their cached prefixes
        app = make_app(artifact)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                rs = await asyncio.gather(*[client.post("/v1/chat/completions", json=chat(q)) for q in [*QUESTIONS, *QUESTIONS[:2]]])
        return [r.json()["choices"][0]["message"]["content"] for r in rs]

    assert asyncio.run(together()) == [answer_text(expected, q) for q in [*QUESTIONS, *QUESTIONS[:2]]]


def test_token_pieces_byte_level_and_sentencepiece(artifact):
    runner = OnnxRunner(artifact, n_slots=1, ctx_per_slot=64)
    try:
        text = "My top up failed, 日本 ✓"
        assert b"".join(runner.pieces[t] for t in runner.tokenize(text, special=False, add_bos=False)) == text.encode()
        im_end = runner.tokenize("<|im_end|>", special=True, add_bos=False)
        assert len(im_end) == 1 and runner.pieces[im_end[0]] == b"" and im_end[0] in runner.eog_tokens
    finally:
        runner.close()
    sp = {
        "model": {"type": "BPE", "vocab": {"<unk>": 0, "<0x0A>": 1, "\u2581the": 2, "re": 3, "<0xE6>": 4}, "byte_fallback": True},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace"}, {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "added_tokens": [{"id": 0, "content": "<unk>", "special": True}, {"id": 5, "content": "</s>", "special": True}],
    }
    pieces, special = token_pieces(sp, 7)
    assert pieces == [b"", b"\n", b" the", b"re", b"\xe6", b"", b""] and special == {0: "<unk>", 5: "</s>"}


def test_missing_or_broken_artifact_is_a_user_error(tmp_path, artifact):
    from edgedistill.errors import UserError

    with pytest.raises(UserError, match="genai_config.json"):
        OnnxRunner(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in artifact.iterdir():
        (broken / p.name).write_bytes(p.read_bytes() if p.name != "model.onnx" else b"not onnx")
    with pytest.raises(UserError, match="could not load"):
        OnnxRunner(broken)
