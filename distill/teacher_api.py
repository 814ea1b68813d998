"""The teacher behind an OpenAI-compatible ``/chat/completions`` API (OpenAI, vLLM, llama.cpp's
server, ...): bounded concurrency, retries with backoff (the shared ``edgedistill.openai_client``),
cost counting, one-line errors that say what to fix. The API key is read from the environment at
construction and never written anywhere.

Structured answers: a request for an extraction or tool_call task's answer is sent with
``response_format: {"type": "json_schema", ...}`` (``Task.response_format``: the task's schema,
strict where OpenAI's strict mode accepts it). An API that refuses it (HTTP 400/422 to the request,
which is then answered without it) is told once in the log and prompted without it from then on;
the refusal is remembered in the cache, so a rerun keys its requests without it at once and finds
the answers it already has. Every answer is cached under what was really sent. Classification is
prompted as before (the labels are in the prompt; an API has no label constraint).

Soft labels: a request with ``top_logprobs`` (``ChatRequest.top_logprobs``, set when labelling
with ``training.logit_kd.source: api_logprobs``) is sent with ``logprobs: true, top_logprobs: k``;
the key includes k, and the answer's ``logprobs.content`` is cached with it (``distill.soft_labels``
recovers the label distribution from it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from edgedistill.distill.cache import ResponseCache, cache_key
from edgedistill.distill.teacher import ANSWERED_WITH, CACHE_VERSION, ChatRequest, Teacher, gather_fail_fast, one_line

from edgedistill.errors import UserError
from edgedistill.openai_client import OpenAIClient, OpenAIError
from edgedistill.spec import Prices

# --- OpenAI-compatible API -------------------------------------------------------------------
_MALFORMED_FIX = "check that teacher.base_url points at an OpenAI-compatible API (it usually ends in /v1)"
_REFUSED_STATUSES = (400, 422)
log = logging.getLogger(__name__)



class OpenAITeacher(Teacher):
    """A model behind an OpenAI-compatible ``POST {base_url}/chat/completions``.

    Requests go through :class:`~edgedistill.openai_client.OpenAIClient`: at most ``max_concurrency``
    in flight; 408/409/425/429, 5xx, timeouts and connection errors are retried up to ``max_retries`` times with exponential backoff and jitter
    (``retry_base_delay_s * 2**attempt``, capped at ``retry_max_delay_s``), honouring Retry-After
    (capped the same way). Any other failure is a one-line :class:`UserError`.
    """

    kind = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        prices: Prices | None = None,
        cache: ResponseCache | None = None,
        *,
        retry_base_delay_s: float = 0.5,
        retry_max_delay_s: float = 30.0,
    ):
        if cache is None:
            raise ValueError("OpenAITeacher needs a ResponseCache")
        super().__init__(model, cache)
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.prices = prices or Prices()
        self.retry_base_delay_s = float(retry_base_delay_s)
        self.retry_max_delay_s = float(retry_max_delay_s)
        self._refuses_format: bool | None = None  # None: not known yet (the cache may remember)
        self._asks_logprobs = False  # some request asked for top_logprobs (for the error message)
        self._api_key: str | None = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise UserError(
                    f"teacher.api_key_env is {api_key_env} but that environment variable is not set; export {api_key_env}=<your API key>"
                )
            self._api_key = key

    def __repr__(self) -> str:  # never the key
        return f"OpenAITeacher(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def _identity(self) -> dict[str, Any]:
        return {"kind": "openai", "base_url": self.base_url, "model": self.model}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "openai",
            "model": self.model,
            "base_url": self.base_url,
            "api_key_env": self.api_key_env,
            "max_concurrency": self.max_concurrency,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "prices": self.prices.model_dump(),
        }

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.prices.input_per_1m / 1e6 + completion_tokens * self.prices.output_per_1m / 1e6

    def answer_format(self, req: ChatRequest) -> dict[str, Any]:
        """``{"response_format": ...}`` when the request's answer has a JSON schema and this API has
        not refused response_format; nothing otherwise (prompting only)."""
        rf = req.constrain_to.response_format() if req.constrain_to is not None else None
        if rf is None or self.refuses_response_format():
            return {}
        return {"response_format": rf}

    def refuses_response_format(self) -> bool:
        if self._refuses_format is None:
            self._refuses_format = self.cache.get(self._refusal_key()) is not None
            if self._refuses_format:
                log.warning("teacher at %s refused response_format in an earlier run: prompting for the schema instead", self.base_url)
        return self._refuses_format

    def _refusal_key(self) -> str:
        return cache_key({"v": CACHE_VERSION, **self._identity(), "refuses": "response_format"})

    def _refused(self, e: OpenAIError) -> None:
        """Remember (here and in the cache) that this API refuses response_format; say so once."""
        if self._refuses_format:
            return
        self._refuses_format = True
        log.warning(
            "teacher at %s refused response_format (HTTP %s: %s): prompting for the schema instead",
            self.base_url, e.status, one_line(e.message, 120),
        )  # fmt: skip
        self.cache.put(self._refusal_key(), {"v": CACHE_VERSION, **self._identity(), "refuses": "response_format"}, {"status": e.status})

    # --- internals ---------------------------------------------------------------------------
    def _body(self, req: ChatRequest, answer_format: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": req.messages,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if req.stop:
            body["stop"] = list(req.stop)
        if req.top_logprobs is not None:
            self._asks_logprobs = True
            body["logprobs"] = True
            body["top_logprobs"] = req.top_logprobs
        body.update(self.answer_format(req) if answer_format is None else answer_format)
        return body

    def _parse(self, body: Any) -> dict[str, Any]:
        bad = f"teacher at {self.base_url} returned a malformed response"
        try:
            choice = body["choices"][0]
            content = choice["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise UserError(f"{bad} (no choices[0].message); {_MALFORMED_FIX}") from None
        if content is not None and not isinstance(content, str):
            raise UserError(f"{bad} (message.content is not text); {_MALFORMED_FIX}")
        usage = body.get("usage") if isinstance(body, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        pt = int(usage.get("prompt_tokens") or 0)
        ct = int(usage.get("completion_tokens") or 0)
        out = {
            "text": content or "",
            "prompt_tokens": pt,
            "completion_tokens": ct,
            "finish_reason": str(choice.get("finish_reason") or "stop"),
            "cost_usd": self.cost(pt, ct),
            "model": body.get("model", self.model),
        }
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and isinstance(lp.get("content"), list):
            out["logprobs"] = lp["content"]  # cached with the answer: the soft labels are recovered from it
        return out

    def _fail(self, status: int, msg: str) -> UserError:
        """A status not worth retrying (a 4xx but 408/409/425/429): what the user must change."""
        where = f"teacher at {self.base_url}"
        if status in (401, 403):
            if self.api_key_env:
                return UserError(f"{where} rejected the API key (HTTP {status}: {msg}); check ${self.api_key_env}")
            return UserError(
                f"{where} needs an API key (HTTP {status}: {msg}); set teacher.api_key_env to the variable holding it"
            )
        if status == 404:
            return UserError(
                f"{where} answered 404 for model {self.model!r} ({msg}); check teacher.model and that teacher.base_url ends in /v1"
            )
        return UserError(
            f"{where} rejected the request (HTTP {status}: {msg}); check the teacher settings (model, max_tokens"
            + (", and that the API returns logprobs for training.logit_kd.source: api_logprobs)" if self._asks_logprobs else ")")
        )

    def _user_error(self, e: OpenAIError) -> UserError:
        """The one-line message for a request the client gave up on (after ``e.attempts`` tries)."""
        where = f"teacher at {self.base_url}"
        if e.reason == "bad_json":
            snippet = one_line(e.message, 60)
            return UserError(f"{where} returned a malformed response (not JSON: {snippet!r}); {_MALFORMED_FIX}")
        if e.reason == "timeout" and e.cause == "ConnectTimeout":
            # no connection within the timeout: the server is not reachable (a stall of this
            # machine ends the same way), which is not the same as a slow answer
            failure = f"{where} is unreachable (no connection within {self.timeout_s:g}s)"
            fix = "start it or fix teacher.base_url, or raise teacher.timeout_s"
        elif e.reason == "timeout":
            failure = f"{where} did not answer within {self.timeout_s:g}s"
            fix = "raise teacher.timeout_s or lower teacher.max_concurrency"
        elif e.reason == "unreachable":
            reason = "connection refused" if e.cause == "ConnectError" else e.cause
            text = e.detail.lower()
            if e.cause == "ConnectError" and ("name" in text and ("resolution" in text or "known" in text)):
                reason = "unknown host"
            failure = f"{where} is unreachable ({reason})"
            fix = "start it or fix teacher.base_url"
        elif e.status is not None and not e.retryable:
            return self._fail(e.status, e.message)
        elif e.status == 429:
            failure = f"{where} is still rate limiting (HTTP 429: {e.message})"
            fix = "lower teacher.max_concurrency or wait and run again (answers so far are cached)"
        else:
            failure = f"{where} keeps failing (HTTP {e.status}: {e.message})"
            fix = "check the server, then run again (answers so far are cached)"
        tries = "1 attempt" if e.attempts == 1 else f"{e.attempts} attempts"
        return UserError(f"{failure} after {tries}; {fix}")

    def _count_retry(self, error: OpenAIError, delay_s: float) -> None:
        self.usage.retries += 1

    async def _post(self, client: OpenAIClient, req: ChatRequest, keyed: dict[str, Any]) -> dict[str, Any]:
        """The answer to ``req`` (keyed with answer format ``keyed``); asked without response_format
        when the API refuses it, and then marked so (``ANSWERED_WITH``)."""
        fmt = self.answer_format(req)
        try:
            body = await client.post_json("/chat/completions", self._body(req, fmt))
        except OpenAIError as e:
            if not (fmt and e.status in _REFUSED_STATUSES):
                raise self._user_error(e) from None
            try:  # the same request without response_format: if that is answered, response_format was refused
                body = await client.post_json("/chat/completions", self._body(req, {}))
            except OpenAIError as e2:
                raise self._user_error(e2) from None
            self._refused(e)
            fmt = {}
        out = self._parse(body)
        if fmt != keyed:
            out[ANSWERED_WITH] = fmt
        return out

    async def _run_uncached(self, todo: list[tuple[str, ChatRequest]], emit: Callable[[str, dict[str, Any]], None]) -> None:
        sem = asyncio.Semaphore(self.max_concurrency)
        client = OpenAIClient(
            self.base_url,
            self._api_key,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            retry_base_delay_s=self.retry_base_delay_s,
            retry_max_delay_s=self.retry_max_delay_s,
            max_connections=self.max_concurrency,
            headers={"Content-Type": "application/json"},
            on_retry=self._count_retry,
        )
        async with client:

            async def one(key: str, req: ChatRequest, keyed: dict[str, Any]) -> None:
                async with sem:
                    response = await self._post(client, req, keyed)
                emit(key, response)

            await gather_fail_fast([one(k, r, self.answer_format(r)) for k, r in todo])


