"""Teachers: the model that answers (and writes) the distillation data.

Three kinds behind one interface, :class:`Teacher`:

- :class:`OpenAITeacher`: any OpenAI-compatible ``/chat/completions`` API (OpenAI, vLLM,
  llama.cpp server, ...), with bounded concurrency, retries with backoff and cost counting;
- :class:`LocalHFTeacher`: a Hugging Face checkpoint run in-process (batched, CPU, float32);
- :class:`LocalGGUFTeacher`: a GGUF file run with llama-cpp-python.

Every answer goes through a :class:`~edgedistill.distill.cache.ResponseCache` first: a request already answered
(same model, endpoint, messages and decoding settings) is never sent again, so a killed run
resumes where it stopped and pays nothing twice. The API key is read from the environment at
construction and never written anywhere (cache rows, descriptions, messages).

torch/transformers/llama_cpp are imported lazily, inside the local teachers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgedistill.distill.cache import ResponseCache, cache_key

from edgedistill.errors import UserError
from edgedistill.openai_client import OpenAIClient, OpenAIError
from edgedistill.spec import Prices, TeacherConfig, resolve_path

CACHE_VERSION = 1
OnResult = Callable[["ChatResult"], None]


# --- data ------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """One chat completion to ask for. ``sample`` tells repeated samples of one prompt apart."""

    messages: list[dict[str, Any]]
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    sample: int = 0

    def decoding(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop) if self.stop else None,
            "sample": self.sample,
        }


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


def _one_line(text: Any, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


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

    # public ----------------------------------------------------------------------------------
    def request_payload(self, req: ChatRequest) -> dict[str, Any]:
        """The full, secret-free description of a request; its hash is the cache key."""
        return {"v": CACHE_VERSION, **self._identity(), "messages": req.messages, **req.decoding()}

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
            if self.cache is not None:  # evaluation runs uncached: a retrained checkpoint must be re-asked
                self.cache.put(key, payloads[key], response)
            self.usage.requests_sent += 1
            self.usage.prompt_tokens += int(response.get("prompt_tokens", 0))
            self.usage.completion_tokens += int(response.get("completion_tokens", 0))
            self.usage.cost_usd += float(response.get("cost_usd", 0.0))
            self._deliver(results, by_key[key], self._result(key, response, cached=False), on_result)

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
        )

    @staticmethod
    def _deliver(results: list[ChatResult | None], idxs: list[int], res: ChatResult, on_result: OnResult | None) -> None:
        for j, i in enumerate(idxs):
            # a duplicate within one call costs nothing new
            r = res if j == 0 else ChatResult(**{**asdict(res), "cost_usd": 0.0, "cached": True})
            results[i] = r
            if on_result is not None:
                on_result(r)


async def _gather_fail_fast(coros: list[Any]) -> None:
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
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


# --- OpenAI-compatible API -------------------------------------------------------------------
_MALFORMED_FIX = "check that teacher.base_url points at an OpenAI-compatible API (it usually ends in /v1)"


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

    # --- internals ---------------------------------------------------------------------------
    def _body(self, req: ChatRequest) -> dict[str, Any]:
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
        return {
            "text": content or "",
            "prompt_tokens": pt,
            "completion_tokens": ct,
            "finish_reason": str(choice.get("finish_reason") or "stop"),
            "cost_usd": self.cost(pt, ct),
            "model": body.get("model", self.model),
        }

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
        return UserError(f"{where} rejected the request (HTTP {status}: {msg}); check the teacher settings (model, max_tokens)")

    def _user_error(self, e: OpenAIError) -> UserError:
        """The one-line message for a request the client gave up on (after ``e.attempts`` tries)."""
        where = f"teacher at {self.base_url}"
        if e.reason == "bad_json":
            snippet = _one_line(e.message, 60)
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

    async def _post(self, client: OpenAIClient, req: ChatRequest) -> dict[str, Any]:
        try:
            body = await client.post_json("/chat/completions", self._body(req))
        except OpenAIError as e:
            raise self._user_error(e) from None
        return self._parse(body)

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

            async def one(key: str, req: ChatRequest) -> None:
                async with sem:
                    response = await self._post(client, req)
                emit(key, response)

            await _gather_fail_fast([one(k, r) for k, r in todo])


# --- local models ----------------------------------------------------------------------------
def _file_fingerprint(files: list[Path], root: Path) -> str:
    """Identity of local model files without reading them: names, sizes, modification times."""
    parts = []
    for f in sorted(files):
        st = f.stat()
        parts.append(f"{f.relative_to(root) if f != root else f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# files that decide a checkpoint's answers (not caches, logs or anything else kept beside it)
_MODEL_FILE_SUFFIXES = {".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".tiktoken", ".pt", ".pth", ".py"}


class LocalHFTeacher(Teacher):
    """A Hugging Face causal LM checkpoint run in-process: float32, eval mode, CPU.

    Requests are grouped by decoding settings and generated ``batch_size`` at a time with left
    padding (``edgedistill.runtimes.hf.generate_batch``): greedy when temperature is 0, sampled
    otherwise (seeded per batch from the requests' cache keys, which include their seeds and sample
    indices, so runs are repeatable).
    Prompts longer than ``max_length`` tokens keep their last ``max_length`` tokens.
    ``.model`` and ``.tokenizer`` load on first use and can be reused (logit distillation); the
    tokenizer's own padding/truncation sides are left as the checkpoint set them.
    """

    kind = "local-hf"

    def __init__(
        self, path: str | Path, cache: ResponseCache, batch_size: int = 16, max_length: int = 2048, model_id: str | None = None
    ):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise UserError(
                f"teacher.path {self.path} is not a Hugging Face checkpoint (no config.json); point it at the model folder"
            )
        super().__init__(model_id or self.path.name, cache)
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length)
        self._model: Any = None
        self._tokenizer: Any = None
        self._load_lock = threading.Lock()
        self._fingerprint: str | None = None

    def _identity(self) -> dict[str, Any]:
        if self._fingerprint is None:
            files = [
                p for p in self.path.iterdir() if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES and p.name != "manifest.json"
            ]
            self._fingerprint = _file_fingerprint(files, self.path)
        return {"kind": "local-hf", "model": self.model_id, "files": self._fingerprint, "max_length": self.max_length}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "local-hf",
            "model": self.model_id,
            "path": str(self.path),
            "batch_size": self.batch_size,
            "max_length": self.max_length,
        }

    def _load(self) -> None:
        with self._load_lock:
            if self._model is not None:
                return
            try:
                import torch  # noqa: F401
                from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
            except ImportError as e:
                raise UserError(
                    f"a local HF teacher needs torch and transformers ({e.name} is missing); pip install 'edgedistill[distill]'"
                ) from None
            from edgedistill.runtimes.hf import load_causal_lm

            try:
                tok, model = load_causal_lm(self.path)
            except (OSError, ValueError, KeyError) as e:
                raise UserError(
                    f"cannot load the teacher checkpoint {self.path} ({_one_line(e, 160)}); check teacher.path"
                ) from None
            self._tokenizer, self._model = tok, model

    @property
    def model(self) -> Any:
        self._load()
        return self._model

    @property
    def tokenizer(self) -> Any:
        self._load()
        return self._tokenizer

    def prompt_text(self, messages: list[dict[str, Any]]) -> str:
        from edgedistill.runtimes.hf import render_chat

        # a base model without a chat template: a plain transcript ending in the assistant's turn
        return render_chat(self.tokenizer, messages, no_template="transcript")

    def _generate_batch(self, batch: list[tuple[str, ChatRequest]]) -> list[dict[str, Any]]:
        """Blocking: generate one batch (all with the same decoding settings)."""
        from edgedistill.runtimes.hf import generate_batch

        req = batch[0][1]
        seed = None
        if req.temperature > 0:  # seeded per batch from the requests' cache keys (their seeds and sample indices)
            seed = int(hashlib.sha256("".join(k for k, _ in batch).encode()).hexdigest()[:15], 16)
        rows = generate_batch(
            self.model,
            self.tokenizer,
            [self.prompt_text(r.messages) for _, r in batch],
            max_length=self.max_length,
            max_new_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            seed=seed,
        )
        return [{**asdict(row), "cost_usd": 0.0} for row in rows]

    async def _run_uncached(self, todo: list[tuple[str, ChatRequest]], emit: Callable[[str, dict[str, Any]], None]) -> None:
        await asyncio.to_thread(self._load)
        groups: dict[str, list[tuple[str, ChatRequest]]] = {}
        for key, req in todo:
            d = req.decoding()
            d.pop("sample")
            d.pop("seed")
            groups.setdefault(json.dumps(d, sort_keys=True), []).append((key, req))
        for items in groups.values():
            for s in range(0, len(items), self.batch_size):
                batch = items[s : s + self.batch_size]
                answers = await asyncio.to_thread(self._generate_batch, batch)
                for (key, _), answer in zip(batch, answers):
                    emit(key, answer)


class LocalGGUFTeacher(Teacher):
    """A GGUF model run with llama-cpp-python (``edgedistill.runtimes.llama.LlamaChat``), one request at a
    time in a worker thread."""

    kind = "local-gguf"

    def __init__(
        self, path: str | Path, cache: ResponseCache, n_ctx: int = 2048, n_threads: int | None = None, model_id: str | None = None
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"teacher.path {self.path} does not exist; point it at a .gguf file")
        super().__init__(model_id or self.path.name, cache)
        self.n_ctx = int(n_ctx)
        self.n_threads = n_threads or os.cpu_count() or 1
        self._llm: Any = None
        self._load_lock = threading.Lock()

    def _identity(self) -> dict[str, Any]:
        return {
            "kind": "local-gguf",
            "model": self.model_id,
            "files": _file_fingerprint([self.path], self.path),
            "n_ctx": self.n_ctx,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "local-gguf",
            "model": self.model_id,
            "path": str(self.path),
            "n_ctx": self.n_ctx,
            "n_threads": self.n_threads,
        }

    @property
    def llm(self) -> Any:
        with self._load_lock:
            if self._llm is None:
                try:
                    import llama_cpp  # noqa: F401
                except ImportError:
                    raise UserError("a .gguf teacher needs llama-cpp-python; pip install 'edgedistill[llama]'") from None
                from edgedistill.runtimes.llama import LlamaChat

                try:
                    self._llm = LlamaChat(self.path, n_ctx=self.n_ctx, n_threads=self.n_threads)
                except (ValueError, RuntimeError, OSError) as e:
                    raise UserError(
                        f"cannot load the GGUF teacher {self.path} ({_one_line(e, 160)}); check teacher.path"
                    ) from None
        return self._llm

    def _complete(self, req: ChatRequest) -> dict[str, Any]:
        try:
            out = self.llm.complete(
                req.messages,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                stop=list(req.stop) if req.stop else [],
                seed=req.seed,
            )
        except ValueError as e:  # e.g. the prompt does not fit n_ctx
            raise UserError(
                f"GGUF teacher {self.path.name} failed on a request ({_one_line(e, 160)}); shorten inputs or raise n_ctx"
            ) from None
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return {
            "text": choice["message"].get("content") or "",
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            "finish_reason": str(choice.get("finish_reason") or "stop"),
            "cost_usd": 0.0,
        }

    async def _run_uncached(self, todo: list[tuple[str, ChatRequest]], emit: Callable[[str, dict[str, Any]], None]) -> None:
        for key, req in todo:
            emit(key, await asyncio.to_thread(self._complete, req))


# --- factory ---------------------------------------------------------------------------------
def make_teacher(cfg: TeacherConfig, base_dir: Path, cache: ResponseCache, **kwargs: Any) -> Teacher:
    """The teacher a spec's ``teacher:`` (or ``generation.generator:``) section describes.

    Extra keyword arguments go to the teacher's constructor (e.g. ``retry_base_delay_s``).
    """
    if cfg.kind == "openai":
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
    if path.is_file() and path.suffix.lower() == ".gguf":
        return LocalGGUFTeacher(path, cache, model_id=name, **kwargs)
    if path.is_dir() and (path / "config.json").is_file():
        return LocalHFTeacher(path, cache, batch_size=cfg.batch_size, model_id=name, **kwargs)
    raise UserError(
        f"teacher.path {path} is neither a .gguf file nor a Hugging Face checkpoint folder (with config.json); fix teacher.path"
    )
