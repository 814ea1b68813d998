"""Student training: SFT on the teacher's answers, optionally with logit distillation.

Built on ``transformers.Trainer`` (checkpoint/resume, gradient accumulation, the accelerate /
DeepSpeed path for bigger jobs) and ``peft`` for LoRA. The loss is computed here, not by the
model: cross-entropy on the answer tokens only, and with a local teacher of the same tokenizer
``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`` over the same answer tokens.

With soft labels (``training.logit_kd.source: api_logprobs``: an example's ``soft_labels``, the
API teacher's distribution over the labels) the KL is over the labels instead (``distill.label_kd``).

The result is always a plain merged HF checkpoint (LoRA adapters merged into the weights), which
is what the compress stage reads.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from edgedistill.distill import shared_prefix
from edgedistill.distill.encode import IGNORE, Collator, ListDataset, encode_example
from edgedistill.distill.label_kd import soft_label_kl, soft_label_rows
from edgedistill.distill.precision import fast_bf16, teacher_dtype
from edgedistill.distill.teacher_cache import load_or_compute, teacher_hidden
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from edgedistill.errors import UserError
from edgedistill.manifest import sha256_json, write_json_atomic
from edgedistill.spec import TrainingConfig

CHECKPOINTS = "checkpoints"
FINGERPRINT = "fingerprint.json"
TEACHER_CACHE = "teacher_hidden.pt"  # beside the checkpoints: a resumed run reuses the teacher's pass


# --- loss -----------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-position ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``; logits are (..., vocab)."""
    t = temperature
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (t * t) * (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    base = model
    while hasattr(base, "get_base_model") and base is not base.get_base_model():  # peft wrappers
        base = base.get_base_model()
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def check_same_tokenizer(student_tok: Any, teacher_tok: Any, student: nn.Module, teacher: nn.Module) -> None:
    """Logit distillation compares distributions token by token: the vocabularies must be identical."""
    sv, tv = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if sv != tv:
        raise UserError(
            f"logit KD needs the same vocabulary: student has {sv} output logits, teacher {tv}; disable training.logit_kd"
        )
    if len(student_tok) != len(teacher_tok) or student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UserError(
            "logit KD needs the same tokenizer for teacher and student (vocabularies differ); disable training.logit_kd"
        )


class DistillTrainer(Trainer):
    """Trainer with answer-only cross-entropy and optional logit distillation from a teacher.

    ``loss = alpha * KD + (1 - alpha) * CE``, both averaged over the answer tokens of the whole
    (gradient-accumulated) batch; ce and kd are logged separately. With ``label_kd`` (soft labels
    in the batch, see :class:`Collator`) KD is the label KL instead, averaged over the examples
    that have soft labels (in the micro-batch, divided by the accumulation steps); logged as
    ``label_kd``. A batch without soft labels is trained on CE alone.
    """

    def __init__(self, *args: Any, teacher: nn.Module | None = None, kd_temperature: float = 2.0, kd_alpha: float = 0.5,
                 label_kd: bool = False, group_by_length: bool = False, **kwargs: Any):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.group_by_length = group_by_length
        self.teacher = teacher
        self.kd_temperature = kd_temperature
        self.kd_alpha = kd_alpha if teacher is not None else 0.0
        self.label_kd_alpha = kd_alpha if label_kd else 0.0
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            teacher.to(self.args.device)
        # Make Trainer count the answer tokens of the accumulated batch (num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        self._logits_to_keep = _accepts_logits_to_keep(self.model) and (teacher is None or _accepts_logits_to_keep(teacher))
        # The shared-prefix pass needs logits_to_keep; with several processes (DDP/DeepSpeed: two forward
        # calls before one backward) it is untested, so the plain pass is kept there.
        self._share_prefix = self._logits_to_keep and self.args.world_size == 1
        self._shared_tokens = 0  # prefix tokens not computed again, for the run's stats
        self._sums: dict[str, torch.Tensor] = {}

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_length and isinstance(dataset, ListDataset):
            return LengthGroupedBatches([len(r["input_ids"]) for r in dataset.rows], self.args.train_batch_size)
        return super()._get_train_sampler(train_dataset)

    def _logits(self, model: nn.Module, inputs: dict[str, torch.Tensor], keep: torch.Tensor | None) -> torch.Tensor:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if keep is not None and keep.numel() and self._share_prefix:
            # The rows' common prefix (the system turn) once, not once per row: distill.shared_prefix.
            n = shared_prefix.prefix_len(ids, mask, int(keep.min()))
            if n:
                out = shared_prefix.forward(model, ids, mask, n, logits_to_keep=keep - n)
                if out is not None:
                    self._shared_tokens += n * (ids.shape[0] - 1)
                    return out.logits
                self._share_prefix = False
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        return model(**kwargs).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        target = labels[:, 1:]
        mask = target != IGNORE  # position t predicts token t+1
        keep = None
        if self._logits_to_keep:
            # Only compute the vocabulary projection where some row has an answer token.
            keep = torch.nonzero(mask.any(0)).squeeze(-1)
            cols = keep
        else:
            cols = torch.arange(target.shape[1], device=labels.device)
        logits = self._logits(model, inputs, keep)
        if keep is None:
            logits = logits[:, :-1]
        sel = mask[:, cols]
        student = logits[sel]  # (answer tokens, vocab)
        gold = target[:, cols][sel]
        ce_tok = F.cross_entropy(student.float(), gold, reduction="none")
        kd_tok = None
        if self.teacher is not None and self.kd_alpha > 0:
            with torch.no_grad():
                if "kd_hidden" in inputs:  # the teacher's pass was made once: only its output layer here
                    t_logits = self.teacher.get_output_embeddings()(inputs["kd_hidden"])
                else:
                    t_logits = self._logits(self.teacher, inputs, keep)
                    if keep is None:
                        t_logits = t_logits[:, :-1]
                    t_logits = t_logits[sel]
            kd_tok = kd_loss(student, t_logits, self.kd_temperature)

        if num_items_in_batch is not None:
            # Normalised over the answer tokens of the whole accumulated (and, with several
            # processes, global) batch: Trainer must not divide by the accumulation steps again.
            denom = num_items_in_batch
            scale = 1.0
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                scale = float(self.args.world_size)
            self.loss_is_scaled_for_ga = True
        else:
            denom = mask.sum().clamp(min=1)
            scale = 1.0
            self.loss_is_scaled_for_ga = False
        ce = ce_tok.sum() / denom * scale
        loss = ce if kd_tok is None else self.kd_alpha * (kd_tok.sum() / denom * scale) + (1 - self.kd_alpha) * ce
        kl_ex = None
        if self.label_kd_alpha > 0 and "kd_input_ids" in inputs:
            kl_ex = soft_label_kl(lambda rows, keep: self._logits(model, rows, keep), inputs, self._logits_to_keep, self.kd_temperature)
            steps = self.args.gradient_accumulation_steps if num_items_in_batch is not None else 1
            kl = kl_ex.sum() / (kl_ex.numel() * steps) * scale
            loss = self.label_kd_alpha * kl + (1 - self.label_kd_alpha) * ce

        if model.training:
            self._accumulate("ce", ce_tok.detach().sum())
            self._accumulate("tokens", torch.tensor(float(ce_tok.numel()), device=ce_tok.device))
            if kd_tok is not None:
                self._accumulate("kd", kd_tok.detach().sum())
            if kl_ex is not None:
                self._accumulate("label_kd", kl_ex.detach().sum())
                self._accumulate("kd_examples", torch.tensor(float(kl_ex.numel()), device=kl_ex.device))
        if return_outputs:
            return loss, {"logits": logits}
        return loss

    def _accumulate(self, key: str, value: torch.Tensor) -> None:
        self._sums[key] = self._sums[key] + value if key in self._sums else value.float()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._sums.get("tokens") is not None:
            sums = {k: self.accelerator.reduce(v, reduction="sum") for k, v in self._sums.items()}
            n = max(float(sums["tokens"]), 1.0)
            logs["ce"] = float(sums["ce"]) / n
            if "kd" in sums:
                logs["kd"] = float(sums["kd"]) / n
            if "label_kd" in sums:
                logs["label_kd"] = float(sums["label_kd"]) / max(float(sums["kd_examples"]), 1.0)
            self._sums = {}
        super().log(logs, start_time)


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Example indices in batches of similar length, the batches in random order.

    The rows are shuffled, cut into mega-batches of ``mega`` batches, each sorted by length and cut
    into batches (transformers' ``LengthGroupedSampler`` up to here), and then the batches of the
    whole epoch are shuffled. transformers keeps each mega-batch's batches longest first, a
    curriculum within every 50 steps: on restaurant8k's 2400 teacher rows (150 steps) every
    mega-batch ended on batches of short utterances, most of them booking nothing (``{}``), and the
    teacher fine-tuned that way scored 0.704 slot F1 on dev against 0.893. Draws from torch's global
    generator, as the Trainer's samplers do, so ``set_seed`` and a resumed run's restored RNG state
    give the same order."""

    def __init__(self, lengths: list[int], batch_size: int, mega: int = 50):
        self.lengths, self.batch_size, self.mega = list(lengths), max(1, batch_size), max(1, mega)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths)).tolist()
        size = self.batch_size * self.mega
        batches = []
        for s in range(0, len(order), size):
            block = sorted(order[s : s + size], key=lambda i: self.lengths[i], reverse=True)
            batches += [block[b : b + self.batch_size] for b in range(0, len(block), self.batch_size)]
        # The DataLoader cuts this stream into batches again: the one short batch (the last mega-batch's
        # remainder) goes last, or every batch after it would be cut across two of ours.
        tail = batches.pop() if batches and len(batches[-1]) < self.batch_size else []
        for b in torch.randperm(len(batches)).tolist():
            yield from batches[b]
        yield from tail


class _LogCallback(TrainerCallback):
    def __init__(self, log: Callable[[dict], None]):
        self.fn = log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.fn({"step": state.global_step, **logs})


# --- checkpoints ----------------------------------------------------------------------------
def _complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N folders whose trainer_state.json (written last) is readable, newest first."""
    found = []
    for d in ckpt_dir.glob("checkpoint-*"):
        if not d.is_dir() or not d.name.split("-")[-1].isdigit():
            continue
        try:
            json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            shutil.rmtree(d, ignore_errors=True)  # killed while saving
            continue
        found.append(d)
    return sorted(found, key=lambda d: int(d.name.split("-")[-1]), reverse=True)


def _prepare_checkpoints(ckpt_dir: Path, fingerprint: str) -> Path | None:
    """The checkpoint to resume from, if the earlier run had the same model, data and settings."""
    marker = ckpt_dir / FINGERPRINT
    if ckpt_dir.exists():
        try:
            same = json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:  # checkpoints of a different run: start over
            shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"fingerprint": fingerprint})
    found = _complete_checkpoints(ckpt_dir)
    return found[0] if found else None


