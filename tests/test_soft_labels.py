"""Soft labels from an API teacher (distill/soft_labels.py): the teacher's distribution over the
labels recovered from OpenAI-shaped ``logprobs.content``, on hand-made payloads and from our own
server on 127.0.0.1 answering with logprobs; how labelling asks for them and stores them."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from edgedistill.distill.cache import ResponseCache
from edgedistill.distill.generate import attach_labels, label_requests, wants_soft_labels
from edgedistill.distill.soft_labels import consistent_labels, recover_label_distribution, soften
from edgedistill.distill.teacher import ChatRequest
from edgedistill.distill.teacher_api import OpenAITeacher

from edgedistill.task import Task
from tests.serve_fakes import ASSISTANT, EOS, FakeRunner, free_port

LABELS = ["card_arrival", "card_linking", "exchange_rate"]


def tok(text: str, p: float, alts: dict[str, float] | None = None, *, with_bytes: bool = True) -> dict:
    """One content item: the chosen token ``text`` with probability p, and its top alternatives."""
    def item(t: str, q: float) -> dict:
        out = {"token": t, "logprob": math.log(q)}
        if with_bytes:
            out["bytes"] = list(t.encode("utf-8"))
        return out

    entry = item(text, p)
    entry["top_logprobs"] = [item(t, q) for t, q in {text: p, **(alts or {})}.items()]
    return entry


def close(dist: dict[str, float], want: dict[str, float]) -> bool:
    return set(dist) == set(want) and all(math.isclose(dist[k], v, rel_tol=1e-9) for k, v in want.items())


def test_recovered_distribution_sums_to_one_and_follows_the_walk():
    # card (0.6) | exchange (0.3) | Hello (0.05, no label); then _arr (0.7) | _link (0.2) | _foo (0.05)
    content = [tok("card", 0.6, {"exchange": 0.3, "Hello": 0.05}), tok("_arr", 0.7, {"_link": 0.2, "_foo": 0.05}), tok("ival", 1.0)]
    dist = recover_label_distribution(LABELS, content)
    assert math.isclose(sum(dist.values()), 1.0, rel_tol=1e-12)
    z = 0.42 + 0.12 + 0.3  # the mass on no label (Hello, _foo, outside the top k) is dropped
    assert close(dist, {"card_arrival": 0.42 / z, "card_linking": 0.12 / z, "exchange_rate": 0.3 / z})


def test_labels_sharing_a_prefix_split_by_the_position_that_tells_them_apart():
    # "card_" is common to two labels: the alternative at the distinguishing position decides
    content = [tok("card", 1.0), tok("_", 1.0), tok("link", 0.55, {"arr": 0.45}), tok("ing", 1.0)]
    dist = recover_label_distribution(LABELS, content)
    assert close(dist, {"card_linking": 0.55, "card_arrival": 0.45})


def test_an_ambiguous_branch_follows_the_walk_and_an_unseen_branch_is_split_evenly():
    labels = ["card_arrival", "card_linking", "top_up_failed", "top_up_reverted"]
    # " card" only re-spells the chosen prefix: it goes to card_* in the walk's proportion (0.42 : 0.12);
    # "top" was never expanded: its 0.2 is split evenly over the top_up_* labels
    content = [tok("card", 0.6, {" card": 0.1, "top": 0.2}), tok("_arr", 0.7, {"_link": 0.2}), tok("ival", 1.0)]
    dist = recover_label_distribution(labels, content)
    assert math.isclose(sum(dist.values()), 1.0, rel_tol=1e-12)
    z = 0.42 + 0.12 + 0.1 + 0.2
    assert close(
        dist,
        {"card_arrival": (0.42 + 0.1 * 0.42 / 0.54) / z, "card_linking": (0.12 + 0.1 * 0.12 / 0.54) / z,
         "top_up_failed": 0.1 / z, "top_up_reverted": 0.1 / z},
    )  # fmt: skip


def test_leading_whitespace_quotes_trailing_period_and_case_are_read_as_parse_answer_reads_them():
    content = [tok(' "', 1.0), tok("Card", 0.8, {"exchange": 0.2}), tok("_arrival", 1.0), tok('."', 1.0)]
    dist = recover_label_distribution(LABELS, content)
    assert close(dist, {"card_arrival": 0.8, "exchange_rate": 0.2})


@pytest.mark.parametrize(
    "answer",
    [' "Card_arrival."', "card_arrival", "\n card_arrival\nbecause", "`card_arrival`", 'card_arrival".', '" "card_arrival',
     "card_arrival because", "card_arrivals", "'exchange_rate' ", "card_"],
)  # fmt: skip
def test_an_answer_is_the_label_parse_answer_reads_and_no_other(answer):
    task = Task(name="t", type="classification", instructions="x", labels=LABELS)
    value, err = task.parse_answer(answer)
    assert consistent_labels(answer, LABELS, ended=True) == ([] if err else [LABELS.index(value)])


def test_a_label_that_is_a_prefix_of_another_and_the_end_token():
    labels = ["card", "card_arrival"]
    # after "card" the teacher ends (chosen path: no item for the end token) or continues
    content = [tok("card", 1.0), tok("\n", 0.7, {"_arrival": 0.3})]
    assert close(recover_label_distribution(labels, content), {"card": 0.7, "card_arrival": 0.3})
    # an empty alternative (an end-of-turn or special token) ends the answer where it is
    content = [tok("card", 1.0), tok("_arrival", 0.6, {"": 0.4})]
    assert close(recover_label_distribution(labels, content), {"card": 0.4, "card_arrival": 0.6})


def test_token_bytes_join_a_character_split_across_tokens():
    labels = ["café", "cafeteria"]
    e = "é".encode()
    content = [
        {"token": "caf", "logprob": 0.0, "bytes": list(b"caf"), "top_logprobs": []},
        {"token": "\ufffd", "logprob": math.log(0.9), "bytes": [e[0]], "top_logprobs": [
            {"token": "\ufffd", "logprob": math.log(0.9), "bytes": [e[0]]}, {"token": "e", "logprob": math.log(0.1), "bytes": list(b"e")}]},
        {"token": "\ufffd", "logprob": 0.0, "bytes": [e[1]], "top_logprobs": []},
    ]  # fmt: skip
    assert close(recover_label_distribution(labels, content), {"café": 0.9, "cafeteria": 0.1})
    # without bytes the token strings are used
    content = [tok("card", 0.5, {"exchange": 0.5}, with_bytes=False), tok("_linking", 1.0, with_bytes=False)]
    assert close(recover_label_distribution(LABELS, content), {"card_linking": 0.5, "exchange_rate": 0.5})


@pytest.mark.parametrize(
    "content",
    [None, [], "x", [{"token": "card"}], [tok("Hello", 0.9, {"Hi": 0.1})]],
    ids=["none", "empty", "not a list", "no logprob", "no label anywhere"],
)
def test_no_usable_logprobs_is_none(content):
    assert recover_label_distribution(LABELS, content) is None


def test_an_answer_that_leaves_the_labels_keeps_only_its_alternatives():
    # chosen "card_x..." is no label; the alternative "exchange" at the first position still is one
    content = [tok("card", 0.7, {"exchange": 0.3}), tok("_xyz", 1.0), tok("_arrival", 1.0)]
    assert close(recover_label_distribution(LABELS, content), {"exchange_rate": 1.0})


def test_consistent_labels_rule():
    assert consistent_labels("", LABELS) == [0, 1, 2]
    assert consistent_labels("", LABELS, ended=True) == []
    assert consistent_labels(" card_", LABELS) == [0, 1]
    assert consistent_labels("card_arrival.\nbecause", LABELS) == [0]
    assert consistent_labels("card_arrival because", LABELS) == []


def test_soften_is_p_to_one_over_t_renormalised():
    s = soften({"a": 0.8, "b": 0.2}, 2.0)
    assert math.isclose(s["a"], math.sqrt(0.8) / (math.sqrt(0.8) + math.sqrt(0.2)))
    assert math.isclose(sum(s.values()), 1.0)
    assert soften({"a": 0.8, "b": 0.2}, 1.0) == pytest.approx({"a": 0.8, "b": 0.2})


# --- our own server on 127.0.0.1, answering with logprobs ------------------------------------
TEACHER_DIST = {"card_arrival": 0.42, "card_linking": 0.18, "exchange_rate": 0.4}


class LabelRunner(FakeRunner):
    """A byte-level model whose answer distribution over the labels is TEACHER_DIST: each next byte
    gets the log of the label mass behind it (the end of generation ends a label); every other token
    is e^-30 times less likely."""

    def _logits(self, history):
        logits = np.full(self.n_vocab, -30.0, dtype=np.float32)
        done = bytes(t - 1 for t in history[history.index(ASSISTANT) + 1 :] if 0 < t < 257) if ASSISTANT in history else b""
        live = {lab.encode(): p for lab, p in TEACHER_DIST.items() if lab.encode().startswith(done)}
        for lab, p in live.items():
            nxt = EOS if lab == done else lab[len(done)] + 1
            logits[nxt] = np.logaddexp(logits[nxt], math.log(p)) if logits[nxt] > -30 else math.log(p)
        return logits


@pytest.fixture
def served():
    """``edgedistill serve``'s app on a free port of 127.0.0.1 (uvicorn in a thread), model LabelRunner."""
    import uvicorn
    from edgedistill.serve.app import create_app
    from edgedistill.serve.artifact import Artifact
    from edgedistill.serve.engine import Engine
    from edgedistill.serve.settings import Settings

    s = Settings.load(artifact="unused.gguf", model_alias="teacher", n_threads=1)
    runner = LabelRunner()
    app = create_app(s, engine=Engine(runner, max_queue=s.max_queue), artifact=Artifact(name="teacher", format="gguf", model_path=Path("x.gguf")))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


