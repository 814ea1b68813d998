"""Batched generation with transformers (the local HF teacher labelling thousands of rows, distill's
evaluation of the student): left padding, greedy or sampled, stop strings, and optionally every row
decoded under the task's constraint (``runtimes.hf_constrain``). :func:`load_causal_lm` opens a
checkpoint for it (float32 on CPU).

Needs torch and transformers, imported when used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill.runtimes.constrain import Constraint
from edgedistill.runtimes.hf import HFVocab, hf_vocab
from edgedistill.runtimes.hf_constrain import constrained_kwargs


@dataclass
class Generation:
    """One row of a batch: the answer text (cut at a stop string) and what it took."""

    text: str
    prompt_tokens: int
    completion_tokens: int  # the generated tokens kept, plus the end-of-sequence token when there was one
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def load_causal_lm(path: Path) -> tuple[Any, Any]:
    """(tokenizer, model) of an HF checkpoint for :func:`generate_batch`: float32, eval mode, CPU; a
    tokenizer without a pad token pads with EOS. Errors are transformers' own (OSError, ValueError, KeyError)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to("cpu").eval()
    return tok, model


def eos_ids(model: Any, tok: Any) -> set[int]:
    """The generation config's and the tokenizer's EOS ids (what ends a row of :func:`generate_batch`)."""
    ids: set[int] = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return ids


def model_vocab(model: Any, tok: Any) -> HFVocab:
    """:func:`hf_vocab` of a loaded model: its logits width, its generation config's end tokens."""
    return hf_vocab(tok, int(model.get_output_embeddings().weight.shape[0]), model.generation_config)


def truncate_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    if not stop:
        return text, False
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_criteria(tok: Any, stops: list[str], prompt_len: int) -> Any:
    """Stop a row once its generated text (the prompt excluded) contains a stop string."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    window = max(len(s) for s in stops) + 8  # tokens: enough to hold any stop string

    class _StopStrings(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            rows = input_ids[:, prompt_len:][:, -window:].tolist()
            done = [any(s in tok.decode(r, skip_special_tokens=True) for s in stops if s) for r in rows]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_StopStrings()])


def generate_batch(
    model: Any,
    tok: Any,
    texts: list[str],
    *,
    max_length: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop: list[str] | None,
    seed: int | None,
    constraint: Constraint | None = None,
) -> list[Generation]:
    """Blocking: generate one batch of prompt texts with the same decoding settings, left-padded.

    Greedy when temperature is 0, sampled otherwise (``torch.manual_seed(seed)`` first). Prompts
    longer than ``max_length`` tokens keep their last ``max_length`` tokens. ``constraint`` (built
    on :func:`model_vocab`): every row decoded under it, ending at any end-of-generation token.
    """
    import torch

    old_side = tok.truncation_side
    tok.truncation_side = "left"  # an overlong prompt keeps its end (the generation prompt)
    try:
        enc = tok(
            texts,
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
    finally:
        tok.truncation_side = old_side
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tok.pad_token_id,
    }
    if temperature > 0:
        if seed is not None:
            torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stop:
        # not generate(stop_strings=...): that also matches text of the prompt's tail
        kwargs["stopping_criteria"] = stop_criteria(tok, list(stop), enc["input_ids"].shape[1])
    eos = eos_ids(model, tok)
    if constraint is not None:
        eos |= model_vocab(model, tok).eog_tokens
        kwargs.update(constrained_kwargs(constraint, len(texts), enc["input_ids"].shape[1], eos))
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    gen = out[:, enc["input_ids"].shape[1] :]
    results = []
    for row, mask in zip(gen.tolist(), enc["attention_mask"].tolist()):
        n, hit_eos = len(row), False
        for i, t in enumerate(row):
            if t in eos:
                n, hit_eos = i, True
                break
        ids = row[:n]
        if not hit_eos and tok.pad_token_id is not None:
            # generate() pads rows that finished early (e.g. on a stop string)
            while ids and ids[-1] == tok.pad_token_id:
                ids.pop()
        text = tok.decode(ids, skip_special_tokens=True)
        text, hit_stop = truncate_at_stop(text, stop)
        results.append(
            Generation(
                text=text,
                prompt_tokens=int(sum(mask)),
                completion_tokens=len(ids) + (1 if hit_eos else 0),
                finish_reason="stop" if (hit_eos or hit_stop) else "length",
            )
        )
    return results
