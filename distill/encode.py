"""Training examples as token ids, and their batches: one example's prompt and answer tokens with
labels only on the answer (:func:`encode_example`), and the collator that pads them (with the soft
labels' rows and the teacher's cached states when present) for ``distill.train``."""

from __future__ import annotations

import math
from typing import Any

import torch
from edgedistill.distill.label_kd import collate_soft
from edgedistill.runtimes.hf import render_chat

IGNORE = -100


def answer_text(tokenizer: Any, messages: list[dict], answer: str) -> tuple[str, str]:
    """(prompt, answer part): the rendered prompt with the generation prompt, and what the chat
    template puts after it for the assistant turn: the answer followed by the end-of-turn marker
    (e.g. ``answer<|im_end|>`` for ChatML), trailing whitespace stripped."""
    prompt = render_chat(tokenizer, messages)
    full = render_chat(tokenizer, messages, answer)
    if full.startswith(prompt) and answer.strip() in full[len(prompt) :]:
        tail = full[len(prompt) :].rstrip()
    else:  # a template whose prompt is not a prefix of the conversation: answer + EOS
        tail = answer
    eos = getattr(tokenizer, "eos_token", None)
    if eos and tail.endswith(answer.strip()) and not tail.endswith(eos):
        tail += eos  # the template has no end-of-turn marker: EOS teaches the model to stop
    return prompt, tail


def encode_example(
    tokenizer: Any, messages: list[dict], answer: str, max_length: int, cut: list[int] | None = None
) -> dict[str, list[int]]:
    """Token ids of one training example with labels only on the answer (and end-of-turn) tokens.

    Prompt and answer part are tokenized separately and concatenated, so the label boundary is
    exact; a too-long prompt is cut from the left (the answer is kept), which also cuts the start
    of the system turn: ``cut`` (if given) gets the example's full length appended when it is cut.
    """
    prompt, tail = answer_text(tokenizer, messages, answer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + len(answer_ids) > max_length:
        if cut is not None:
            cut.append(len(prompt_ids) + len(answer_ids))
        if len(answer_ids) >= max_length:
            answer_ids = answer_ids[: max_length - 1]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(answer_ids)) :]
    input_ids = list(prompt_ids) + list(answer_ids)
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE] * len(prompt_ids) + list(answer_ids),
    }


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


class Collator:
    """Right padding: input_ids with pad_id, attention_mask with 0, labels with -100. Examples with
    soft labels (``kd_rows``/``kd_probs``) add ``kd_input_ids``, ``kd_attention_mask``, ``kd_labels``
    (one row per compared label), ``kd_group`` (its example, 0.. among those with soft labels) and
    ``kd_target`` (the teacher's probability). Examples with ``kd_hidden`` (the teacher's final
    hidden states at their answer positions, ``distill.teacher_cache``) add them concatenated."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = {**self._pad(features), **collate_soft(features, self._pad)}
        if "kd_hidden" in features[0]:  # the teacher's cached states, in the order of logits[sel]
            out["kd_hidden"] = torch.cat([f["kd_hidden"] for f in features])
        return out

    def _pad(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            n = math.ceil(n / self.multiple) * self.multiple
        out = {
            "input_ids": torch.full((len(features), n), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), n), dtype=torch.long),
            "labels": torch.full((len(features), n), IGNORE, dtype=torch.long),
        }
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            out["input_ids"][i, :k] = torch.tensor(f["input_ids"])
            out["attention_mask"][i, :k] = torch.tensor(f["attention_mask"])
            out["labels"][i, :k] = torch.tensor(f["labels"])
        return out