def _spec(top_logprobs=20, enabled=True):
    task = Task(name="t", type="classification", instructions="Classify.", labels=LABELS)
    kd = SimpleNamespace(enabled=enabled, source="api_logprobs", top_logprobs=top_logprobs)
    return SimpleNamespace(task=task, training=SimpleNamespace(logit_kd=kd), generation=SimpleNamespace(seed=0))


def test_served_teacher_logprobs_recover_a_distribution_that_sums_to_one(served, tmp_path):
    spec = _spec()
    rows = [{"id": "a", "input": "where is my card"}]
    reqs = label_requests(spec, rows)
    assert reqs[0].top_logprobs == 20
    with ResponseCache(tmp_path / "c.sqlite") as cache:
        teacher = OpenAITeacher(served, "teacher", cache=cache, max_retries=0)
        results = teacher.run_chat_many(reqs)
        attach_labels(spec, rows, reqs, results, teacher)
        row = rows[0]
        assert row["output"] == "card_arrival"  # greedy: the most likely first byte, then the most likely branch
        soft = row["soft_labels"]
        assert math.isclose(sum(soft.values()), 1.0, rel_tol=1e-9)
        for label, p in TEACHER_DIST.items():  # what the server's model really gives each label
            assert soft[label] == pytest.approx(p, abs=1e-6)
        # what was sent is what is keyed and cached, logprobs included; a rerun asks nothing
        assert cache.get_request(results[0].cache_key)["top_logprobs"] == 20
        assert cache.get(results[0].cache_key)["logprobs"][0]["top_logprobs"]
        again = OpenAITeacher(served, "teacher", cache=cache).run_chat_many(reqs)
        assert again[0].cached and again[0].logprobs == results[0].logprobs
        # the same request without logprobs is another one (its answer has none)
        plain = ChatRequest(messages=reqs[0].messages, max_tokens=reqs[0].max_tokens, seed=reqs[0].seed, constrain_to=spec.task)
        assert teacher.key_for(plain) != teacher.key_for(reqs[0])
        assert teacher.run_chat_many([plain])[0].logprobs is None


def test_labelling_asks_for_logprobs_only_with_api_soft_labels():
    assert wants_soft_labels(_spec())
    assert label_requests(_spec(top_logprobs=5), [{"input": "x"}])[0].top_logprobs == 5
    assert label_requests(_spec(), [{"input": "x"}], sample=1, temperature=0.7)[0].top_logprobs is None  # self-consistency
    assert label_requests(_spec(enabled=False), [{"input": "x"}])[0].top_logprobs is None
    plain = ChatRequest(messages=[{"role": "user", "content": "x"}])
    assert "top_logprobs" not in plain.decoding()  # the keys of answers cached before stay the same


def test_an_answer_without_logprobs_keeps_the_hard_label_only():
    spec = _spec()
    rows = [{"id": "a", "input": "x"}]
    reqs = label_requests(spec, rows)
    res = SimpleNamespace(text="card_linking", finish_reason="stop", cache_key="k", logprobs=None)
    attach_labels(spec, rows, reqs, [res], SimpleNamespace(model_id="m"))
    assert rows[0]["output"] == "card_linking" and "soft_labels" not in rows[0]
