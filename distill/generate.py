"""Synthetic data: the generator writes new inputs from the instructions and seed examples, varied
by mutation strategies; the teacher then labels them (and the unlabelled pool, when given).

A conversation seed is shown by its last user turn, and every generated input is a single user
turn: conversations are not mutated (they come from the seeds and the pool only).

Everything is derived deterministically from the spec and the cached responses, so a run killed
half-way and started again rebuilds the same rows and pays for no request twice.
"""

from __future__ import annotations

import random
import re
from typing import Any

from edgedistill.distill.soft_labels import recover_label_distribution
from edgedistill.distill.teacher import ChatRequest, ChatResult, Teacher

from edgedistill.conversation import last_user_text

REGISTERS = ["very casual", "formal and polite", "annoyed and impatient", "as a non-native English speaker", "terse, like a text message"]
STRATEGY_HINTS = {
    "length": None,  # filled per request: very short vs long
    "coverage": None,  # filled per request: one label / sub-topic
    "complexity": "Make each one more complex: several details, a condition, or a question that needs careful reading.",
    "register": None,  # filled per request: one register
    "noise": "Write them the way people really type: typos, missing punctuation, lowercase, abbreviations.",
    "edge_case": None,  # filled per request: borderline between two labels / unusual input
}
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)]|[a-z][.)])\s*", re.IGNORECASE)


def _hint(spec: Any, strategy: str, i: int, rng: random.Random) -> tuple[str, str | None]:
    """The strategy's instruction for request i, and the label it targets (coverage/edge cases)."""
    labels = spec.labels or []
    if strategy == "length":
        return ("Make each one very short: at most 6 words." if i % 2 == 0 else "Make each one long: two or three sentences with context."), None
    if strategy == "coverage" and labels:
        label = labels[i % len(labels)]
        return f"Every one must be an input whose correct answer is: {label}.", label
    if strategy == "coverage":
        return "Cover a sub-topic the examples above do not cover.", None
    if strategy == "register":
        return f"Write them {REGISTERS[i % len(REGISTERS)]}.", None
    if strategy == "edge_case" and len(labels) >= 2:
        a, b = rng.sample(labels, 2)
        return f"Make them borderline: inputs that could be confused between {a} and {b}.", a
    if strategy == "edge_case":
        return "Make them unusual edge cases: odd requests, missing information, or several requests at once.", None
    return STRATEGY_HINTS[strategy], None


