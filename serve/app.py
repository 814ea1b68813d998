"""The OpenAI-compatible app: ``create_app(settings, engine=None)``.

Request path: auth -> body (size, content type, JSON) -> pydantic model -> limits -> prompt ->
engine (bounded: 429 past the queue) -> confidence -> teacher if unsure -> response with an
``edgedistill`` object and an ``X-Answered-By`` header. Every failure on the way is a 4xx in
OpenAI's error shape; a teacher failure is never an error (the student's answer is served, flagged).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from edgedistill.serve import errors
from edgedistill.serve.artifact import Artifact, load_artifact
from edgedistill.serve.confidence import build_label_trie, calibrated, generation_scores, label_variants, temperature_for
from edgedistill.serve.engine import Engine, GenParams, QueueFull, RequestHandle, SeqResult
from edgedistill.serve.errors import APIError
from edgedistill.serve.fallback import CircuitBreaker, TeacherError
from edgedistill.serve.fallback import FallbackTeacher as Teacher
from edgedistill.serve.metrics import Metrics
from edgedistill.serve.settings import Settings
from edgedistill.serve.types import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelList,
    PredictRequest,
    PredictResponse,
    Ready,
    StreamEvent,
)
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from edgedistill.prompts import parse_answer, student_messages, teacher_label_messages

log = logging.getLogger("edgedistill.serve")

ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/predict", "/v1/models", "/health", "/ready", "/metrics"}
OPEN_ROUTES = {"/health"}  # everything else (docs, metrics, readiness, unknown routes) needs the key when one is set
REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, PredictRequest)


@dataclass
class State:
    settings: Settings
    engine: Engine
    model_id: str
    artifact: Artifact | None
    teacher: Teacher | None
    metrics: Metrics
    api_key: str | None
    created: int = field(default_factory=lambda: int(time.time()))
    label_trie: dict | None = None
    avg_latency_s: float = 1.0


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


@dataclass
class Decision:
    threshold: float
    fallback: bool  # the teacher could answer: one is configured, the fallback is on, the answer is not streamed live
    answered_by: str = "student"
    confidence: float | None = None
    fallback_reason: str | None = None
    teacher_error: str | None = None
    teacher_data: dict[str, Any] | None = None

    def info(self) -> dict[str, Any]:
        return {
            "answered_by": self.answered_by,
            "confidence": None if self.confidence is None else round(self.confidence, 6),
            "threshold": self.threshold,
            "fallback": self.fallback,
            "fallback_reason": self.fallback_reason,
            "teacher_error": self.teacher_error,
        }

    def headers(self) -> dict[str, str]:
        h = {"X-Answered-By": self.answered_by}
        if self.confidence is not None:
            h["X-Edgedistill-Confidence"] = f"{self.confidence:.4f}"
        return h


def create_app(
    settings: Settings, engine: Engine | None = None, artifact: Artifact | None = None, teacher: Teacher | None = None
) -> FastAPI:
    """Build the app. Without ``engine``, load ``settings.artifact`` with the backend its format names."""
    api_key = settings.read_api_key()  # a missing key variable fails before minutes of model loading
    teacher_key = settings.read_teacher_key() if teacher is None and settings.teacher_url else None
    if engine is None:
        artifact = artifact or load_artifact(settings.artifact)
        engine = _make_engine(artifact, settings)
    if teacher is None and settings.teacher_url:
        teacher = Teacher(
            settings.teacher_url,
            settings.teacher_model or "",
            api_key=teacher_key,
            timeout_s=settings.teacher_timeout_s,
            breaker=CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s),
        )
    model_id = settings.model_alias or (artifact.name if artifact else "student")
    st = State(settings, engine, model_id, artifact, teacher, Metrics(), api_key)
    task = artifact.task if artifact else None
    if task is not None and task.type == "classification" and task.labels:
        st.label_trie = build_label_trie(
            (i, engine.runner.tokenize(v, special=False, add_bos=False))
            for i, lab in enumerate(task.labels)
            for v in label_variants(lab)
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if st.teacher is not None:
            await st.teacher.close()
        await asyncio.to_thread(st.engine.close)

    app = FastAPI(title="edgedistill serve", version="0.1.0", lifespan=lifespan)
    app.state.st = st
    errors.install(app)
    app.add_middleware(_Auth, key=st.api_key)
    app.add_middleware(_Observe, st=st)  # outermost: 401s are counted too

    @app.get("/health", responses={200: {"model": Health}})
    async def health():
        return {"status": "ok"}

    @app.get("/ready", responses=_responses(Ready, 503))
    async def ready():
        if not st.engine.ready:
            return errors.error_response(503, f"engine not ready: {st.engine.failed or 'starting'}", "not_ready")
        return {"status": "ready", "model": st.model_id, "waiting": st.engine.waiting, "active": st.engine.active}

    @app.get("/metrics", responses=_responses(None))
    async def metrics():
        _gauges(st)
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses=_responses(ModelList))
    async def models():
        art = st.artifact
        meta: dict[str, Any] = {"id": st.model_id, "object": "model", "created": st.created, "owned_by": "edgedistill"}
        meta["edgedistill"] = {
            "format": art.format if art else None,
            "backend": art.backend if art else None,
            "task": art.task.type if art and art.task else None,
            "threshold": st.settings.threshold,
            "teacher": st.teacher is not None,
        }
        return {"object": "list", "data": [meta]}

    @app.post(
        "/v1/chat/completions",
        openapi_extra=_body_schema(ChatCompletionRequest),
        responses=_responses(ChatCompletion, *BODY_ERRORS, stream=True),
    )
    async def chat_completions(request: Request):
        policy = _policy(st, request)
        body = await _read_json(request, st.settings.max_body_bytes)
        req = _validate(ChatCompletionRequest, body)
        _check_common(st, req)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            text = st.engine.runner.render_chat(messages)
        except Exception as e:  # noqa: BLE001 -- any template error (jinja, raise_exception) is the request's fault
            raise APIError(
                400, f"messages: the model's chat template refused them ({e})", code="invalid_value", param="messages"
            ) from None
        prompt = st.engine.runner.tokenize(text, special=True, add_bos=True)
        max_tokens = _max_tokens(st, req.wanted_max_tokens, len(prompt))
        params = _params(st, req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, policy)
        return await _serve(st, request, "chat", req, body, [prompt] * req.n, [params] * req.n, policy)

    @app.post(
        "/v1/completions",
        openapi_extra=_body_schema(CompletionRequest),
        responses=_responses(Completion, *BODY_ERRORS, stream=True),
    )
    async def completions(request: Request):
        policy = _policy(st, request)
        body = await _read_json(request, st.settings.max_body_bytes)
        req = _validate(CompletionRequest, body)
        _check_common(st, req)
        prompts: list[list[int]] = []
        for p in req.prompts():
            toks = st.engine.runner.tokenize(p, special=False, add_bos=True) if isinstance(p, str) else list(p)
            if not toks:
                raise APIError(400, "prompt is empty", code="invalid_value", param="prompt")
            if any(not 0 <= t < st.engine.runner.n_vocab for t in toks):
                raise APIError(
                    400, f"prompt: token ids must be in [0, {st.engine.runner.n_vocab})", code="invalid_value", param="prompt"
                )
            prompts.append(toks)
        if len(prompts) * req.n > st.settings.max_n * 4:
            raise APIError(400, f"too many prompts x n ({len(prompts) * req.n})", code="invalid_value", param="prompt")
        max_tokens = _max_tokens(st, req.wanted_max_tokens, max(len(p) for p in prompts))
        params = _params(st, req, max_tokens, req.logprobs, policy)
        all_prompts = [p for p in prompts for _ in range(req.n)]
        return await _serve(st, request, "completion", req, body, all_prompts, [params] * len(all_prompts), policy)

    @app.post("/v1/predict", openapi_extra=_body_schema(PredictRequest), responses=_responses(PredictResponse, *BODY_ERRORS))
    async def predict(request: Request):
        task = st.artifact.task if st.artifact else None
        if task is None:
            raise APIError(
                404, "this artifact carries no task spec, so it has no /v1/predict; use /v1/chat/completions", code="not_found"
            )
        policy = _policy(st, request)
        body = await _read_json(request, st.settings.max_body_bytes)
        req = _validate(PredictRequest, body)
        policy = Policy(
            policy.threshold if req.threshold is None else req.threshold,
            policy.fallback if req.fallback is None else req.fallback,
        )
        t0 = time.perf_counter()
        ans = await student_predict(st, req.input, request)
        value, err, res = ans.value, ans.error, ans.result
        st.metrics.confidence.labels("/v1/predict").observe(ans.confidence)
        d = _decision(st, policy, ans.confidence)
        d.fallback_reason = err or d.fallback_reason  # an invalid answer goes to the teacher whatever the threshold
        teacher_usage = None
        if d.fallback_reason and d.fallback:
            try:
                data = await st.teacher.post(  # type: ignore[union-attr]
                    "/chat/completions",
                    {
                        "messages": teacher_label_messages(task, req.input),
                        "max_tokens": max(ans.max_tokens, 64),
                        "temperature": 0,
                    },
                )
                ttext = (data["choices"][0].get("message") or {}).get("content")  # a string: Teacher.post checked it
                tvalue, terr = parse_answer(task, ttext)
                if terr and not err:
                    raise TeacherError(f"invalid_answer ({terr})")
                value, err, d.answered_by, teacher_usage = tvalue, terr, "teacher", _valid_usage(data.get("usage"))
                st.metrics.fallbacks.labels(d.fallback_reason, "teacher").inc()
            except TeacherError as e:
                d.teacher_error = str(e)
                st.metrics.fallbacks.labels(d.fallback_reason, "teacher_failed").inc()
        _count(st, d, res.prompt_tokens, res.completion_tokens, teacher_usage)
        _latency(st, t0)
        info = {**d.info(), "student_output": res.text}
        out = {"output": value, "confidence": info["confidence"], "answered_by": d.answered_by, "error": err, "edgedistill": info}
        return JSONResponse(out, headers=d.headers())

    app.openapi = lambda: _openapi(app)
    return app


# ---- building blocks ----------------------------------------------------------------------------


@dataclass
class StudentAnswer:
    value: Any
    error: str | None
    confidence: float
    scores: list[float]  # uncalibrated log-masses, [answer, competitors...] (what fit_temperature takes)
    result: SeqResult
    max_tokens: int


async def student_predict(st: State, text: str, request: Request | None = None) -> StudentAnswer:
    """The student's answer to one task input: task template, greedy, parse, calibrated confidence."""
    task = st.artifact.task  # type: ignore[union-attr]
    runner = st.engine.runner
    prompt = runner.tokenize(runner.render_chat(student_messages(task, text)), special=True, add_bos=True)
    limit = task.label_max_tokens if task.type == "classification" else st.settings.default_max_tokens
    max_tokens = _max_tokens(st, limit, len(prompt), param="input")
    params = GenParams(max_tokens=max_tokens, temperature=0.0, confidence=True, label_trie=st.label_trie)
    res = (await _run(st, request, [prompt], [params]))[0]
    _record_ttft(st, "/v1/predict", res)
    value, err = parse_answer(task, res.text)
    kind = "classification" if task.type == "classification" else "generation"
    if res.label_scorer is not None:
        scores = res.label_scorer.scores(task.labels.index(value) if not err else None)
    else:
        scores = generation_scores(res.token_probs, st.settings.confidence_quantile)
    conf = 0.0 if err else calibrated(scores, temperature_for(_cal(st), kind))
    return StudentAnswer(value, err, conf, scores, res, max_tokens)


