"""Reading and checking a request before the engine sees it: the body (content type, size, JSON,
Unicode), the pydantic model, and the checks every generation route shares (model id, n,
max_tokens, the context window). Every failure is an ``APIError`` (a 4xx in OpenAI's shape)."""

from __future__ import annotations

import json
import math
from typing import Any

from edgedistill.runtimes.constrain import Constraint
from edgedistill.serve import errors
from edgedistill.serve.engine import GenParams
from edgedistill.serve.errors import APIError
from edgedistill.serve.state import State
from fastapi import Request
from pydantic import ValidationError


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:30]} is out of range")
    return x


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object: application/json, at most ``limit`` bytes, finite numbers, text."""
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
    check_unicode(body)
    return body


def check_unicode(body: Any) -> None:
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


def validate(model, body: dict):
    """``body`` as the request ``model``; a pydantic error is a 400 naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise errors.validation_error(err) from None


def check_common(st: State, req) -> None:
    """What chat and completions share: the served model id, n and max_tokens within the server's limits."""
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


def max_tokens(st: State, wanted: int | None, prompt_len: int, param: str = "messages") -> int:
    """The completion's token budget: the one asked for (else the default), within one slot's context."""
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


def gen_params(
    st: State, req, max_tokens: int, logprobs: int | None, stream: bool, constraint: Constraint | None = None
) -> GenParams:
    """The engine's parameters for a chat/completions request (``stream``: tokens go out as decoded;
    ``constraint``: the grammar of a structured answer)."""
    temperature = 1.0 if req.temperature is None else req.temperature
    bias = req.logit_bias or None
    if bias is not None and (bad := [t for t in bias if t >= st.engine.runner.n_vocab]):
        raise APIError(
            400,
            f"logit_bias: token id {bad[0]} is not in this model's vocabulary (ids 0 to {st.engine.runner.n_vocab - 1})",
            code="invalid_value",
            param="logit_bias",
        )
    return GenParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=list(req.stop or []),
        seed=req.seed,
        logprobs=logprobs,
        confidence=st.settings.confidence,
        stream=stream,
        constraint=constraint,
        logit_bias=bias,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
    )
