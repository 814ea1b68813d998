"""One client for OpenAI-compatible HTTP APIs (OpenAI, vLLM, llama.cpp server, an edgedistill server).

Distill's API teacher and serve's teacher fallback use it; each maps the typed :class:`OpenAIError`
(a machine-readable ``reason`` such as ``"timeout"``, ``"unreachable"``, ``"http_429"``, the status and
the server's message) to its own messages. It does:

- a base URL and an optional API key, sent as a bearer token, never in a repr and scrubbed from every
  error text;
- httpx timeouts, or the pool and timeouts of an ``httpx.AsyncClient`` it is handed;
- retries (``max_retries``, none by default) of timeouts, transport errors and the statuses
  :func:`is_retryable_status` names, with exponential backoff and jitter; Retry-After (seconds or an
  HTTP date) honoured, capped at ``retry_max_delay_s`` like the backoff;
- the token usage of the answers received (:class:`TokenUsage`);
- streaming: SSE ``data:`` lines parsed into JSON chunks until ``[DONE]``, each stamped by ``clock``
  when it was received.

Torch-free: only httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any, Self

import httpx

RETRY_STATUSES = frozenset({408, 409, 425, 429})  # and every 5xx
DEFAULT_TIMEOUT_S = 60.0


def is_retryable_status(status: int) -> bool:
    """A status worth asking again for: 408/409/425/429 and every 5xx."""
    return status in RETRY_STATUSES or status >= 500


def one_line(text: Any, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header in seconds (a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, retry_after: float | None, base_s: float, max_s: float) -> float:
    """Seconds to wait before retry ``attempt + 1``: Retry-After when the server gave one, else
    ``base_s * 2**attempt`` with up to 50 % jitter; either capped at ``max_s``."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), max_s)
    delay = base_s * (2**attempt)
    delay *= 1.0 + random.random() * 0.5  # jitter: keep many workers from retrying in lockstep
    return min(delay, max_s)


