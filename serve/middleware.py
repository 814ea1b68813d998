"""The app's ASGI middleware: the API key check (``Auth``) and the per-route request counting and
latency (``Observe``). Pure ASGI, so streams pass untouched."""

from __future__ import annotations

import hashlib
import hmac
import time

from edgedistill.serve import errors
from edgedistill.serve.metrics import Metrics

ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/predict", "/v1/models", "/health", "/ready", "/metrics"}
OPEN_ROUTES = {"/health"}  # everything else (docs, metrics, readiness, unknown routes) needs the key when one is set


class Auth:
    """With an API key set, every route but /health needs ``Authorization: Bearer <key>``, checked
    before the body is read. The SHA-256 digests are compared with ``hmac.compare_digest``:
    constant time, whatever the sent key's length or first wrong byte."""

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


class Observe:
    """Requests by route and status, latency of the /v1 routes."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

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
            m = self.metrics
            m.requests.labels(route, str(status["code"])).inc()
            if route.startswith("/v1/"):
                m.latency.labels(route).observe(time.perf_counter() - t0)