def generation_requests(spec: Any, seeds: list[Any]) -> list[tuple[ChatRequest, dict]]:
    """One request per batch of new inputs, round-robin over strategies; deterministic for a spec."""
    g = spec.generation
    n_requests = -(-g.num_inputs // g.per_request) if g.num_inputs else 0
    rng = random.Random(g.seed)
    out = []
    for i in range(n_requests):
        strategy = g.strategies[i % len(g.strategies)]
        hint, target = _hint(spec, strategy, i // len(g.strategies), rng)
        pool = [s for s in seeds if target is None or spec.task.format_answer(s.output) == target] or list(seeds)
        shots = rng.sample(pool, min(g.shots, len(pool)))
        examples = "\n".join(f"- {last_user_text(s.input)}" for s in shots)
        messages = [
            {"role": "system", "content": f"You write realistic example inputs for this task: {spec.instructions.strip()}"},
            {
                "role": "user",
                "content": f"Examples of inputs:\n{examples}\n\nWrite {g.per_request} new, different inputs. {hint}\n"
                "One per line. No numbering, no answers, no explanations.",
            },
        ]
        req = ChatRequest(messages=messages, max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p, seed=g.seed + i)
        out.append((req, {"strategy": strategy, "target_label": target, "request_index": i}))
    return out


def add_typos(text: str, rng: random.Random, rate: float = 0.04) -> str:
    """Character-level noise (drop, swap, duplicate) so the noise strategy has noise even when the
    generator writes clean text."""
    chars = list(text)
    i = 0
    while i < len(chars):
        if chars[i].isalpha() and rng.random() < rate:
            op = rng.choice(("drop", "swap", "dup"))
            if op == "drop":
                del chars[i]
                continue
            if op == "swap" and i + 1 < len(chars):
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
                i += 1
            elif op == "dup":
                chars.insert(i, chars[i])
                i += 1
        i += 1
    return "".join(chars)


def parse_generated(text: str, limit: int) -> list[str]:
    """Split a generation answer into inputs: one per line, bullets/numbers/quotes stripped."""
    lines = []
    for line in text.splitlines():
        line = _BULLET.sub("", line).strip().strip('"').strip()
        if len(line) < 2 or line.endswith(":"):
            continue
        lines.append(line)
    return lines[:limit]


def synthetic_inputs(spec: Any, gen_reqs: list[tuple[ChatRequest, dict]], results: list[ChatResult], generator_id: str) -> list[dict]:
    rng = random.Random(spec.generation.seed)
    rows = []
    for (req, meta), res in zip(gen_reqs, results):
        for j, text in enumerate(parse_generated(res.text, spec.generation.per_request)):
            if meta["strategy"] == "noise":
                text = add_typos(text, rng)
            rows.append(
                {
                    "id": f"syn-{meta['request_index']}-{j}",
                    "input": text,
                    "source": "synthetic",
                    "provenance": {
                        "strategy": meta["strategy"],
                        "target_label": meta["target_label"],
                        "generator_model": generator_id,
                        "generation_decoding": {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "max_tokens": req.max_tokens},
                        "generation_cache_key": res.cache_key,
                    },
                }
            )
    return rows


def wants_soft_labels(spec: Any) -> bool:
    """Whether labelling asks the API teacher for top_logprobs (``training.logit_kd.source: api_logprobs``)."""
    kd = spec.training.logit_kd
    return bool(kd.enabled and kd.source == "api_logprobs" and spec.task.type == "classification")


def label_requests(spec: Any, rows: list[dict], sample: int = 0, temperature: float = 0.0) -> list[ChatRequest]:
    # the labelling answer (sample 0) carries the soft labels; a self-consistency sample needs none
    top = spec.training.logit_kd.top_logprobs if sample == 0 and wants_soft_labels(spec) else None
    return [
        ChatRequest(
            messages=spec.task.teacher_messages(r["input"]),
            max_tokens=spec.task.output_budget,
            temperature=temperature,
            seed=spec.generation.seed + sample,
            sample=sample,
            constrain_to=spec.task,  # the teacher answers in the task's shape as far as it can
            top_logprobs=top,
        )
        for r in rows
    ]


def attach_labels(spec: Any, rows: list[dict], reqs: list[ChatRequest], results: list[ChatResult], teacher: Teacher, key: str = "output") -> None:
    """Put the teacher's parsed answer (None when unparseable or cut off by the output budget), its
    text and finish_reason (for the labels) and its provenance on each row; with top_logprobs asked
    for, the teacher's distribution over the labels as ``soft_labels`` ({label: p}, summing to one;
    absent when the API returned no logprobs or none of them is on a label)."""
    for row, req, res in zip(rows, reqs, results):
        value, err = spec.task.parse_answer(res.text, res.finish_reason)  # a truncated answer is None
        prov = row.setdefault("provenance", {})
        if key == "output":
            row["raw_output"] = res.text
            row["finish_reason"] = res.finish_reason  # validation rejects "length" as truncated
            row["output"] = None if err else value
            if req.top_logprobs is not None and not err:
                soft = recover_label_distribution(spec.task.labels or [], res.logprobs)
                if soft is not None:
                    row["soft_labels"] = soft
            prov.update(
                teacher_model=teacher.model_id,
                label_decoding={"temperature": req.temperature, "max_tokens": req.max_tokens, "seed": req.seed},
                label_cache_key=res.cache_key,
            )
        else:
            row[key] = None if err else value
            prov[f"{key}_cache_key"] = res.cache_key
