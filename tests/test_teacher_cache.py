"""The KD teacher's pass made once (distill/teacher_cache.py): the same loss as the per-step pass,
the fallback for a model whose logits are more than its output layer, and reuse on resume."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import edgedistill.distill.train as train_mod
from edgedistill.distill.encode import Collator, encode_example
from edgedistill.distill.teacher_cache import answer_positions, teacher_hidden
from edgedistill.distill.train import DistillTrainer, train
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from edgedistill.spec import LogitKDConfig, TrainingConfig

SYSTEM = "You extract booking details as JSON."
DATA = [
    ("A table for 4 at 8pm please.", '{"people": "4", "time": "8pm"}'),
    ("Thanks, that is all.", "{}"),
    ("Book it under Marlon Bechtel for tomorrow, a much longer message than the others.", '{"date": "tomorrow"}'),
    ("2 people", '{"people": "2 people"}'),
    ("At 7 on Friday for my wife and me, the name is Ada.", '{"date": "Friday", "first_name": "Ada", "time": "7"}'),
]


def examples() -> list[dict]:
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], "answer": a} for q, a in DATA]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def teacher_dir(tiny_teacher_dir) -> Path:
    return tiny_teacher_dir


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def rows(tok) -> list[dict]:
    return [encode_example(tok, ex["messages"], ex["answer"], 256) for ex in examples()]


def test_answer_positions_are_the_positions_that_predict_answer_tokens():
    assert answer_positions([-100, -100, 5, 6, 7]) == [1, 2, 3]
    assert answer_positions([3, 4]) == [0]  # the first token has no position predicting it
    assert answer_positions([-100, -100]) == []


def test_cached_states_give_the_same_loss_as_the_teacher_run_every_step(tiny_model_dir, teacher_dir, tok, tmp_path):
    student, teacher = load(tiny_model_dir), load(teacher_dir)
    rs = rows(tok)
    hidden = teacher_hidden(teacher, rs, pad_id=tok.pad_token_id, batch_size=2)  # other batches than the trainer's
    assert hidden is not None and [h.shape[0] for h in hidden] == [len(answer_positions(r["labels"])) for r in rs]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = DistillTrainer(model=student, args=args, teacher=teacher, kd_temperature=2.0, kd_alpha=0.5)
    collate = Collator(tok.pad_token_id)
    plain = collate(rs)
    cached = collate([{**r, "kd_hidden": h} for r, h in zip(rs, hidden, strict=True)])
    assert torch.equal(cached["input_ids"], plain["input_ids"])
    with torch.no_grad():
        a = trainer.compute_loss(student, dict(plain))
        b = trainer.compute_loss(student, dict(cached))
    assert torch.allclose(a, b, rtol=1e-5), (a, b)
    with torch.no_grad():  # and it is the teacher's distribution, not any: a different teacher state changes the loss
        c = trainer.compute_loss(student, {**cached, "kd_hidden": cached["kd_hidden"] * 20})
    assert not torch.allclose(a, c, rtol=1e-3)


class _ScaledLogits(nn.Module):
    """A model whose logits are twice its output layer's (like a final soft-cap or a logit scale)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def base_model(self):
        return self.inner.base_model

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits * 2
        return out


def test_a_model_whose_logits_are_not_its_output_layer_is_not_cached(teacher_dir, tok):
    assert teacher_hidden(_ScaledLogits(load(teacher_dir)), rows(tok), pad_id=tok.pad_token_id) is None


def _cfg(**kd) -> TrainingConfig:
    return TrainingConfig(
        method="full", epochs=3, batch_size=2, learning_rate=5e-3, warmup_ratio=0.0, save_steps=2,
        logit_kd=LogitKDConfig(enabled=True, temperature=2.0, alpha=0.5, teacher_dtype="float32", **kd),
    )  # fmt: skip


def test_training_with_the_pass_once_matches_the_pass_every_step(tiny_model_dir, teacher_dir, tmp_path):
    once = train(tiny_model_dir, tmp_path / "once", examples(), _cfg(), teacher_dir=teacher_dir)
    every = train(tiny_model_dir, tmp_path / "every", examples(), _cfg(teacher_pass="every_step"), teacher_dir=teacher_dir)
    assert once["kd_teacher_pass"] == "once" and every["kd_teacher_pass"] == "every_step"
    assert once["kd"] == pytest.approx(every["kd"], rel=1e-3)
    assert once["ce"] == pytest.approx(every["ce"], rel=1e-3)
    a, b = load(tmp_path / "once").state_dict(), load(tmp_path / "every").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_a_resumed_run_reuses_the_teachers_pass(tiny_model_dir, teacher_dir, tmp_path, monkeypatch):
    calls = []
    real = train_mod.teacher_hidden

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "teacher_hidden", counted)

    class Killed(Exception):
        pass

    def kill_at_3(logs):
        if logs["step"] == 3 and "loss" in logs:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train(tiny_model_dir, out, examples(), _cfg(), teacher_dir=teacher_dir, log=kill_at_3)
    assert calls == [1] and (out / "checkpoints" / train_mod.TEACHER_CACHE).is_file()
    res = train(tiny_model_dir, out, examples(), _cfg(), teacher_dir=teacher_dir)
    assert calls == [1]  # loaded, not recomputed
    assert res["resumed_from_step"] == 2 and res["kd_teacher_pass"] == "once"
    assert not (out / "checkpoints").exists()  # removed with the checkpoints once the student is written
