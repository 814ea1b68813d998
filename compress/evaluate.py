"""Measure an opened artifact: task accuracy on the held-out test set, greedy-token agreement with
the FP student on calibration prompts, and a quick decode speed on this machine.

Every runtime gets the same token ids (rendered by the source tokenizer) and decodes greedily, so
the only difference between two rows of the summary table is the artifact. The test-set answers are
decoded under the task's constraint (one of the labels, the JSON schema: :func:`task_constraint`),
as serve decodes them, so the accuracy measured here is the accuracy the server delivers; agreement
and speed are measured unconstrained (they describe the model, not the task).
"""

from __future__ import annotations

import time
from typing import Any

from edgedistill.compress.calibration import prompt_ids
from edgedistill.compress.formats import Score
from edgedistill.runtimes.base import Runtime
from edgedistill.runtimes.constrain import Constraint

from edgedistill.errors import UserError

SPEED_TOKENS = 64


def strip_special(ids: list[int], special: set[int]) -> list[int]:
    """Cut at the first end-of-generation/special token (some runtimes return it, some don't)."""
    for i, t in enumerate(ids):
        if t in special:
            return ids[:i]
    return ids


def task_constraint(task: Any, tokenizer: Any, n_vocab: int | None = None) -> Constraint | None:
    """The task's constraint on the source tokenizer's vocabulary (``n_vocab``: the model's logits
    width), built once per compress run; None for tasks without one (qa, generation)."""
    from edgedistill.runtimes.constrain import GrammarError, for_task
    from edgedistill.runtimes.hf import hf_vocab

    try:
        return for_task(task, hf_vocab(tokenizer, n_vocab))
    except GrammarError as e:
        raise UserError(f"the task's output_schema cannot be decoded under ({e}); fix it in the task spec") from None


def answer_test_set(
    rt: Runtime, tokenizer: Any, spec: Any, prompts: list[list[int]], max_tokens: int, constraint: Constraint | None = None
) -> list[str]:
    special = set(tokenizer.all_special_ids)
    return [
        tokenizer.decode(strip_special(rt.generate(p, max_tokens, constraint=constraint), special), skip_special_tokens=True) for p in prompts
    ]


def choice_scorer(spec: Any, tokenizer: Any, rows: list[dict[str, Any]], constraint: Constraint | None = None) -> Score | None:
    """A :data:`~edgedistill.compress.formats.Score` over ``rows`` (``Calibration.choice_rows``:
    teacher-labelled distillation rows, neither the calibration split nor the test set): the task's
    primary metric of a runtime's greedy answers under ``constraint``, against the teacher's labels.
    None without rows."""
    if not rows:
        return None
    prompts = [prompt_ids(tokenizer, spec.task.student_messages(r["input"])) for r in rows]
    golds = [r["output"] for r in rows]
    metric = spec.task.metric

    def score(rt: Runtime) -> dict[str, Any]:
        raw = answer_test_set(rt, tokenizer, spec, prompts, spec.task.output_budget, constraint)
        return {"metric": metric, "value": round(float(spec.task.score_answers(golds, raw)[1][metric]), 4), "n": len(rows)}

    return score


def greedy_tokens(rt: Runtime, prompts: list[list[int]], n: int, special: set[int]) -> list[list[int]]:
    return [strip_special(rt.generate(p, n), special) for p in prompts]


def token_agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    """Share of the reference's greedy tokens reproduced at the same position (ends count as tokens)."""
    match = total = 0
    for r, g in zip(ref, got, strict=True):
        r, g = [*r, -1], [*g, -1]  # -1: "stopped here", so stopping early or late is a mismatch
        total += len(r)
        match += sum(a == b for a, b in zip(r, g, strict=False))
    return match / total if total else 1.0


def decode_tokens_per_s(rt: Runtime, prompt: list[int], n: int = SPEED_TOKENS) -> float:
    """Decode speed without the prompt: time(n tokens) - time(1 token), over n - 1 tokens."""
    rt.generate(prompt, 2, ignore_eos=True)  # warm-up (allocations, first-call costs)
    t0 = time.perf_counter()
    rt.generate(prompt, 1, ignore_eos=True)
    t1 = time.perf_counter()
    rt.generate(prompt, n, ignore_eos=True)
    t2 = time.perf_counter()
    decode = (t2 - t1) - (t1 - t0)
    return (n - 1) / decode if decode > 0 else float("nan")


def measure(
    rt: Runtime,
    tokenizer: Any,
    spec: Any,
    test_prompts: list[list[int]],
    golds: list[Any],
    agree_prompts: list[list[int]],
    ref_tokens: list[list[int]] | None,
    ref_preds: list[Any] | None,
    agree_len: int,
    constraint: Constraint | None = None,
) -> dict[str, Any]:
    """Everything the summary table and the gate need for one runtime; the test-set answers under
    ``constraint`` (``constrained`` says whether they were). The scores carry their 95 % intervals;
    with the FP student's answers (``ref_preds``), ``drop_test`` is the drop on the primary metric
    (FP minus this runtime, ``Task.compare``) with its interval and a paired test."""
    special = set(tokenizer.all_special_ids)
    t = time.perf_counter()
    raw = answer_test_set(rt, tokenizer, spec, test_prompts, spec.task.output_budget, constraint)
    eval_s = time.perf_counter() - t
    preds, scores = spec.task.score_answers(golds, raw)
    tokens = greedy_tokens(rt, agree_prompts, agree_len, special)
    out: dict[str, Any] = {"scores": scores, "constrained": constraint is not None, "eval_s": round(eval_s, 2),
                           "tokens_per_s": round(decode_tokens_per_s(rt, agree_prompts[0]), 1)}
    if ref_tokens is not None:
        out["token_agreement"] = round(token_agreement(ref_tokens, tokens), 4)
    if ref_preds is not None:
        out["answer_agreement"] = round(sum(a == b for a, b in zip(preds, ref_preds, strict=True)) / max(len(preds), 1), 4)
        # the FP student minus this runtime on the same rows (the gate's drop), with a paired test
        out["drop_test"] = spec.task.compare(golds, ref_preds, preds)
    out["_preds"], out["_tokens"] = preds, tokens
    return out