def _make_engine(artifact: Artifact, s: Settings) -> Engine:
    from edgedistill.serve.backends import make_runner

    return Engine(make_runner(artifact, s), max_queue=s.max_queue)


def _cal(st: State) -> dict[str, Any]:
    return st.artifact.calibration if st.artifact else {}


# ---- OpenAPI: what the fuzz test (schemathesis) holds every response to --------------------------

BODY_ERRORS = (400, 404, 413, 415, 429, 503)
_ERROR_WHY = {
    400: "invalid request (the message names the field and what to fix)",
    401: "missing or wrong API key (only when the server has one)",
    404: "unknown model, or /v1/predict on an artifact without a task",
    413: "request body over max_body_bytes",
    415: "content type is not application/json",
    429: "queue full; retry after Retry-After seconds",
    503: "engine not ready or failed",
}


def _responses(ok_model, *codes: int, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    if ok_model is None:  # /metrics
        out[200] = {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    else:
        out[200] = {"model": ok_model}
        if stream:
            out[200]["content"] = {"text/event-stream": {"schema": StreamEvent.model_json_schema()}}
    for code in (401, *codes):
        out[code] = {"model": ErrorResponse, "description": _ERROR_WHY[code]}
    return out


def _body_schema(model) -> dict[str, Any]:
    """The request body (read by the route itself) and the headers that set the request's policy."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"content": {"application/json": {"schema": ref}}, "required": True}, "parameters": POLICY_HEADERS}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request bodies the routes read themselves (to control size,
    content type and error messages), with their nested models under components like any other,
    and this server's own limits: the one model it serves, max_tokens and n."""
    if app.openapi_schema is None:
        st: State = app.state.st
        doc = FastAPI.openapi(app)
        comps = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(schema.pop("$defs", {}))
            comps[model.__name__] = schema
            props = schema["properties"]
            if "model" in props:
                props["model"]["enum"] = [st.model_id]
            for name in ("max_tokens", "max_completion_tokens"):
                for option in props.get(name, {}).get("anyOf", []):
                    if option.get("type") == "integer":
                        option["maximum"] = st.settings.max_tokens_limit
            if "n" in props:
                props["n"]["maximum"] = st.settings.max_n
        if st.api_key is not None:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in doc["paths"].items():
                for op in ops.values():
                    if path not in OPEN_ROUTES:
                        op["security"] = [{"bearer": []}]
        app.openapi_schema = doc
    return app.openapi_schema


# ---- request reading ----------------------------------------------------------------------------


class _Auth:
    """ASGI middleware: with an API key set, every route but /health needs ``Authorization: Bearer
    <key>``, checked before the body is read. The SHA-256 digests are compared with
    ``hmac.compare_digest``: constant time, whatever the sent key's length or first wrong byte."""

    def __init__(self, app, key: str | None):
        self.app = app
        self.digest = None if key is None else hashlib.sha256(key.encode()).digest()

    async def __call__(self, scope, receive, send):
        if self.digest is None or scope["type"] != "http" or scope.get("path") in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        sent = hashlib.sha256(token.strip()).digest()
        if hmac.compare_digest(sent, self.digest) and scheme.lower() == b"bearer":
            return await self.app(scope, receive, send)
        msg = "missing or wrong API key: send the header Authorization: Bearer <key>"
        resp = errors.error_response(401, msg, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await resp(scope, receive, send)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:30]} is out of range")
    return x


async def _read_json(request: Request, limit: int) -> Any:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        got = ctype[:80] or "none"
        raise APIError(415, f"content type must be application/json (got {got})", code="unsupported_media_type")
    too_large = f"request body over {limit} bytes; send a shorter prompt (the server's max_body_bytes)"
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, too_large, code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, too_large, code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise APIError(400, "body is not valid JSON (nested too deeply)", code="invalid_json") from None
    except ValueError as e:  # bad syntax, not UTF-8, NaN/Infinity, 1e999, an integer over 4300 digits
        raise APIError(400, f"body is not valid JSON ({getattr(e, 'msg', e)})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "body must be a JSON object", code="invalid_json")
    _check_unicode(body)
    return body


def _check_unicode(body: Any) -> None:
    """A lone surrogate escape (``"\\ud800"``) is valid JSON but no text: the tokenizer cannot encode it."""
    stack = [body]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(
                    400,
                    "body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text; send valid Unicode",
                    code="invalid_json",
                ) from None


def _validate(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise errors.validation_error(err) from None


def _check_common(st: State, req) -> None:
    if req.model != st.model_id:
        raise APIError(
            404,
            f"model {req.model!r} does not exist; this server serves {st.model_id!r} (see /v1/models)",
            code="model_not_found",
            param="model",
        )
    if req.n > st.settings.max_n:
        raise APIError(400, f"n: at most {st.settings.max_n}", code="invalid_value", param="n")
    wanted = req.wanted_max_tokens
    if wanted is not None and wanted > st.settings.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens: at most {st.settings.max_tokens_limit} on this server (got {wanted})",
            code="invalid_value",
            param="max_tokens",
        )


def _max_tokens(st: State, wanted: int | None, prompt_len: int, param: str = "messages") -> int:
    ctx = st.engine.runner.ctx_per_slot
    if wanted is None:
        wanted = min(st.settings.default_max_tokens, ctx - prompt_len)
    if prompt_len + wanted > ctx or wanted < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested {prompt_len + max(wanted, 1)} tokens "
            f"({prompt_len} in the prompt, {max(wanted, 1)} for the completion). Please reduce the prompt or max_tokens.",
            code="context_length_exceeded",
            param=param,
        )
    return wanted


def _params(st: State, req, max_tokens: int, logprobs: int | None, policy: Policy) -> GenParams:
    temperature = 1.0 if req.temperature is None else req.temperature
    return GenParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=list(req.stop or []),
        seed=req.seed,
        logprobs=logprobs,
        confidence=st.settings.confidence,
        stream=req.stream and not _hold(st, policy),
    )