class OpenAIError(Exception):
    """A request that gave no usable answer.

    ``reason``: ``"timeout"``, ``"unreachable"`` (any other transport error), ``"http_<status>"`` (a
    status outside ``ok_statuses``), ``"bad_json"`` (an ok status with a body that is not JSON),
    ``"bad_response"`` (a stream chunk that is not a JSON object), ``"stream_error"`` (a stream chunk
    carrying ``error``). ``cause``: the class name of the httpx / json exception behind it; ``detail``:
    its text. ``message``: the server's message (or body), one line. All texts are scrubbed of the key.
    """

    def __init__(
        self,
        reason: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        message: str = "",
        cause: str = "",
        detail: str = "",
        headers: httpx.Headers | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.retryable = retryable
        self.status = status
        self.message = message
        self.cause = cause
        self.detail = detail
        self.headers = headers
        self.retry_after = retry_after
        self.attempts = 1


@dataclass
class TokenUsage:
    """What the answers received so far said they used; ``retries``: requests asked again."""

    responses: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0

    def add(self, body: Any) -> None:
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return
        for name in ("prompt_tokens", "completion_tokens"):
            v = usage.get(name)
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(self, name, getattr(self, name) + v)


@dataclass
class StreamChunk:
    data: dict[str, Any]
    received_at: float  # ``clock()`` right after the chunk was read and parsed


class EventStream:
    """An open streamed answer: ``headers``, then its chunks (``async for``). A server that ignored
    ``stream`` and sent one JSON body gives that body as its only chunk."""

    def __init__(self, client: OpenAIClient, resp: httpx.Response):
        self._client = client
        self._resp = resp
        self.status_code = resp.status_code
        self.headers = resp.headers

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        c, resp = self._client, self._resp
        try:
            if resp.headers.get("content-type", "").startswith("application/json"):
                yield c._chunk(json.loads(await resp.aread()), sse=False)
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield c._chunk(json.loads(data), sse=True)
        except httpx.HTTPError as e:
            raise c._transport_error(e) from e
        except (ValueError, RecursionError) as e:  # not JSON, or not UTF-8
            raise OpenAIError("bad_json", cause=type(e).__name__, detail=c.scrub(one_line(e))) from e


class OpenAIClient:
    """Requests to ``base_url`` (e.g. ``http://host:8000/v1``) of an OpenAI-compatible API.

    ``http``: an ``httpx.AsyncClient`` to use (its pool and timeouts; not closed here); otherwise one
    is made with ``timeout_s``, ``max_connections``, ``trust_env`` and ``transport``. ``ok_statuses``:
    the statuses that count as an answer. ``on_retry(error, delay_s)`` is called before each wait.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float | None = None,
        max_retries: int = 0,
        retry_base_delay_s: float = 0.5,
        retry_max_delay_s: float = 30.0,
        max_connections: int | None = None,
        headers: dict[str, str] | None = None,
        ok_statuses: Collection[int] = range(200, 300),
        trust_env: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        http: httpx.AsyncClient | None = None,
        on_retry: Callable[[OpenAIError, float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key or None
        self.max_retries = max(0, int(max_retries))
        self.retry_base_delay_s = float(retry_base_delay_s)
        self.retry_max_delay_s = float(retry_max_delay_s)
        self.ok_statuses = ok_statuses
        self.on_retry = on_retry
        self.clock = clock
        self.usage = TokenUsage()
        self._headers = {**(headers or {})}
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"
        self._owns_http = http is None
        if http is None:
            limits = (
                httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
                if max_connections
                else httpx.Limits()
            )
            http = httpx.AsyncClient(
                timeout=httpx.Timeout(DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s),
                limits=limits,
                trust_env=trust_env,
                transport=transport,
            )
        self.http = http

    def __repr__(self) -> str:  # never the key
        return f"OpenAIClient(base_url={self.base_url!r}, api_key={'***' if self._api_key else None})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    # --- requests ----------------------------------------------------------------------------
    async def post_json(self, path: str, body: Any, *, headers: dict[str, str] | None = None, timeout_s: float | None = None) -> Any:
        """POST ``body`` as JSON to ``base_url + path``; the parsed answer, retried as configured."""
        return await self._with_retries("POST", path, body, headers, timeout_s)

    async def get_json(self, path: str, *, headers: dict[str, str] | None = None, timeout_s: float | None = None) -> Any:
        return await self._with_retries("GET", path, None, headers, timeout_s)

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, body: Any, *, headers: dict[str, str] | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[EventStream]:
        """POST a streamed request (not retried: a stream's timing is what callers measure)."""
        kwargs = self._kwargs(headers, timeout_s)
        try:
            async with self.http.stream("POST", self.base_url + path, json=body, **kwargs) as resp:
                if resp.status_code not in self.ok_statuses:
                    await resp.aread()
                    raise self._status_error(resp)
                self.usage.responses += 1
                yield EventStream(self, resp)
        except httpx.HTTPError as e:
            raise self._transport_error(e) from e

    # --- internals -----------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _kwargs(self, headers: dict[str, str] | None, timeout_s: float | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": {**self._headers, **(headers or {})}}
        if timeout_s is not None:
            kwargs["timeout"] = timeout_s
        return kwargs

    async def _with_retries(self, method: str, path: str, body: Any, headers: dict[str, str] | None, timeout_s: float | None) -> Any:
        attempt = 0
        while True:
            try:
                return await self._once(method, path, body, headers, timeout_s)
            except OpenAIError as e:
                e.attempts = attempt + 1
                if not e.retryable or attempt >= self.max_retries:
                    raise
                delay = backoff_delay(attempt, e.retry_after, self.retry_base_delay_s, self.retry_max_delay_s)
                self.usage.retries += 1
                if self.on_retry is not None:
                    self.on_retry(e, delay)
                await asyncio.sleep(delay)
                attempt += 1

    async def _once(self, method: str, path: str, body: Any, headers: dict[str, str] | None, timeout_s: float | None) -> Any:
        url = self.base_url + path
        kwargs = self._kwargs(headers, timeout_s)
        try:
            resp = await (self.http.post(url, json=body, **kwargs) if method == "POST" else self.http.get(url, **kwargs))
        except httpx.HTTPError as e:
            raise self._transport_error(e) from e
        if resp.status_code not in self.ok_statuses:
            raise self._status_error(resp)
        try:
            data = resp.json()
        except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
            raise OpenAIError(
                "bad_json",
                status=resp.status_code,
                message=self.scrub(one_line(resp.text)),
                cause=type(e).__name__,
                detail=self.scrub(one_line(e)),
                headers=resp.headers,
            ) from e
        self.usage.responses += 1
        self.usage.add(data)
        return data

    def _chunk(self, data: Any, sse: bool) -> StreamChunk:
        if not isinstance(data, dict):
            raise OpenAIError("bad_response", detail=f"a chunk that is not a JSON object: {type(data).__name__}")
        if sse and "error" in data:
            raise OpenAIError("stream_error", message=self.scrub(one_line(data["error"])))
        self.usage.add(data)
        return StreamChunk(data, self.clock())

    def _transport_error(self, e: httpx.HTTPError) -> OpenAIError:
        if isinstance(e, httpx.TimeoutException):
            reason, retryable = "timeout", True
        else:
            reason, retryable = "unreachable", isinstance(e, httpx.TransportError)
        return OpenAIError(reason, retryable=retryable, cause=type(e).__name__, detail=self.scrub(str(e)))

    def _status_error(self, resp: httpx.Response) -> OpenAIError:
        status = resp.status_code
        return OpenAIError(
            f"http_{status}",
            retryable=is_retryable_status(status),
            status=status,
            message=self._server_message(resp),
            headers=resp.headers,
            retry_after=retry_after_s(resp.headers.get("retry-after")),
        )

    def _server_message(self, resp: httpx.Response) -> str:
        """The error message a server put in its body (OpenAI schema or plain text), one line."""
        msg: Any = None
        try:
            body = resp.json()
        except (ValueError, RecursionError):
            body = None
        if isinstance(body, dict):
            err = body.get("error", body.get("detail", body.get("message")))
            if isinstance(err, dict):
                msg = err.get("message") or err.get("msg") or err
            else:
                msg = err
        if msg is None:
            msg = resp.text
        return one_line(self.scrub(str(msg or "no message")))
