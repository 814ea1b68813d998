"""The batch's common prefix run once (distill/shared_prefix.py): the full pass's logits, gradients,
loss and teacher states, and the full pass wherever sharing would not be exact."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgedistill.distill import shared_prefix
from edgedistill.distill.encode import Collator, encode_example
from edgedistill.distill.teacher_cache import answer_positions, teacher_hidden
from edgedistill.distill.train import DistillTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM, TrainingArguments

SYSTEM = (
    "You take restaurant bookings. Call book_table with the date, the time, the number of people and "
    "the name the customer gives, each the exact words of the message; call no_details when it gives none."
)
DATA = [
    ("A table for 4 at 8pm please.", '{"name": "book_table", "arguments": {"people": "4", "time": "8pm"}}'),
    ("Thanks, that is all.", '{"name": "no_details", "arguments": {}}'),
    ("Book it under Marlon Bechtel for tomorrow, a longer message than the others.", '{"name": "book_table"}'),
    ("2 people", '{"name": "book_table", "arguments": {"people": "2 people"}}'),
    ("At 7 on Friday, the name is Ada.", '{"name": "book_table", "arguments": {"date": "Friday", "time": "7"}}'),
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def rows(tok, system: str = SYSTEM) -> list[dict]:
    return [encode_example(tok, [{"role": "system", "content": system}, {"role": "user", "content": q}], a, 256) for q, a in DATA]


def batch(tok, system: str = SYSTEM) -> dict[str, torch.Tensor]:
    return Collator(tok.pad_token_id)(rows(tok, system))


def keep_positions(b: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.nonzero((b["labels"][:, 1:] != -100).any(0)).squeeze(-1)  # as DistillTrainer.compute_loss


def test_common_prefix_stops_at_the_first_difference_or_padding():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 0], [5, 6, 7, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    assert shared_prefix.common_prefix_len(ids, mask) == 3
    mask[2, 1] = 0  # a padded position is never shared
    assert shared_prefix.common_prefix_len(ids, mask) == 1
    assert shared_prefix.prefix_len(ids[:1], mask[:1], 5) == 0  # one row: nothing to share


def test_the_shared_pass_gives_the_full_pass_logits_and_gradients(tiny_model_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    b = batch(tok)
    keep = keep_positions(b)
    n = shared_prefix.prefix_len(b["input_ids"], b["attention_mask"], int(keep.min()))
    assert n >= shared_prefix.MIN_PREFIX and n <= int(keep.min())
    full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False, logits_to_keep=keep).logits
    shared = shared_prefix.forward(model, b["input_ids"], b["attention_mask"], n, logits_to_keep=keep - n).logits
    assert shared.shape == full.shape
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-5)

    weights = torch.randn_like(full)  # any loss of the logits: the gradients must agree too
    grads = []
    for logits in (full, shared):
        model.zero_grad()
        (logits * weights).sum().backward(retain_graph=True)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-3, atol=1e-5, msg=k)


def test_the_trainer_shares_the_prefix_and_its_loss_is_the_full_pass_loss(tiny_model_dir, tiny_teacher_dir, tok, tmp_path):
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = DistillTrainer(model=student, args=args, teacher=teacher, kd_temperature=2.0, kd_alpha=0.5)
    b = batch(tok)
    with torch.no_grad():
        shared = trainer.compute_loss(student, dict(b))
        assert trainer._shared_tokens > 0
        trainer._share_prefix = False
        full = trainer.compute_loss(student, dict(b))
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-6)


def test_rows_without_a_common_prefix_run_the_full_pass(tiny_model_dir, tok, tmp_path):
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = DistillTrainer(model=student, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    b = batch(tok, system="")
    b["input_ids"][0, 0] = tok.pad_token_id  # the first tokens differ: nothing in common
    with torch.no_grad():
        trainer.compute_loss(student, dict(b))
    assert trainer._shared_tokens == 0 and trainer._share_prefix


def test_the_teachers_states_with_the_prefix_shared_are_each_rows_own(tiny_teacher_dir, tok):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    rs = rows(tok)
    got = teacher_hidden(teacher, rs, pad_id=tok.pad_token_id, batch_size=2)  # the batches after the first share
    assert got is not None
    with torch.no_grad():
        for r, h in zip(rs, got, strict=True):
            alone = teacher.base_model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).last_hidden_state[0]
            torch.testing.assert_close(h, alone[answer_positions(r["labels"])], rtol=1e-4, atol=1e-5)


def test_a_sliding_window_model_is_not_shared(tok):
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, pad_token_id=tok.pad_token_id)  # fmt: skip
    model = MistralForCausalLM(cfg).eval()
    b = batch(tok)
    keep = keep_positions(b)
    n = shared_prefix.prefix_len(b["input_ids"], b["attention_mask"], int(keep.min()))
    assert n and shared_prefix.forward(model, b["input_ids"], b["attention_mask"], n, logits_to_keep=keep - n) is None


def test_the_step_benchmark_times_both_passes_on_a_tasks_rows(tiny_model_dir, tmp_path):
    import json

    import yaml
    from edgedistill.distill import step_benchmark

    spec = {
        "name": "tiny-tools",
        "type": "extraction",
        "instructions": SYSTEM,
        "output_schema": {"type": "object", "properties": {"people": {"type": "string"}}, "additionalProperties": False},
        "seeds": [{"input": f"{q} ({i})", "output": {"people": "4"}} for i in range(2) for q, _ in DATA],
        "test_set": {"path": "test.jsonl"},
        "teacher": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
        "student": {"path": str(tiny_model_dir)},
    }
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec))
    data = "".join(json.dumps({"input": q, "output": {"people": str(i)}}) + "\n" for i, (q, _) in enumerate(DATA))
    (tmp_path / "test.jsonl").write_text(data)
    out = step_benchmark.main(["--spec", str(tmp_path / "task.yaml"), "--model", str(tiny_model_dir), "--data",
                           str(tmp_path / "test.jsonl"), "--rounds", "1", "--precision", "float32"])  # fmt: skip
    assert out["rows"] == len(DATA) and out["common_prefix_tokens"] >= shared_prefix.MIN_PREFIX
    assert out["shared_s"]["best"] > 0 and out["full_s"]["best"] > 0
    assert out["loss"]["shared"] == pytest.approx(out["loss"]["full"], rel=1e-4)