def _hold(st: State, policy: Policy) -> bool:
    """Stream only after the confidence decision: the teacher may still be the one to answer."""
    return (
        st.teacher is not None
        and policy.fallback
        and policy.threshold > 0
        and st.settings.stream_hold_for_fallback
        and st.settings.confidence
    )


# ---- who answers: the request's policy, the decision ---------------------------------------------

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


def _policy(st: State, request: Request) -> Policy:
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


def _decision(st: State, policy: Policy, confidence: float | None, live: bool = False) -> Decision:
    """The decision before any teacher call: the rule's verdict, and whether the teacher may be asked."""
    return Decision(
        threshold=policy.threshold,
        fallback=st.teacher is not None and policy.fallback and not live,
        confidence=confidence,
        fallback_reason=policy.reason(confidence),
    )


def _submit(st: State, prompts, params) -> RequestHandle:
    most = st.engine.max_queue + st.engine.runner.n_slots
    if len(prompts) > most:  # would be refused even by an idle server: not a 429
        raise APIError(
            400, f"n x prompts is {len(prompts)}; this server takes at most {most} at once", code="invalid_value", param="n"
        )
    try:
        return st.engine.submit(prompts, params, asyncio.get_running_loop())
    except QueueFull:
        st.metrics.rejected.labels("queue_full").inc()
        backlog = st.engine.waiting + st.engine.active
        retry = max(1, math.ceil(st.avg_latency_s * backlog / max(st.engine.runner.n_slots, 1)))
        raise APIError(
            429,
            f"server busy: {st.engine.waiting} requests queued; retry after {retry}s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        ) from None


async def _run(st: State, request: Request, prompts, params) -> list[SeqResult]:
    if not st.engine.ready:
        raise APIError(503, f"engine not ready: {st.engine.failed or 'starting'}", code="not_ready")
    handle = _submit(st, prompts, params)
    try:
        return await _unless_disconnected(request, handle.results())
    except RuntimeError as e:
        st.engine.cancel(handle)
        raise APIError(503, f"engine failed: {e}", code="engine_error") from None
    except (asyncio.CancelledError, APIError):  # the client went away: free the slots now
        st.engine.cancel(handle)
        raise


async def _unless_disconnected(request: Request | None, work):
    """Await ``work``, or stop when the client disconnects (499): a client that gave up on a long
    answer must not keep its slot until the answer is done. (Streams get this from Starlette.)"""
    task = asyncio.ensure_future(work)
    if request is None:
        return await task

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: only disconnect comes
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise APIError(499, "client closed the request", code="client_closed_request")


def _record_ttft(st: State, route: str, res: SeqResult) -> None:
    if res.first_token_s is not None:
        st.metrics.ttft.labels(route).observe(res.first_token_s)


def _latency(st: State, t0: float) -> None:
    dt = time.perf_counter() - t0
    st.avg_latency_s = 0.9 * st.avg_latency_s + 0.1 * dt


def _count(st: State, d: Decision, prompt_tokens: int, completion_tokens: int, teacher_usage: dict[str, Any] | None) -> None:
    """Tokens the student processed; tokens of the answer served, by who answered (a teacher's from
    the usage it reported, none when it reported none); the answer."""
    m = st.metrics
    m.student_tokens.labels("prompt").inc(prompt_tokens)
    m.student_tokens.labels("completion").inc(completion_tokens)
    if d.answered_by == "teacher":
        if teacher_usage is not None:
            m.tokens.labels("prompt", "teacher").inc(teacher_usage["prompt_tokens"])
            m.tokens.labels("completion", "teacher").inc(teacher_usage["completion_tokens"])
    else:
        m.tokens.labels("prompt", "student").inc(prompt_tokens)
        m.tokens.labels("completion", "student").inc(completion_tokens)
    m.answered.labels(d.answered_by).inc()


def _valid_usage(usage: Any) -> dict[str, Any] | None:
    """A teacher's usage we can pass on and count (its three counts non-negative integers), else nothing."""
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return usage if isinstance(usage, dict) and all(type(usage.get(k)) is int and usage[k] >= 0 for k in keys) else None


def _gauges(st: State) -> None:
    st.metrics.queue_depth.set(st.engine.waiting)
    st.metrics.active.set(st.engine.active)
    st.metrics.breaker_open.set(1 if st.teacher is not None and st.teacher.breaker.is_open else 0)


def _confidence(st: State, results: list[SeqResult]) -> float | None:
    if not st.settings.confidence:
        return None
    t = temperature_for(_cal(st), "generation")
    return min(calibrated(generation_scores(r.token_probs, st.settings.confidence_quantile), t) for r in results)


async def _decide(st: State, kind: str, body: dict, conf: float | None, policy: Policy) -> Decision:
    d = _decision(st, policy, conf)
    if not (d.fallback_reason and d.fallback):
        return d
    route = "/chat/completions" if kind == "chat" else "/completions"
    try:
        d.teacher_data = await st.teacher.post(route, body)  # type: ignore[union-attr]
        d.answered_by = "teacher"
        st.metrics.fallbacks.labels(d.fallback_reason, "teacher").inc()
    except TeacherError as e:
        d.teacher_error = str(e)
        st.metrics.fallbacks.labels(d.fallback_reason, "teacher_failed").inc()
    return d


async def _serve(st: State, request: Request, kind: str, req, body: dict, prompts, params, policy: Policy) -> Response:
    route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    t0 = time.perf_counter()
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    if req.stream and params[0].stream:  # live streaming: the student answers, confidence comes last
        if not st.engine.ready:
            raise APIError(503, f"engine not ready: {st.engine.failed or 'starting'}", code="not_ready")
        handle = _submit(st, prompts, params)
        gen = _live_stream(st, request, kind, req, rid, handle, route, t0, policy)
        return StreamingResponse(
            gen, media_type="text/event-stream", headers={"X-Answered-By": "student", "Cache-Control": "no-cache"}
        )
    results = await _run(st, request, prompts, params)
    for r in results:
        _record_ttft(st, route, r)
    conf = _confidence(st, results)
    if conf is not None:
        st.metrics.confidence.labels(route).observe(conf)
    d = await _decide(st, kind, body, conf, policy)
    usage = _usage(results, req.n)
    payload = _teacher_payload(st, kind, rid, d) if d.answered_by == "teacher" else _student_payload(st, kind, req, rid, results)
    _count(st, d, usage["prompt_tokens"], usage["completion_tokens"], payload["usage"] if d.answered_by == "teacher" else None)
    _latency(st, t0)
    payload["edgedistill"] = d.info()
    if not req.stream:
        return JSONResponse(payload, headers=d.headers())
    return StreamingResponse(
        _replay_stream(kind, req, payload), media_type="text/event-stream", headers={**d.headers(), "Cache-Control": "no-cache"}
    )


def _usage(results: list[SeqResult], n: int) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results[:: max(n, 1)])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _student_payload(st: State, kind: str, req, rid: str, results: list[SeqResult]) -> dict[str, Any]:
    choices = []
    for i, r in enumerate(results):
        if kind == "chat":
            lp = {"content": r.logprobs, "refusal": None} if req.logprobs else None
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": lp,
                    "finish_reason": r.finish_reason,
                }
            )
        else:
            text = r.text
            if req.echo:
                p = req.prompts()[i // req.n]
                text = (p if isinstance(p, str) else _detok(st, p)) + text
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": _completion_logprobs(r) if req.logprobs is not None else None,
                    "finish_reason": r.finish_reason,
                }
            )
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": st.model_id,
        "choices": choices,
        "usage": _usage(results, req.n),
        "system_fingerprint": None,
    }


