"""Request and response models of the OpenAI-compatible API (the subset a local model can honour).

Unknown fields are ignored, as OpenAI-compatible servers do (clients send ``user``,
``stream_options`` ...), except on our own ``/v1/predict`` where a typo (``treshold``) must not pass
silently. A field we know is checked strictly (pydantic strict mode: ``"5"`` or ``true`` is not a
number): a wrong type is a 400 naming the field. Features we cannot honour (tools, image parts, JSON
mode) are a clear 400, never a silent no-op.

The response models are what the routes build and return (stream chunks aside), so the OpenAPI
document shows the real answers; the schema fuzz test (tests/test_fuzz.py) checks every response
against them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator, model_validator


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# The JSON schema documents what the validators below check (so the OpenAPI document is the real
# contract, which tests/test_fuzz.py holds the server to); the validators give the messages.
_STOP = {"type": "string", "minLength": 1}
_STOP_SCHEMA = [_STOP, {"type": "array", "items": _STOP, "maxItems": 4}, {"type": "null"}]
_NOTHING = [{"type": "null"}, {"type": "array", "maxItems": 0}]


class _Sampling(_Req):
    model: StrictStr = Field(description="Model id from /v1/models.")
    max_tokens: int | None = Field(None, ge=1, description="Most new tokens per choice.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1.0 as in OpenAI's API.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="Choices to generate.")
    stop: StrictStr | list[StrictStr] | None = Field(
        None, description="Up to 4 strings that end the completion.", json_schema_extra={"anyOf": _STOP_SCHEMA}
    )
    seed: int | None = Field(None, description="Seed of the sampler (same seed, same request: same answer).")
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @property
    def wanted_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ContentPart(_Req):
    model_config = ConfigDict(
        json_schema_extra={"properties": {"type": {"const": "text"}, "text": {"type": "string"}}, "required": ["type", "text"]}
    )

    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Req):
    # documented, not only checked: only an assistant message may come without content
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"role": {"not": {"const": "assistant"}}}},
            "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        }
    )

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ChatMessage:
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text" or part.text is None:
                    raise ValueError(
                        f"content part of type {part.type!r} is not supported by this text model; send text parts only"
                    )
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = Field(None, description="Not supported: null or [].", json_schema_extra={"anyOf": _NOTHING})
    tool_choice: Any = None
    response_format: dict[str, Any] | None = Field(
        None, json_schema_extra={"anyOf": [{"type": "null"}, {"type": "object", "properties": {"type": {"const": "text"}}}]}
    )

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported by this server (the student model has no tool-calling template)")
        rf = (self.response_format or {}).get("type", "text")
        if rf != "text":
            raise ValueError(
                f"response_format {rf!r} is not supported; use the task's /v1/predict endpoint for structured output"
            )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


# what the route accepts (checked there, with messages that say what to fix): nothing empty
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT_SCHEMA = [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    _TOKEN_IDS,
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
]


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[int] | list[list[int]] = Field(
        description="Text, texts, token ids or lists of ids.", json_schema_extra={"anyOf": _PROMPT_SCHEMA}
    )
    logprobs: int | None = Field(None, ge=0, le=20, description="Return this many top log-probabilities per token.")
    echo: StrictBool = False
    suffix: str | None = Field(
        None, description="Not supported: null or empty.", json_schema_extra={"anyOf": [{"type": "null"}, {"const": ""}]}
    )
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported by this server")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of other than n is not supported")
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class PredictRequest(_Req):
    model_config = ConfigDict(extra="forbid", strict=True)

    input: StrictStr = Field(min_length=1, description="The task input; the task's prompt template is applied server-side.")
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="This request's threshold instead of the server's (and of an X-Edgedistill-Threshold header). An "
        "answer that is not valid for the task (e.g. not a label) still goes to the teacher at 0.",
    )
    fallback: StrictBool | None = Field(
        None,
        description="false: the student answers and the teacher is never called, not even for an invalid answer "
        "(student-only mode; wins over an X-Edgedistill-Fallback header). Default: the header's, else on.",
    )


# ---- responses (built by the routes, documented in OpenAPI) ----------------------------------


class _Resp(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Resp):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Resp):
    """Every 4xx/5xx: OpenAI's error shape."""

    error: ErrorDetail


class EdgedistillInfo(_Resp):
    answered_by: Literal["student", "teacher"]
    confidence: float | None = Field(description="The student's calibrated confidence (also when the teacher answered).")
    threshold: float = Field(description="The threshold this request was decided with (its own or the server's).")
    fallback: bool = Field(
        description="Whether the teacher could answer: one is configured, the fallback was not switched off for this "
        "request, and the answer was not streamed live."
    )
    fallback_reason: str | None = Field(
        description="Why the answer is one for the teacher (low_confidence; on /v1/predict also the parse error such as "
        "not_a_label), whether or not the teacher was asked; null when the student's answer stands on its own."
    )
    teacher_error: str | None = Field(description="Why the teacher, asked, did not answer (the student's answer is served).")
    fields: dict[str, float] | None = Field(
        None,
        description="A JSON answer's calibrated confidence per field (dotted paths for nested objects); `confidence` is "
        "the lowest of them (or of the object's structure: which keys, where it ends). Absent for other answers.",
    )


class PredictInfo(EdgedistillInfo):
    student_output: str = Field(description="The student's own answer as generated (text, before parsing).")
    constrained: bool = Field(description="The student decoded under the task's constraint (its labels or JSON schema).")


class Usage(_Resp):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Resp):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(_Resp):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletion(_Resp):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None
    system_fingerprint: str | None = None
    edgedistill: EdgedistillInfo


class CompletionChoice(_Resp):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class Completion(_Resp):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    system_fingerprint: str | None = None
    edgedistill: EdgedistillInfo


class StreamEvent(_Resp):
    """One server-sent event of a stream: ``data`` is a JSON chunk, or ``[DONE]`` at the end."""

    data: str


class PredictResponse(_Resp):
    output: Any = Field(description="The parsed answer: a label, a JSON object or text; null when unparseable.")
    confidence: float | None
    answered_by: Literal["student", "teacher"]
    error: str | None
    edgedistill: PredictInfo


class ModelInfo(_Resp):
    format: str | None = Field(description="The artifact's format (gguf ...).")
    backend: str | None
    task: str | None = Field(description="The task type when the artifact has a task spec (then /v1/predict serves it).")
    threshold: float = Field(description="The server's threshold (a request may set its own).")
    teacher: bool = Field(description="Whether a teacher is configured (the fallback can happen at all).")


class ModelCard(_Resp):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    edgedistill: ModelInfo


class ModelList(_Resp):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Resp):
    status: Literal["ok"]


class Ready(_Resp):
    status: Literal["ready"]
    model: str
    waiting: int
    active: int
