"""The cascade: who answers one request. The request's policy (threshold, fallback on/off), the
student's calibrated confidence, the decision, the teacher call and why it was made.

Chat, completions, ``/v1/predict`` and the calibration all go through here: ``decision`` is the
rule, ``consult_teacher`` the one place the teacher is asked (a teacher failure is never an error:
the student's answer is served, flagged with ``teacher_error``), ``student_predict`` the student's
answer to a task input with its raw and calibrated confidence.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgedistill.serve.confidence import calibrated, field_confidence, generation_scores, raw_scores, temperature_for
from edgedistill.serve.engine import GenParams, SeqResult
from edgedistill.serve.errors import APIError
from edgedistill.serve.fallback import TeacherError
from edgedistill.serve.state import State
from edgedistill.serve.submission import run
from edgedistill.serve.types import EdgedistillInfo
from edgedistill.serve.validation import max_tokens as _max_tokens
from fastapi import Request

from edgedistill.conversation import TaskInput

log = logging.getLogger("edgedistill.serve")

# ---- the request's policy -------------------------------------------------------------------------

THRESHOLD_HEADER = "X-Edgedistill-Threshold"
FALLBACK_HEADER = "X-Edgedistill-Fallback"
THRESHOLD_PATTERN = r"^(0(\.[0-9]+)?|1(\.0+)?)$"  # a decimal from 0 to 1: 0, 0.9, 1, 1.0 (no sign, exponent or spaces)
_THRESHOLD_RE = re.compile(THRESHOLD_PATTERN)
POLICY_HEADERS = [
    {
        "name": THRESHOLD_HEADER,
        "in": "header",
        "required": False,
        "description": "This request's threshold (a decimal from 0 to 1, e.g. 0.9) instead of the server's: a calibrated "
        "confidence below it (or any, at 1) makes the answer one for the teacher.",
        "schema": {"type": "string", "pattern": THRESHOLD_PATTERN},
    },
    {
        "name": FALLBACK_HEADER,
        "in": "header",
        "required": False,
        "description": "`off`: the student answers, the teacher is never called (student-only mode); `fallback_reason` "
        "still says why the answer would have gone to the teacher. `on` (default): the server's rule.",
        "schema": {"type": "string", "enum": ["on", "off"]},
    },
]
_POLICY_NAMES = {THRESHOLD_HEADER.lower(): THRESHOLD_HEADER, FALLBACK_HEADER.lower(): FALLBACK_HEADER}


@dataclass(frozen=True)
class Policy:
    """Who may answer one request: its threshold, and whether the teacher may be asked at all.
    From the request (``X-Edgedistill-Threshold`` / ``X-Edgedistill-Fallback`` headers; on
    /v1/predict also the ``threshold`` / ``fallback`` body fields, which win), else the server's."""

    threshold: float
    fallback: bool = True

    def reason(self, confidence: float | None) -> str | None:
        """Why this answer is one for the teacher (the server's rule), whether or not it is asked."""
        if confidence is None:
            return None
        return "low_confidence" if self.threshold >= 1.0 or confidence < self.threshold else None


def request_policy(st: State, request: Request) -> Policy:
    """The request's policy from its headers, else the server's. Any other ``X-Edgedistill-*``
    header is a 400: a typo (``X-Edgedistill-Treshold``) must not silently call the teacher."""
    seen: dict[str, str] = {}
    for raw_name, raw_value in request.headers.raw:
        name = raw_name.decode("latin-1").lower()
        if not name.startswith("x-edgedistill-"):
            continue
        if name not in _POLICY_NAMES:
            raise APIError(
                400,
                f"unknown header {raw_name.decode('latin-1')[:60]!r} (a typo?); this server reads {THRESHOLD_HEADER} and "
                f"{FALLBACK_HEADER}",
                code="invalid_value",
                param=raw_name.decode("latin-1")[:60],
            )
        if name in seen:
            raise APIError(
                400, f"{_POLICY_NAMES[name]}: given twice; send it once", code="invalid_value", param=_POLICY_NAMES[name]
            )
        seen[name] = raw_value.decode("latin-1")
    threshold, fallback = st.settings.threshold, True
    if (v := seen.get(THRESHOLD_HEADER.lower())) is not None:
        if not _THRESHOLD_RE.fullmatch(v):
            raise APIError(
                400,
                f"{THRESHOLD_HEADER}: must be a decimal number from 0 to 1 such as 0.9 (got {v[:40]!r})",
                code="invalid_value",
                param=THRESHOLD_HEADER,
            )
        threshold = float(v)
    if (v := seen.get(FALLBACK_HEADER.lower())) is not None:
        if v not in ("on", "off"):
            raise APIError(
                400, f"{FALLBACK_HEADER}: must be on or off (got {v[:40]!r})", code="invalid_value", param=FALLBACK_HEADER
            )
        fallback = v == "on"
    return Policy(threshold, fallback)