# --- training -------------------------------------------------------------------------------
def _load_tokenizer(path: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "chat_template", None):
        raise UserError(f"tokenizer of {path} has no chat template; use an instruct/chat model as the student")
    return tok


def train(
    base_dir: Path,
    out_dir: Path,
    examples: list[dict],
    cfg: TrainingConfig,
    teacher_dir: Path | None = None,
    log: Callable[[dict], None] | None = None,
    *,
    max_steps: int | None = None,
    progress: bool = False,
    callbacks: list[TrainerCallback] | None = None,
) -> dict:
    """Fine-tune the HF checkpoint in base_dir on examples ({"messages": [...], "answer": str}).

    ``cfg.method`` "lora" trains LoRA adapters on all linear layers and merges them, "full" trains
    every weight. With ``teacher_dir`` and ``cfg.logit_kd.enabled`` the teacher's logits are
    distilled too; with ``cfg.logit_kd.source`` api_logprobs the examples' ``soft_labels`` are
    (the label KL). Checkpoints go to out_dir/checkpoints every ``cfg.save_steps`` steps and a
    rerun resumes from the newest one (same data and settings); on success the merged model and
    tokenizer are written to out_dir and the checkpoints removed. ``max_steps`` overrides
    ``cfg.epochs``; ``callbacks`` are extra TrainerCallbacks (e.g. to read the gradients). Returns {"train_loss", "final_loss", "losses", "steps", "runtime_s",
    "params", "trainable_params"}.
    """
    from transformers import set_seed

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not (base_dir / "config.json").is_file():
        raise UserError(f"student base {base_dir} is not an HF checkpoint folder (no config.json)")
    if not examples:
        raise UserError("no training examples; the dataset is empty")
    kd = cfg.logit_kd
    label_kd = kd.enabled and kd.source == "api_logprobs"
    use_kd = teacher_dir is not None and kd.enabled and kd.source == "local"
    if kd.enabled and kd.source == "local" and teacher_dir is None:
        raise UserError("training.logit_kd is enabled but no local teacher model was given")

    tokenizer = _load_tokenizer(base_dir)
    rows = []
    cut: list[int] = []  # full lengths of the examples cut to max_length
    for i, ex in enumerate(examples):
        if not isinstance(ex.get("messages"), list) or not isinstance(ex.get("answer"), str):
            raise UserError(f"training example {i} needs 'messages' (a list) and 'answer' (a string)")
        row: dict[str, Any] = encode_example(tokenizer, ex["messages"], ex["answer"], cfg.max_length, cut)
        if label_kd and ex.get("soft_labels"):
            row.update(soft_label_rows(lambda answer, m=ex["messages"]: encode_example(tokenizer, m, answer, cfg.max_length), ex, i, kd.temperature))
        rows.append(row)

    if cut and log:
        log({"warning": f"{len(cut)} of {len(rows)} training examples are longer than training.max_length "
             f"({cfg.max_length} tokens, longest {max(cut)}) and lose the start of their prompt; raise it to keep them whole"})
    set_seed(cfg.seed)
    cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and fast_bf16())
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    params = sum(p.numel() for p in model.parameters())
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    teacher = None
    if use_kd:
        teacher_dir = Path(teacher_dir)
        if not (teacher_dir / "config.json").is_file():
            raise UserError(f"teacher {teacher_dir} is not an HF checkpoint folder (no config.json)")
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=teacher_dtype(cfg.logit_kd.teacher_dtype))
        check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(teacher_dir), model, teacher)

    ckpt_dir = out_dir / CHECKPOINTS
    fingerprint = sha256_json(
        {
            "base": str(base_dir.resolve()),
            "teacher": str(Path(teacher_dir).resolve()) if use_kd else None,
            "cfg": cfg.model_dump(),
            "examples": examples,
            "max_steps": max_steps,
        }
    )
    resume = _prepare_checkpoints(ckpt_dir, fingerprint)

    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        num_train_epochs=cfg.epochs,
        max_steps=max_steps if max_steps is not None else -1,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,  # < 1: a fraction of the training steps
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear",
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,  # the newest may be half-written when the run is killed
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not cuda,
        bf16=bf16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=not progress,
    )
    callbacks = ([_LogCallback(log)] if log else []) + list(callbacks or [])
    trainer = DistillTrainer(
        model=model,
        args=args,
        train_dataset=ListDataset(rows),
        data_collator=Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)),
        processing_class=tokenizer,
        callbacks=callbacks,
        teacher=teacher,
        kd_temperature=cfg.logit_kd.temperature,
        kd_alpha=cfg.logit_kd.alpha,
        label_kd=label_kd,
        group_by_length=cfg.group_by_length,
    )
    t0 = time.perf_counter()  # the runtime counts the teacher's pass too
    teacher_pass = None
    if teacher is not None:
        teacher_pass = "every_step"
        if cfg.logit_kd.teacher_pass == "once":
            def teacher_pass_once() -> list[torch.Tensor] | None:
                return teacher_hidden(
                    teacher,
                    rows,
                    pad_id=trainer.data_collator.pad_id,
                    batch_size=2 * cfg.batch_size,
                    autocast=trainer.autocast_smart_context_manager,
                    device=args.device,
                )

            hidden = load_or_compute(ckpt_dir / TEACHER_CACHE, teacher_pass_once)
            if hidden is not None:
                for row, h in zip(rows, hidden, strict=True):
                    row["kd_hidden"] = h
                teacher_pass = "once"
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # prints every log dict when tqdm is off
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    runtime = time.perf_counter() - t0

    final = trainer.model
    if cfg.method == "lora":
        final = final.merge_and_unload()
    final.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    final.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)

    history = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    losses = [float(h["loss"]) for h in history]
    return {
        "train_loss": float(result.training_loss),
        "final_loss": losses[-1] if losses else float(result.training_loss),
        "losses": losses,
        "ce": [float(h["ce"]) for h in history if "ce" in h],
        "kd": [float(h["kd"]) for h in history if "kd" in h],
        "label_kd": [float(h["label_kd"]) for h in history if "label_kd" in h],
        "soft_label_rows": sum(1 for r in rows if "kd_rows" in r),
        "steps": int(trainer.state.global_step),
        "resumed_from_step": int(resume.name.split("-")[-1]) if resume else 0,
        "runtime_s": runtime,
        "params": params,
        "trainable_params": trainable,
        "precision": "bf16" if bf16 else "float32",
        "truncated_examples": len(cut),
        "group_by_length": cfg.group_by_length,
        "shared_prefix_tokens": trainer._shared_tokens,  # row tokens the shared-prefix pass did not recompute
        "kd_teacher_pass": teacher_pass,
        "kd_teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch.") if teacher is not None else None,
    }
