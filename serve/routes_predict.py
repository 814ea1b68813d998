"""/v1/predict: the artifact's task on one input (the task's prompt template applied here), the
cascade's answer parsed for the task."""

from __future__ import annotations

import time

from edgedistill.serve.cascade import Policy, request_policy
from edgedistill.serve.cascade import predict as cascade_predict
from edgedistill.serve.errors import APIError
from edgedistill.serve.openapi import BODY_ERRORS, body_schema, responses
from edgedistill.serve.recording import Answered, new_request_id, predict_shadow, record_answer
from edgedistill.serve.state import State
from edgedistill.serve.submission import note_latency
from edgedistill.serve.tools import message_dict
from edgedistill.serve.types import PredictInfo, PredictRequest, PredictResponse
from edgedistill.serve.validation import read_json, validate
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from edgedistill.conversation import InputError, TaskInput, check_input


def task_input(req: PredictRequest) -> TaskInput:
    """The request's input as the task's (``conversation.check_input``); a 400 naming the message."""
    if isinstance(req.input, str):
        return req.input
    try:
        return check_input([message_dict(m) for m in req.input])
    except InputError as e:
        raise APIError(400, str(e), code="invalid_value", param="input") from None


def add_predict_route(app: FastAPI, st: State) -> None:
    @app.post("/v1/predict", openapi_extra=body_schema(PredictRequest), responses=responses(PredictResponse, *BODY_ERRORS))
    async def predict(request: Request):
        task = st.artifact.task if st.artifact else None
        if task is None:
            raise APIError(
                404, "this artifact carries no task spec, so it has no /v1/predict; use /v1/chat/completions", code="not_found"
            )
        policy = request_policy(st, request)
        body = await read_json(request, st.settings.max_body_bytes)
        req = validate(PredictRequest, body)
        policy = Policy(
            policy.threshold if req.threshold is None else req.threshold,
            policy.fallback if req.fallback is None else req.fallback,
        )
        t0 = time.perf_counter()
        text = task_input(req)
        ans = await cascade_predict(st, text, policy, request)
        d, res = ans.decision, ans.student.result
        st.metrics.count_answer(d.answered_by, res.prompt_tokens, res.completion_tokens, ans.teacher_usage)
        note_latency(st, t0)
        info = PredictInfo(
            **d.info().model_dump(exclude={"fields"}),
            student_output=res.text,
            constrained=st.task_constraint is not None,
            fields=ans.student.fields,
        )
        out = PredictResponse(
            output=ans.value, confidence=info.confidence, answered_by=d.answered_by, error=ans.error, edgedistill=info
        )
        rid = new_request_id("pred-")
        teacher = ans.value if d.answered_by == "teacher" else None
        shadow = predict_shadow(st, text, ans.student.value, ans.student.error)
        record_answer(st, Answered("/v1/predict", rid, text, ans.student.value, d, teacher, t0, shadow))
        return JSONResponse(out.model_dump(), headers={**d.headers(), "X-Request-Id": rid})