def holds_stream(st: State, policy: Policy) -> bool:
    """Stream only after the confidence decision: the teacher may still be the one to answer."""
    return (
        st.teacher is not None
        and policy.fallback
        and policy.threshold > 0
        and st.settings.stream_hold_for_fallback
        and st.settings.confidence
    )


# ---- the decision ---------------------------------------------------------------------------------


@dataclass
class Decision:
    threshold: float
    fallback: bool  # the teacher could answer: one is configured, the fallback is on, the answer is not streamed live
    answered_by: str = "student"
    confidence: float | None = None
    fallback_reason: str | None = None
    teacher_error: str | None = None
    teacher_data: dict[str, Any] | None = None
    fields: dict[str, float] | None = None  # a JSON answer's calibrated confidence per field (the student's)

    def info(self) -> EdgedistillInfo:
        return EdgedistillInfo(
            answered_by=self.answered_by,
            confidence=None if self.confidence is None else round(self.confidence, 6),
            threshold=self.threshold,
            fallback=self.fallback,
            fallback_reason=self.fallback_reason,
            teacher_error=self.teacher_error,
            fields=self.fields,
        )

    def headers(self) -> dict[str, str]:
        h = {"X-Answered-By": self.answered_by}
        if self.confidence is not None:
            h["X-Edgedistill-Confidence"] = f"{self.confidence:.4f}"
        return h


def decision(st: State, policy: Policy, confidence: float | None, live: bool = False) -> Decision:
    """The decision before any teacher call: the rule's verdict, and whether the teacher may be asked."""
    return Decision(
        threshold=policy.threshold,
        fallback=st.teacher is not None and policy.fallback and not live,
        confidence=confidence,
        fallback_reason=policy.reason(confidence),
    )


async def consult_teacher(
    st: State, d: Decision, route: str, body: dict[str, Any], check: Callable[[dict[str, Any]], None] | None = None
) -> None:
    """Ask the teacher when ``d`` sends the answer to it and it may answer; ``check`` may refuse its
    answer (a ``TeacherError``). Sets ``d.answered_by`` and ``d.teacher_data``, or ``d.teacher_error``."""
    if not (d.fallback_reason and d.fallback):
        return
    try:
        data = await st.teacher.post(route, body)  # type: ignore[union-attr]
        if check is not None:
            check(data)
        d.teacher_data, d.answered_by = data, "teacher"
        st.metrics.fallbacks.labels(d.fallback_reason, "teacher").inc()
    except TeacherError as e:
        d.teacher_error = str(e)
        st.metrics.fallbacks.labels(d.fallback_reason, "teacher_failed").inc()


def valid_usage(usage: Any) -> dict[str, Any] | None:
    """A teacher's usage we can pass on and count (its three counts non-negative integers), else nothing."""
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return usage if isinstance(usage, dict) and all(type(usage.get(k)) is int and usage[k] >= 0 for k in keys) else None


# ---- chat and completions -------------------------------------------------------------------------


def generation_confidence(st: State, results: list[SeqResult]) -> float | None:
    """The calibrated confidence of a generated answer: its least confident choice (None: switched off)."""
    if not st.settings.confidence:
        return None
    t = temperature_for(st.calibration, "generation")
    return min(calibrated(generation_scores(r.token_probs, st.settings.confidence_quantile), t) for r in results)


def json_confidence(st: State, results: list[SeqResult]) -> tuple[float | None, dict[str, float] | None]:
    """The calibrated confidence of JSON answers (a response_format or a tool call): the least
    confident choice's, which is its weakest field's, and that choice's per-field confidences. A
    choice that is no JSON object (cut off) gets the generation rule. (None, None): switched off."""
    if not st.settings.confidence:
        return None, None
    t = temperature_for(st.calibration, "generation")
    weakest: tuple[float, dict[str, float] | None] | None = None
    for r in results:
        scored = structured_scores(st, r, t)
        if scored is None:
            conf, fields = calibrated(generation_scores(r.token_probs, st.settings.confidence_quantile), t), None
        else:
            conf, fields = calibrated(scored[0], t), scored[1]
        if weakest is None or conf < weakest[0]:
            weakest = (conf, fields)
    return weakest if weakest is not None else (None, None)