def _detok(st: State, tokens: list[int]) -> str:
    return b"".join(st.engine.runner.pieces[t] for t in tokens).decode("utf-8", "replace")


def _completion_logprobs(r: SeqResult) -> dict[str, Any]:
    tokens, offsets, off = [], [], 0
    for e in r.logprobs:
        tokens.append(e["token"])
        offsets.append(off)
        off += len(e["token"])
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in r.logprobs],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in r.logprobs],
        "text_offset": offsets,
    }


def _teacher_payload(st: State, kind: str, rid: str, d: Decision) -> dict[str, Any]:
    """The teacher's answer in our response shape: its choices' text (checked by Teacher.post) and
    nothing of it we cannot vouch for (a teacher's odd usage or logprobs must not break a client)."""
    t = d.teacher_data or {}
    choices = []
    for i, ch in enumerate(t.get("choices", [])):
        finish = ch.get("finish_reason") if isinstance(ch.get("finish_reason"), str) else "stop"
        lp = ch.get("logprobs") if isinstance(ch.get("logprobs"), dict) else None
        if kind == "chat":
            message = {"role": "assistant", "content": ch["message"]["content"]}
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
        else:
            choices.append({"index": i, "text": ch["text"], "logprobs": lp, "finish_reason": finish})
    usage = _valid_usage(t.get("usage"))
    fingerprint = t.get("system_fingerprint")
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": str(t.get("model") or (st.teacher.model if st.teacher else "teacher")),
        "choices": choices,
        "usage": usage,
        "system_fingerprint": fingerprint if isinstance(fingerprint, str) else None,
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _chunk(
    kind: str, rid: str, model: str, created: int, index: int, text: str | None, finish: str | None, logprobs=None, first=False
) -> dict:
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        lp = {"content": logprobs, "refusal": None} if logprobs is not None else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    lp = None
    if logprobs is not None:
        lp = {
            "tokens": [e["token"] for e in logprobs],
            "token_logprobs": [e["logprob"] for e in logprobs],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in logprobs],
            "text_offset": [],
        }
    choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


