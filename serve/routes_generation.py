"""The OpenAI routes: /v1/chat/completions and /v1/completions. Prompt (chat: with the tools, and
the grammar of a structured answer, see ``serve.structured`` / ``serve.tools``) -> engine -> confidence ->
the cascade's decision (the teacher answers the same body when the student is unsure) -> the
typed answer, as JSON or as a replayed stream; or, when nothing waits for the decision, a live
stream."""

from __future__ import annotations

import time

from edgedistill.serve.cascade import Policy, answer_confidence, decide, holds_stream, request_policy
from edgedistill.serve.engine import GenParams
from edgedistill.serve.errors import APIError
from edgedistill.serve.openapi import BODY_ERRORS, body_schema, responses
from edgedistill.serve.recording import new_request_id, record_generation
from edgedistill.serve.responses import student_answer, teacher_answer, usage
from edgedistill.serve.state import State
from edgedistill.serve.streaming import live_stream, replay_stream
from edgedistill.serve.structured import request_constraint, response_schema
from edgedistill.serve.submission import check_ready, note_latency, run, submit
from edgedistill.serve.task_chat import TaskChat, task_budget, task_chat, task_confidence, task_decide, task_params
from edgedistill.serve.tools import ToolSpec, openai_paths, render_messages, tool_spec
from edgedistill.serve.types import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest
from edgedistill.serve.validation import check_common, gen_params, max_tokens, read_json, validate
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


def add_generation_routes(app: FastAPI, st: State) -> None:
    @app.post(
        "/v1/chat/completions",
        openapi_extra=body_schema(ChatCompletionRequest),
        responses=responses(ChatCompletion, *BODY_ERRORS, stream=True),
    )
    async def chat_completions(request: Request):
        policy = request_policy(st, request)
        body = await read_json(request, st.settings.max_body_bytes)
        req = validate(ChatCompletionRequest, body)
        check_common(st, req)
        tools = tool_spec(req, response_schema(req))
        constraint = request_constraint(st.schemas, req, tools)  # type: ignore[arg-type]
        messages = render_messages(req.messages, tools)
        try:
            text = st.engine.runner.render_chat(messages)
        except Exception as e:  # noqa: BLE001 -- any template error (jinja, raise_exception) is the request's fault
            raise APIError(
                400, f"messages: the model's chat template refused them ({e})", code="invalid_value", param="messages"
            ) from None
        prompt = st.engine.runner.tokenize(text, special=True, add_bos=True)
        chat = task_chat(st, req, tools)  # the task's format: answered as /v1/predict answers it
        wanted = req.wanted_max_tokens if chat is None else task_budget(st, req.wanted_max_tokens, len(prompt))
        budget = max_tokens(st, wanted, len(prompt))
        # a tool call streams once decoded (its JSON is no content); a JSON answer streams as content
        stream = req.stream and not holds_stream(st, policy) and tools is None
        params = gen_params(st, req, budget, (req.top_logprobs or 0) if req.logprobs else None, stream, constraint)
        if chat is not None:
            params = task_params(st, params)
        return await _serve(st, request, "chat", req, body, [prompt] * req.n, [params] * req.n, policy, tools, chat)

    @app.post(
        "/v1/completions",
        openapi_extra=body_schema(CompletionRequest),
        responses=responses(Completion, *BODY_ERRORS, stream=True),
    )
    async def completions(request: Request):
        policy = request_policy(st, request)
        body = await read_json(request, st.settings.max_body_bytes)
        req = validate(CompletionRequest, body)
        check_common(st, req)
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
        budget = max_tokens(st, req.wanted_max_tokens, max(len(p) for p in prompts))
        params = gen_params(st, req, budget, req.logprobs, req.stream and not holds_stream(st, policy))
        all_prompts = [p for p in prompts for _ in range(req.n)]
        return await _serve(st, request, "completion", req, body, all_prompts, [params] * len(all_prompts), policy)


async def _serve(
    st: State,
    request: Request,
    kind: str,
    req,
    body: dict,
    prompts: list[list[int]],
    params: list[GenParams],
    policy: Policy,
    tools: ToolSpec | None = None,
    chat: TaskChat | None = None,
) -> Response:
    route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    t0 = time.perf_counter()
    rid = new_request_id("chatcmpl-" if kind == "chat" else "cmpl-")
    if req.stream and params[0].stream:  # live streaming: the student answers, confidence comes last
        check_ready(st)
        handle = submit(st, prompts, params)
        gen = live_stream(st, request, kind, req, rid, handle, route, t0, policy, chat is not None, body)
        return StreamingResponse(
            gen, media_type="text/event-stream", headers={"X-Answered-By": "student", "Cache-Control": "no-cache"}
        )
    results = await run(st, request, prompts, params)
    for r in results:
        st.metrics.record_ttft(route, r.first_token_s)
    if chat is not None:
        answers, conf, fields = task_confidence(st, results)
    else:
        conf, fields = answer_confidence(st, results, structured=params[0].constraint is not None)
    if conf is not None:
        st.metrics.confidence.labels(route).observe(conf)
    if fields is not None and tools is not None:
        fields = openai_paths(fields)
    if chat is not None:
        d = await task_decide(st, chat, answers, conf, fields, policy, body)
    else:
        d = await decide(st, kind, body, conf, policy, fields)
    used = usage(results, req.n)
    if d.answered_by == "teacher":
        answer = teacher_answer(st, kind, rid, d)
        teacher_usage = answer.usage.model_dump() if answer.usage is not None else None
    else:
        answer = student_answer(st, kind, req, rid, results, d.info(), tools)
        teacher_usage = None
    st.metrics.count_answer(d.answered_by, used.prompt_tokens, used.completion_tokens, teacher_usage)
    note_latency(st, t0)
    record_generation(st, kind, rid, body, results, d, t0)
    payload = answer.model_dump()
    if not req.stream:
        return JSONResponse(payload, headers=d.headers())
    return StreamingResponse(
        replay_stream(kind, req, payload), media_type="text/event-stream", headers={**d.headers(), "Cache-Control": "no-cache"}
    )