def answer_confidence(st: State, results: list[SeqResult], structured: bool) -> tuple[float | None, dict[str, float] | None]:
    """Chat/completions: (confidence, per-field confidences of a JSON answer or None)."""
    return json_confidence(st, results) if structured else (generation_confidence(st, results), None)


async def decide(
    st: State, kind: str, body: dict[str, Any], conf: float | None, policy: Policy, fields: dict[str, float] | None = None
) -> Decision:
    """Chat/completions: the decision, and the teacher's answer to the same request body when it is asked."""
    d = decision(st, policy, conf)
    d.fields = fields
    await consult_teacher(st, d, "/chat/completions" if kind == "chat" else "/completions", body)
    return d


# ---- task inputs (/v1/predict, calibration) -------------------------------------------------------


@dataclass
class StudentAnswer:
    value: Any
    error: str | None
    confidence: float
    scores: list[float]  # uncalibrated log-masses, [answer, competitors...] (what fit_temperature takes)
    result: SeqResult
    max_tokens: int
    fields: dict[str, float] | None = None  # a JSON answer's calibrated confidence per field


async def student_predict(st: State, text: TaskInput, request: Request | None = None) -> StudentAnswer:
    """The student's answer to one task input (a text or a conversation): task template, greedy,
    parse, calibrated confidence."""
    task = st.artifact.task  # type: ignore[union-attr]
    runner = st.engine.runner
    prompt = runner.tokenize(runner.render_chat(task.student_messages(text)), special=True, add_bos=True)
    # the task's output budget, as every stage decodes an answer, clipped to the slot's context
    max_tokens = _max_tokens(st, min(task.output_budget, runner.ctx_per_slot - len(prompt)), len(prompt), param="input")
    params = GenParams(
        max_tokens=max_tokens, temperature=0.0, confidence=True, label_trie=st.label_trie, constraint=st.task_constraint
    )
    res = (await run(st, request, [prompt], [params]))[0]
    st.metrics.record_ttft("/v1/predict", res.first_token_s)
    return task_answer(st, res, max_tokens)


def task_answer(st: State, res: SeqResult, max_tokens: int) -> StudentAnswer:
    """One decoded answer to a task input, parsed, with its calibrated confidence: the label set's
    scores (classification), the weakest field's (a JSON answer), else the generation rule; 0 for
    an answer invalid for the task. /v1/predict and chat in the task's format (``serve.task_chat``)
    both score here, so the cascade thresholds the same confidence on either route."""
    task = st.artifact.task  # type: ignore[union-attr]
    value, err = task.parse_answer(res.text)
    kind = "classification" if task.type == "classification" else "generation"
    t = temperature_for(st.calibration, kind)
    fields = None
    if res.label_scorer is not None:
        scores = res.label_scorer.scores(task.labels.index(value) if not err else None)
    elif task.structured and (scored := structured_scores(st, res, t)) is not None:
        scores, fields = scored
    else:
        scores = generation_scores(res.token_probs, st.settings.confidence_quantile)
    conf = 0.0 if err else calibrated(scores, t)
    return StudentAnswer(value, err, conf, scores, res, max_tokens, fields)


def structured_scores(st: State, res: SeqResult, t: float) -> tuple[list[float], dict[str, float]] | None:
    """A JSON answer's score vector and its fields' calibrated confidences (None: not JSON). The
    weakest field decides: a confident name with a guessed time still goes to the teacher."""
    fc = structured_confidence(st, res)
    if fc is None:
        return None
    return raw_scores(fc.lowest), {k: round(calibrated(raw_scores(v), t), 6) for k, v in fc.fields.items()}


def structured_confidence(st: State, res: SeqResult):
    """The raw per-field confidence of a JSON answer (``serve.confidence.field_confidence``)."""
    return field_confidence(
        res.text, res.tokens, st.engine.runner.pieces, res.token_probs, res.forced, st.settings.confidence_quantile
    )


