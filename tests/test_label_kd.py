"""Label distillation from soft labels (distill/label_kd.py, DistillTrainer with label_kd): the KL
over labels, the student's label scores, and a tiny training run that learns a teacher's label
distribution."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgedistill.distill.encode import Collator, encode_example
from edgedistill.distill.label_kd import SOFT_LABEL_MIN_PROB, compared_labels, label_kl, soft_label_rows
from edgedistill.distill.train import DistillTrainer, train
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgedistill.errors import UserError
from edgedistill.spec import LogitKDConfig, TrainingConfig

SYSTEM = "You classify banking queries into intents."
LABELS = ["card_arrival", "exchange_rate", "top_up_failed", "lost_or_stolen_card"]
SOFT = [
    ("I am still waiting on my card, when will it arrive?", "card_arrival", {"card_arrival": 0.6, "lost_or_stolen_card": 0.3, "exchange_rate": 0.1}),
    ("What is the exchange rate for euros today?", "exchange_rate", {"exchange_rate": 0.7, "top_up_failed": 0.3}),
    ("My top up failed, please help me with it.", "top_up_failed", {"top_up_failed": 0.5, "card_arrival": 0.5}),
    ("I lost my card, when will it arrive?", "lost_or_stolen_card", None),  # no logprobs: the hard label only
]


def examples() -> list[dict]:
    out = []
    for q, a, soft in SOFT:
        ex = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], "answer": a}
        if soft:
            ex["soft_labels"] = soft
        out.append(ex)
    return out


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def rows(tok, temperature: float) -> list[dict]:
    out = []
    for i, ex in enumerate(examples()):
        row = encode_example(tok, ex["messages"], ex["answer"], 256)
        if "soft_labels" in ex:
            row.update(soft_label_rows(lambda a, m=ex["messages"]: encode_example(tok, m, a, 256), ex, i, temperature))
        out.append(row)
    return out


def label_logprob(model, tok, messages, label) -> float:
    """The model's log-probability of one label's answer tokens, from a forward of that row alone."""
    r = encode_example(tok, messages, label, 256)
    ids = torch.tensor([r["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    target = torch.tensor(r["labels"][1:])
    mask = target != -100
    return float(logp[mask].gather(-1, target[mask].unsqueeze(-1)).sum())


def student_label_dist(model_dir: Path, tok, ex: dict) -> dict[str, float]:
    model = load(model_dir)
    scores = {lab: label_logprob(model, tok, ex["messages"], lab) for lab in ex["soft_labels"]}
    z = math.log(sum(math.exp(s) for s in scores.values()))
    return {lab: math.exp(s - z) for lab, s in scores.items()}


def kl(p: dict[str, float], q: dict[str, float]) -> float:
    return sum(v * math.log(v / q[k]) for k, v in p.items() if v > 0)


# --- the loss -------------------------------------------------------------------------------
def test_label_kl_is_zero_when_student_equals_teacher_and_positive_otherwise():
    teacher = torch.tensor([0.6, 0.3, 0.1, 0.8, 0.2])
    groups = torch.tensor([0, 0, 0, 1, 1])
    for t in (1.0, 2.0):
        soft = torch.cat([teacher[:3] ** (1 / t) / (teacher[:3] ** (1 / t)).sum(), teacher[3:] ** (1 / t) / (teacher[3:] ** (1 / t)).sum()])
        # a student whose label log-probabilities are the teacher's (up to a constant per example)
        same = torch.log(teacher) + torch.tensor([-2.0, -2.0, -2.0, 5.0, 5.0])
        assert torch.allclose(label_kl(same, groups, soft, t), torch.zeros(2), atol=1e-6)
        other = torch.tensor([-1.0, -3.0, -0.5, -4.0, -0.1])
        got = label_kl(other, groups, soft, t)
        assert (got > 0).all()
        s_logp = torch.log_softmax(other[:3] / t, -1)
        manual = t * t * (soft[:3] * (soft[:3].log() - s_logp)).sum()
        assert torch.allclose(got[0], manual, rtol=1e-5)


def test_compared_labels_are_the_teachers_above_the_floor_plus_the_hard_label():
    soft = {"a": 0.7, "b": 0.3 - SOFT_LABEL_MIN_PROB / 2, "c": SOFT_LABEL_MIN_PROB / 2}
    names, probs = compared_labels(soft, "d", 1.0)
    assert names == ["a", "b", "d"]  # c is under the floor; d, the hard label, is compared at p = 0
    assert probs[2] == 0.0 and math.isclose(sum(probs), 1.0)
    names, probs = compared_labels({"a": 0.8, "b": 0.2}, "a", 2.0)
    assert probs == pytest.approx([math.sqrt(0.8) / (math.sqrt(0.8) + math.sqrt(0.2)), math.sqrt(0.2) / (math.sqrt(0.8) + math.sqrt(0.2))])
    # a teacher sure of the hard label: nothing to compare, no rows
    assert soft_label_rows(lambda a: {"label": a}, {"answer": "a", "soft_labels": {"a": 1.0 - SOFT_LABEL_MIN_PROB / 2}}, 0, 1.0) == {}
    assert len(soft_label_rows(lambda a: {"label": a}, {"answer": "a", "soft_labels": {"a": 0.9, "b": 0.1}}, 0, 1.0)["kd_rows"]) == 2
    with pytest.raises(UserError, match="soft_labels"):
        soft_label_rows(lambda a: {}, {"answer": "a", "soft_labels": {"a": "high"}}, 3, 1.0)


def test_compute_loss_blends_the_label_kl_and_ce(tiny_model_dir, tok, tmp_path):
    from transformers import TrainingArguments

    student = load(tiny_model_dir)
    batch = Collator(tok.pad_token_id)(rows(tok, 2.0))
    assert batch["kd_group"].tolist() == [0, 0, 0, 1, 1, 2, 2]  # the fourth example has no soft labels
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = DistillTrainer(model=student, args=args, kd_temperature=2.0, kd_alpha=0.3, label_kd=True)
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[target != -100], target[target != -100])
    # the label KL computed independently: one forward per (example, label), softmax over labels at T
    kls = []
    for ex in examples():
        if "soft_labels" not in ex:
            continue
        names, probs = compared_labels(ex["soft_labels"], ex["answer"], 2.0)
        scores = torch.tensor([label_logprob(student, tok, ex["messages"], n) for n in names])
        s_logp = torch.log_softmax(scores / 2.0, -1)
        p = torch.tensor(probs)
        # per answer token, as the CE: the mean token count of the example's label rows
        tokens = [sum(t != -100 for t in encode_example(tok, ex["messages"], n, 256)["labels"]) for n in names]
        kls.append(4.0 * (p * (p.log() - s_logp)).sum() / (sum(tokens) / len(tokens)))
    want = 0.3 * torch.stack(kls).mean() + 0.7 * ce
    assert torch.allclose(loss, want, rtol=1e-4)
    trainer._logits_to_keep = False  # models without logits_to_keep: logits at every position
    with torch.no_grad():
        assert torch.allclose(trainer.compute_loss(student, dict(batch)), loss, rtol=1e-5)
    plain = Collator(tok.pad_token_id)([encode_example(tok, ex["messages"], ex["answer"], 256) for ex in examples()])
    with torch.no_grad():  # a batch without soft labels: CE alone
        assert torch.allclose(trainer.compute_loss(student, dict(plain)), ce, rtol=1e-4)


# --- training -------------------------------------------------------------------------------
def test_training_with_soft_labels_learns_the_teachers_label_distribution(tiny_model_dir, tok, tmp_path):
    cfg = TrainingConfig(
        method="full", epochs=12, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, save_steps=1000,
        logit_kd=LogitKDConfig(enabled=True, source="api_logprobs", temperature=1.0, alpha=1.0),
    )  # fmt: skip
    out = tmp_path / "soft"
    before = [kl(ex["soft_labels"], student_label_dist(tiny_model_dir, tok, ex)) for ex in examples() if "soft_labels" in ex]
    res = train(tiny_model_dir, out, examples(), cfg)
    after = [kl(ex["soft_labels"], student_label_dist(out, tok, ex)) for ex in examples() if "soft_labels" in ex]
    assert res["soft_label_rows"] == 3 and len(res["label_kd"]) == res["steps"] == 12
    assert res["label_kd"] == pytest.approx(res["losses"], rel=1e-4)  # alpha=1: the loss is the label KL
    assert sum(after) < 0.5 * sum(before), (before, after)
    assert res["label_kd"][-1] < res["label_kd"][0]


def test_soft_labels_are_ignored_unless_the_source_is_api_logprobs(tiny_model_dir, tmp_path):
    cfg = TrainingConfig(method="full", epochs=1, batch_size=4, save_steps=1000)
    res = train(tiny_model_dir, tmp_path / "plain", examples(), cfg)
    assert res["soft_label_rows"] == 0 and res["label_kd"] == []