async def _replay_stream(kind: str, req, payload: dict[str, Any]) -> AsyncIterator[bytes]:
    """A decided answer (student or teacher) as SSE chunks: role, content, finish, usage, [DONE]."""
    created, model, rid = payload["created"], payload["model"], payload["id"]
    for ch in payload["choices"]:
        i = ch.get("index", 0)
        text = (ch.get("message") or {}).get("content") if kind == "chat" else ch.get("text")
        if kind == "chat":
            yield _sse(_chunk(kind, rid, model, created, i, "", None, first=True))
        lp = None
        if ch.get("logprobs"):
            lp = ch["logprobs"].get("content") if kind == "chat" else None
        yield _sse(_chunk(kind, rid, model, created, i, text or "", None, logprobs=lp))
        yield _sse(_chunk(kind, rid, model, created, i, None if kind == "chat" else "", ch.get("finish_reason") or "stop"))
    final = {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
    }
    if req.include_usage:
        final["usage"] = payload.get("usage")
    final["edgedistill"] = payload["edgedistill"]
    yield _sse(final)
    yield b"data: [DONE]\n\n"


async def _live_stream(
    st: State, request: Request, kind: str, req, rid: str, handle: RequestHandle, route: str, t0: float, policy: Policy
) -> AsyncIterator[bytes]:
    created, model = int(time.time()), st.model_id
    results: list[SeqResult] = []
    started: set[int] = set()
    first_token_at: float | None = None
    try:
        remaining = handle.n
        while remaining:
            kind_ev, index, payload = await handle.queue.get()
            if kind_ev == "error":
                yield _sse(errors.error_body(503, f"engine failed: {payload}", "engine_error"))
                return
            if kind == "chat" and index not in started:
                started.add(index)
                yield _sse(_chunk(kind, rid, model, created, index, "", None, first=True))
            if kind_ev == "delta":
                if first_token_at is None:
                    first_token_at = time.perf_counter() - t0
                    st.metrics.ttft.labels(route).observe(first_token_at)
                text, lps = payload
                yield _sse(_chunk(kind, rid, model, created, index, text, None, logprobs=lps if _wants_lp(req) else None))
            elif kind_ev == "done":
                remaining -= 1
                results.append(payload)
                yield _sse(_chunk(kind, rid, model, created, index, None if kind == "chat" else "", payload.finish_reason))
        conf = _confidence(st, results)
        if conf is not None:
            st.metrics.confidence.labels(route).observe(conf)
        d = _decision(st, policy, conf, live=True)  # streamed as decoded: the teacher cannot answer any more
        final = {
            "id": rid,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created,
            "model": model,
            "choices": [],
        }
        results.sort(key=lambda r: r.index)
        if req.include_usage:
            final["usage"] = _usage(results, req.n)
        final["edgedistill"] = d.info()
        _count(st, d, sum(r.prompt_tokens for r in results[:: max(req.n, 1)]), sum(r.completion_tokens for r in results), None)
        _latency(st, t0)
        yield _sse(final)
        yield b"data: [DONE]\n\n"
    finally:
        if len(results) < handle.n:  # the client went away mid-stream: free its slot now
            st.engine.cancel(handle)


def _wants_lp(req) -> bool:
    return bool(req.logprobs) if isinstance(req, ChatCompletionRequest) else req.logprobs is not None


class _Observe:
    """ASGI middleware: requests by route and status, latency. Pure ASGI so streams are untouched."""

    def __init__(self, app, st: State):
        self.app = app
        self.st = st

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        status = {"code": 500}
        t0 = time.perf_counter()

        async def _send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            m = self.st.metrics
            m.requests.labels(route, str(status["code"])).inc()
            if route.startswith("/v1/"):
                m.latency.labels(route).observe(time.perf_counter() - t0)