@dataclass
class TaskAnswer:
    """The answer served for one task input: the parsed value (the teacher's when it answered)."""

    value: Any
    error: str | None
    student: StudentAnswer
    decision: Decision
    teacher_usage: dict[str, Any] | None = None


def teacher_body(st: State, text: TaskInput) -> dict[str, Any]:
    """The chat request that asks the teacher the task's answer to one input (/v1/predict's fallback
    and its shadow checks): the task's teacher prompt, in the answer's shape where the API takes it."""
    task = st.artifact.task  # type: ignore[union-attr]
    # the teacher's budget is the task's, the one the student has before the context clips it
    body = {"messages": task.teacher_messages(text), "max_tokens": task.output_budget, "temperature": 0}
    shaped = task.response_format() if not st.teacher_refuses_response_format else None
    if shaped:  # the teacher answers in shape too (its API's own constraint); the prompt still names the schema
        body["response_format"] = shaped
    return body


def teacher_value(st: State, data: dict[str, Any], student_error: str | None) -> tuple[Any, str | None]:
    """The teacher's answer parsed for the task; a ``TeacherError`` when it is no valid answer (and
    the student's is: a student answer that is invalid takes any teacher answer over its own)."""
    task = st.artifact.task  # type: ignore[union-attr]
    ttext = (data["choices"][0].get("message") or {}).get("content")
    if not isinstance(ttext, str):  # a teacher that called a tool instead of answering
        raise TeacherError("invalid_answer (no content)")
    tvalue, terr = task.parse_answer(ttext, data["choices"][0].get("finish_reason"))
    if terr and not student_error:
        raise TeacherError(f"invalid_answer ({terr})")
    return tvalue, terr


async def predict(st: State, text: TaskInput, policy: Policy, request: Request | None = None) -> TaskAnswer:
    """The student's answer; the teacher's when the student is unsure or its answer is invalid for
    the task (whatever the threshold), unless the policy keeps the teacher out."""
    ans = await student_predict(st, text, request)
    st.metrics.confidence.labels("/v1/predict").observe(ans.confidence)
    d = decision(st, policy, ans.confidence)
    d.fallback_reason = ans.error or d.fallback_reason  # an invalid answer goes to the teacher whatever the threshold
    parsed = await consult_task_teacher(st, d, teacher_body(st, text), student_invalid=ans.error is not None)
    if d.answered_by == "teacher":
        value, err = parsed[0]
        return TaskAnswer(value, err, ans, d, valid_usage(d.teacher_data.get("usage")))  # type: ignore[union-attr]
    return TaskAnswer(ans.value, ans.error, ans, d)


async def consult_task_teacher(
    st: State, d: Decision, body: dict[str, Any], student_invalid: bool
) -> list[tuple[Any, str | None]]:
    """Ask the teacher a task input (``body``: its chat request, the task's teacher prompt) when
    ``d`` sends the answer to it, in the task's response format where its API takes one; an answer
    invalid for the task is refused unless the student's was invalid too. Returns each choice's
    parsed (value, error) when the teacher answered (/v1/predict and chat in the task's format)."""
    task = st.artifact.task  # type: ignore[union-attr]
    parsed: list[tuple[Any, str | None]] = []

    def check(data: dict[str, Any]) -> None:
        parsed.clear()
        for choice in data["choices"]:
            ttext = (choice.get("message") or {}).get("content")
            if not isinstance(ttext, str):  # a teacher that called a tool instead of answering
                raise TeacherError("invalid_answer (no content)")
            tvalue, terr = task.parse_answer(ttext, choice.get("finish_reason"))
            if terr and not student_invalid:
                raise TeacherError(f"invalid_answer ({terr})")
            parsed.append((tvalue, terr))

    body = dict(body)
    shaped = task.response_format() if not st.teacher_refuses_response_format else None
    if shaped:  # the teacher answers in shape too (its API's own constraint); the prompt still names the schema
        body["response_format"] = shaped
    else:
        body.pop("response_format", None)
    await consult_teacher(st, d, "/chat/completions", body, check)
    if shaped and d.teacher_error and d.teacher_error.startswith("http_400"):
        # an API without structured outputs: prompting alone from now on, said once
        st.teacher_refuses_response_format = True
        log.warning("the teacher API refused response_format (%s); asking it by prompt alone from now on", d.teacher_error)
        d.teacher_error = None
        body.pop("response_format")
        await consult_teacher(st, d, "/chat/completions", body, check)
    return parsed
