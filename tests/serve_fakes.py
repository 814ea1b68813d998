"""Test doubles for serve: a numpy "model" with llama.cpp's runner interface, and a fake
OpenAI-compatible teacher served by uvicorn on 127.0.0.1.

FakeRunner is a byte-level model whose KV cache is a token list per slot: ``decode`` asserts that
positions continue exactly where that slot's cache ends, so a scheduling bug in the engine
(wrong positions, a forgotten ``seq_rm``) fails loudly instead of producing subtly wrong text.
The reply to a prompt comes from ``script(prompt_text) -> (reply, peak)``: the reply's next byte
gets logit ``peak``, every other token 0 (peak 20: p ~ 1; peak 3: p ~ 0.07).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

EOS = 0
ASSISTANT = 257  # the "<|assistant|>" special token that ends every chat prompt
N_VOCAB = 258


def default_script(prompt: str) -> tuple[str, float]:
    return "Hello from the student.", 20.0


class FakeRunner:
    def __init__(
        self,
        script: Callable[[str], tuple[str, float]] = default_script,
        n_slots: int = 2,
        ctx_per_slot: int = 256,
        n_batch: int = 64,
        delay_s: float = 0.0,
    ):
        self.script = script
        self.n_vocab = N_VOCAB
        self.n_slots = n_slots
        self.ctx_per_slot = ctx_per_slot
        self.n_batch = n_batch
        self.delay_s = delay_s
        self.eog_tokens = frozenset({EOS})
        self.pieces = [b""] + [bytes([b]) for b in range(256)] + [b""]
        self.kv: list[list[int]] = [[] for _ in range(n_slots)]
        self.batches: list[int] = []  # sequences per decode call, to check batching
        self.closed = False

    def tokenize(self, text: str, *, special: bool, add_bos: bool) -> list[int]:
        data = text.encode("utf-8")
        marker = b"<|assistant|>"
        if special and data.endswith(marker):
            return [b + 1 for b in data[: -len(marker)]] + [ASSISTANT]
        if add_bos and data:  # a /v1/completions prompt: the fake marks its end the same way
            return [b + 1 for b in data] + [ASSISTANT]
        return [b + 1 for b in data]

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "<|assistant|>"

    def seq_rm(self, seq: int, p0: int) -> None:
        del self.kv[seq][p0:]

    def decode(self, tokens, pos, seqs, outputs) -> np.ndarray:
        if self.delay_s:
            time.sleep(self.delay_s)
        assert len(tokens) <= self.n_batch
        self.batches.append(len(set(seqs)))
        rows = []
        for t, p, s, o in zip(tokens, pos, seqs, outputs):
            assert p == len(self.kv[s]), f"slot {s}: position {p} but cache holds {len(self.kv[s])} tokens"
            assert 0 <= t < N_VOCAB
            self.kv[s].append(t)
            if o:
                rows.append(self._logits(self.kv[s]))
        return np.array(rows, dtype=np.float32).reshape(len(rows), N_VOCAB)

    def _logits(self, history: list[int]) -> np.ndarray:
        logits = np.zeros(N_VOCAB, dtype=np.float32)
        if ASSISTANT in history:
            cut = history.index(ASSISTANT)
            prompt, done = history[:cut], history[cut + 1 :]
        else:
            prompt, done = history, []
        text = bytes(t - 1 for t in prompt if 0 < t < 257).decode("utf-8", "replace")
        reply, peak = self.script(text)
        target = reply.encode("utf-8")
        nxt = target[len(done)] + 1 if len(done) < len(target) else EOS
        logits[nxt] = peak
        return logits

    def close(self) -> None:
        self.closed = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeTeacher:
    """An OpenAI-compatible chat/completions API answering ``reply`` (or failing with ``status``)."""

    def __init__(
        self, reply: str = "Teacher says hi.", status: int = 200, delay_s: float = 0.0, refuse_response_format: bool = False
    ):
        self.reply, self.status, self.delay_s = reply, status, delay_s
        self.refuse_response_format = refuse_response_format  # an API without structured outputs: 400
        self.calls: list[dict] = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.calls.append(body)
            if self.delay_s:
                import asyncio

                await asyncio.sleep(self.delay_s)
            if self.status != 200:
                return JSONResponse({"error": {"message": "boom"}}, status_code=self.status)
            if self.refuse_response_format and "response_format" in body:
                return JSONResponse({"error": {"message": "response_format is not supported"}}, status_code=400)
            return {
                "id": "chatcmpl-teacher",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": self.reply},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            }

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.calls.append(body)
            if self.status != 200:
                return JSONResponse({"error": {"message": "boom"}}, status_code=self.status)
            return {
                "id": "cmpl-teacher",
                "object": "text_completion",
                "created": 0,
                "model": body.get("model"),
                "choices": [{"index": 0, "text": self.reply, "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            }

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("fake teacher did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def send_json(handler: BaseHTTPRequestHandler, data: bytes | dict, status: int = 200) -> None:
    """Answer a stdlib handler's request with JSON (``data``: already encoded, or an object)."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(raw)))
    handler.end_headers()
    handler.wfile.write(raw)


def start_http(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """A stdlib HTTP server for ``handler`` on 127.0.0.1, serving in a daemon thread, and its
    base URL (ending in ``/v1``); stop it with ``stop_http``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def stop_http(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


class LocalHTTPServer:
    """A stdlib HTTP server on 127.0.0.1 in a daemon thread, for fake OpenAI-compatible APIs:
    a subclass calls ``bind(Handler)``; ``with`` starts and stops it; ``base_url`` ends in ``/v1``."""

    def bind(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
