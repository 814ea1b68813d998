"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right 4xx.

Every way a request can be wrong is a 4xx here (bad JSON, wrong types, wrong content type, too
large, unknown model, prompt too long ...). The last-resort handler turns a bug into a 500 in the
same shape (logged with its traceback) instead of a dropped connection.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("edgedistill.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(status: int, message: str, code: str | None = None, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def _is_member(part: str) -> bool:
    """pydantic names the union member in an error's loc ("str", "list[int]"); a field name is not one."""
    if part in ("str", "int", "float", "bool", "constrained-str") or part.startswith(("list[", "dict[", "function-", "literal[")):
        return True
    return part[:1].isupper()  # a model class (NamedToolChoice): the API's field names are lower case


def validation_error(err: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field (``messages.0.role``) and what it should be."""
    errors = [{**e, "loc": [str(x) for x in e.get("loc", ()) if x != "body"]} for e in err.errors()]
    e = errors[0]
    cut = next((i for i, part in enumerate(e["loc"]) if _is_member(part)), None)
    msg = None
    if cut is not None:  # a union: one error per member; the member the value went into is the one meant
        prefix = e["loc"][:cut]
        same = [x for x in errors if x["loc"][:cut] == prefix and len(x["loc"]) > cut and _is_member(x["loc"][cut])]
        members = list(dict.fromkeys(x["loc"][cut] for x in same))
        deeper = [x for x in same if len(x["loc"]) > cut + 1]
        if len({x["loc"][cut] for x in deeper}) == 1:
            e = deeper[0]
        elif len(members) > 1:
            msg = f"wrong type; expected {' or '.join(members)}"
        errors = [e] + [x for x in errors if x not in same]
    param = ".".join(x for x in e["loc"] if not _is_member(x)) or None
    if msg is None:
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (a typo?); remove it"
    more = f" (+{len(errors) - 1} more problems)" if len(errors) > 1 else ""
    text = f"{param}: {msg}{more}" if param else f"{msg}{more}"
    return APIError(400, text, code="invalid_value" if e.get("type") != "missing" else "missing_required_parameter", param=param)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        e = validation_error(exc)
        return error_response(e.status, e.message, e.code, e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            msg = "no such endpoint; see /v1/models, /v1/chat/completions, /v1/completions, /v1/predict"
        return error_response(exc.status_code, msg, code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _last_resort(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); this is a bug, please report it", "internal_error")
