"""Teachers: the model that answers (and writes) the distillation data.

Three kinds behind one interface, :class:`Teacher`:

- ``teacher_api.OpenAITeacher``: any OpenAI-compatible ``/chat/completions`` API (OpenAI, vLLM,
  llama.cpp server, ...), with bounded concurrency, retries with backoff and cost counting;
- ``teacher_local.LocalHFTeacher``: a Hugging Face checkpoint run in-process (batched, CPU, float32);
- ``teacher_local.LocalGGUFTeacher``: a GGUF file run with llama-cpp-python.

This module holds the interface, the request/result types and :func:`make_teacher`.

Every answer goes through a :class:`~edgedistill.distill.cache.ResponseCache` first: a request already answered
(same model, endpoint, messages and decoding settings) is never sent again, so a killed run
resumes where it stopped and pays nothing twice. The API key is read from the environment at
construction and never written anywhere (cache rows, descriptions, messages).

torch/transformers/llama_cpp are imported lazily, inside the local teachers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgedistill.distill.cache import ResponseCache, cache_key

from edgedistill.datafiles import resolve_path
from edgedistill.errors import UserError
from edgedistill.spec import TeacherConfig
from edgedistill.task import Task

CACHE_VERSION = 1
# a response's key naming the answer format it was really asked with (``Teacher.answer_format``'s
# shape), when that is not the one its request was keyed with; the answer is cached under that one
ANSWERED_WITH = "_answered_with"
OnResult = Callable[["ChatResult"], None]


# --- data ------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """One chat completion to ask for. ``sample`` tells repeated samples of one prompt apart.
    ``constrain_to``: the task whose answer this is; the answer is asked for in its shape (one of the
    labels, its JSON schema) as far as the teacher can (:meth:`Teacher.answer_format`)."""

    messages: list[dict[str, Any]]
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    sample: int = 0
    constrain_to: Task | None = None
    top_logprobs: int | None = None  # ask an API teacher for the top k logprobs of each answer token

    def decoding(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop) if self.stop else None,
            "sample": self.sample,
        }
        if self.top_logprobs is not None:  # only when asked: the keys of earlier answers stay the same
            out["top_logprobs"] = self.top_logprobs
        return out


@dataclass
class ChatResult:
    """A teacher's answer. ``cost_usd`` is the new money spent on it (0 when it came from the
    cache); ``original_cost_usd`` is what it cost when it was first paid for."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    cache_key: str
    cached: bool
    cost_usd: float
    finish_reason: str
    original_cost_usd: float = 0.0
    logprobs: list[dict[str, Any]] | None = None  # OpenAI's logprobs.content, when asked for and given


@dataclass
class Usage:
    """What a teacher did in this process. ``cost_usd`` counts new dollars only; ``saved_usd``
    is the original cost of the answers served from the cache."""

    requests_sent: int = 0  # real calls to the API / the model (one per prompt)
    cache_hits: int = 0
    prompt_tokens: int = 0  # of the requests sent
    completion_tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0
    retries: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost_usd"] = round(self.cost_usd, 6)
        d["saved_usd"] = round(self.saved_usd, 6)
        return d


