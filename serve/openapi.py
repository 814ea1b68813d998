"""The OpenAPI document: what the fuzz test (schemathesis) holds every response to.

FastAPI's document, plus the request bodies the routes read themselves (to control size, content
type and error messages) with their nested models under components like any other, the policy
headers, the error responses of each route, and this server's own limits: the one model it
serves, max_tokens and n; with an API key, the bearer security scheme."""

from __future__ import annotations

from typing import Any

from edgedistill.serve.cascade import POLICY_HEADERS
from edgedistill.serve.middleware import OPEN_ROUTES
from edgedistill.serve.state import State
from edgedistill.serve.types import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    PredictRequest,
    StreamEvent,
)
from fastapi import FastAPI

REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, PredictRequest)
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


def responses(ok_model, *codes: int, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """A route's documented responses: ``ok_model`` (None: Prometheus text), 401 and ``codes``."""
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


def body_schema(model) -> dict[str, Any]:
    """The request body (read by the route itself) and the headers that set the request's policy."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"content": {"application/json": {"schema": ref}}, "required": True}, "parameters": POLICY_HEADERS}


def openapi(app: FastAPI) -> dict[str, Any]:
    """The app's document, built once (``app.openapi`` is this)."""
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