def one_line(text: Any, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def answer_shape(task: Task | None) -> dict[str, Any] | None:
    """What a task's answer is decoded under, as JSON: ``{"labels": [...]}`` (classification),
    ``{"json_schema": ...}`` (extraction, tool_call); None for a task without one (qa, generation)."""
    if task is None:
        return None
    if task.type == "classification" and task.labels:
        return {"labels": list(task.labels)}
    schema = task.answer_schema()
    return {"json_schema": schema} if schema is not None else None


# --- base ------------------------------------------------------------------------------------
class Teacher:
    """Base class: the cache, usage counting, ordering and progress callbacks.

    Subclasses implement ``_identity`` (what, besides the request, decides the answer: model and
    endpoint or local file identity; never a secret) and ``_run_uncached`` (answer the requests the
    cache does not know and report each through ``emit``).
    """

    kind = "base"

    def __init__(self, model_id: str, cache: ResponseCache):
        self.model_id = model_id
        self.cache = cache
        self.usage = Usage()

    # subclass hooks --------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        raise NotImplementedError

    async def _run_uncached(self, todo: list[tuple[str, ChatRequest]], emit: Callable[[str, dict[str, Any]], None]) -> None:
        """Answer every (key, request); call ``emit(key, response)`` on the event loop for each,
        where response has text, prompt_tokens, completion_tokens, finish_reason, cost_usd."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model_id}

    def answer_format(self, req: ChatRequest) -> dict[str, Any]:
        """How this teacher shapes the answer to ``req`` beyond its messages and decoding settings,
        as part of the cache key: a local teacher decodes under the task's constraint
        (``{"constraint": ...}``); an API teacher says what it sends. Nothing for a free-text request."""
        shape = answer_shape(req.constrain_to)
        return {"constraint": shape} if shape is not None else {}

    # public ----------------------------------------------------------------------------------
    def request_payload(self, req: ChatRequest, answer_format: dict[str, Any] | None = None) -> dict[str, Any]:
        """The full, secret-free description of a request; its hash is the cache key.
        ``answer_format``: the one it was answered with, when not :meth:`answer_format`'s."""
        fmt = self.answer_format(req) if answer_format is None else answer_format
        return {"v": CACHE_VERSION, **self._identity(), "messages": req.messages, **req.decoding(), **fmt}

    def key_for(self, req: ChatRequest) -> str:
        return cache_key(self.request_payload(req))

    async def chat_many(self, requests: list[ChatRequest], on_result: OnResult | None = None) -> list[ChatResult]:
        """Answer all requests; results come back in request order. ``on_result`` is called (on the
        event loop) as each answer is ready, cached ones first."""
        results: list[ChatResult | None] = [None] * len(requests)
        by_key: dict[str, list[int]] = {}
        todo: list[tuple[str, ChatRequest]] = []
        first: dict[str, ChatRequest] = {}
        for i, req in enumerate(requests):
            key = self.key_for(req)
            by_key.setdefault(key, []).append(i)  # the same request twice in one call: ask once
            first.setdefault(key, req)
        for key, req in first.items():
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is None:
                todo.append((key, req))
                continue
            self.usage.cache_hits += 1
            self.usage.saved_usd += float(hit.get("cost_usd", 0.0))
            self._deliver(results, by_key[key], self._result(key, hit, cached=True), on_result)

        payloads = {key: self.request_payload(req) for key, req in todo}

        def emit(key: str, response: dict[str, Any]) -> None:
            payload, stored = payloads[key], key
            if ANSWERED_WITH in response:  # asked otherwise than keyed (an API that refused response_format)
                payload = self.request_payload(first[key], response.pop(ANSWERED_WITH))
                stored = cache_key(payload)
            if self.cache is not None:  # evaluation runs uncached: a retrained checkpoint must be re-asked
                self.cache.put(stored, payload, response)
            self.usage.requests_sent += 1
            self.usage.prompt_tokens += int(response.get("prompt_tokens", 0))
            self.usage.completion_tokens += int(response.get("completion_tokens", 0))
            self.usage.cost_usd += float(response.get("cost_usd", 0.0))
            self._deliver(results, by_key[key], self._result(stored, response, cached=False), on_result)

        if todo:
            await self._run_uncached(todo, emit)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:  # a subclass bug, not a user problem
            raise RuntimeError(f"{type(self).__name__} returned no answer for {len(missing)} request(s)")
        return results  # type: ignore[return-value]

    def run_chat_many(self, requests: list[ChatRequest], on_result: OnResult | None = None) -> list[ChatResult]:
        """Synchronous :meth:`chat_many` (from a thread that runs no event loop, or from one that does)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.chat_many(requests, on_result))
        box: dict[str, Any] = {}

        def runner() -> None:
            try:
                box["out"] = asyncio.run(self.chat_many(requests, on_result))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box["err"] = e

        t = threading.Thread(target=runner, name="teacher-chat-many")
        t.start()
        t.join()
        if "err" in box:
            raise box["err"]
        return box["out"]

    # helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _result(key: str, response: dict[str, Any], cached: bool) -> ChatResult:
        cost = float(response.get("cost_usd", 0.0))
        return ChatResult(
            text=str(response.get("text", "")),
            prompt_tokens=int(response.get("prompt_tokens", 0)),
            completion_tokens=int(response.get("completion_tokens", 0)),
            cache_key=key,
            cached=cached,
            cost_usd=0.0 if cached else cost,
            finish_reason=str(response.get("finish_reason", "stop")),
            original_cost_usd=cost,
            logprobs=response.get("logprobs") if isinstance(response.get("logprobs"), list) else None,
        )

    @staticmethod
    def _deliver(results: list[ChatResult | None], idxs: list[int], res: ChatResult, on_result: OnResult | None) -> None:
        for j, i in enumerate(idxs):
            # a duplicate within one call costs nothing new
            r = res if j == 0 else ChatResult(**{**asdict(res), "cost_usd": 0.0, "cached": True})
            results[i] = r
            if on_result is not None:
                on_result(r)


async def gather_fail_fast(coros: list[Any]) -> None:
    """Run coroutines concurrently; on the first error cancel the rest and raise that error."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    # every failed task's exception is retrieved, not only the one raised: several can fail in the
    # same wakeup (a refused connection fails every request at once), and asyncio prints a traceback,
    # "Task exception was never retrieved", for each one nobody looked at
    errors = [t.exception() for t in tasks if t.done() and not t.cancelled()]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


# --- factory ---------------------------------------------------------------------------------
def make_teacher(cfg: TeacherConfig, base_dir: Path, cache: ResponseCache, **kwargs: Any) -> Teacher:
    """The teacher a spec's ``teacher:`` (or ``generation.generator:``) section describes.

    Extra keyword arguments go to the teacher's constructor (e.g. ``retry_base_delay_s``).
    """
    if cfg.kind == "openai":
        from edgedistill.distill.teacher_api import OpenAITeacher

        return OpenAITeacher(
            base_url=str(cfg.base_url),
            model=str(cfg.model),
            api_key_env=cfg.api_key_env,
            max_concurrency=cfg.max_concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            prices=cfg.prices,
            cache=cache,
            **kwargs,
        )
    path = resolve_path(str(cfg.path), Path(base_dir))
    name = cfg.model or path.name
    if not path.exists():
        raise UserError(f"teacher.path {path} does not exist; fix the path (relative paths start at the spec's folder)")
    from edgedistill.distill.teacher_local import LocalGGUFTeacher, LocalHFTeacher

    if path.is_file() and path.suffix.lower() == ".gguf":
        return LocalGGUFTeacher(path, cache, model_id=name, **kwargs)
    if path.is_dir() and (path / "config.json").is_file():
        return LocalHFTeacher(path, cache, batch_size=cfg.batch_size, model_id=name, **kwargs)
    raise UserError(
        f"teacher.path {path} is neither a .gguf file nor a Hugging Face checkpoint folder (with config.json); fix teacher.path"
    )
