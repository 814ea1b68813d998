"""Request and response models of the OpenAI-compatible API (the subset a local model can honour).

Unknown fields are ignored, as OpenAI-compatible servers do (clients send ``user``,
``stream_options`` ...), except on our own ``/v1/predict`` where a typo (``treshold``) must not pass
silently. A field we know is checked strictly (pydantic strict mode: ``"5"`` or ``true`` is not a
number): a wrong type is a 400 naming the field. Every parameter of OpenAI's chat and completions
APIs is either honoured (sampling, penalties, logit_bias, ``response_format``, ``tools``), harmless
metadata (``user``, ``metadata``, ``store: false``, the prompt-cache hints ...) or refused with a 400
that says why (legacy ``functions``, audio, predicted outputs, web search, image parts ...), never a
silent no-op.

The response models are what the routes build and return (stream chunks aside), so the OpenAPI
document shows the real answers; the schema fuzz test (tests/test_fuzz.py) checks every response
against them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Minus this for every token already generated.")
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Minus this times the number of times a token was generated."
    )
    logit_bias: dict[str, float] | None = Field(
        None,
        description="Token id (as a string) -> bias from -100 to 100 added to its logit (-100 bans it, 100 forces it).",
        json_schema_extra={
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
    )
    user: str | None = Field(None, description="Metadata: accepted, not used.")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return None
        out: dict[int, float] = {}
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys are token ids as strings such as \"1234\" (got {key[:20]!r})")
            if not -100 <= bias <= 100:
                raise ValueError(f"token {key}: a bias must be from -100 to 100 (got {bias})")
            out[int(key)] = float(bias)
        return out

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


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class ToolCallFunction(_Req):
    name: StrictStr
    arguments: StrictStr = Field(description="The arguments as a JSON string (as OpenAI sends them back).")


class ToolCallIn(_Req):
    """A tool call in the history (an earlier assistant message)."""

    id: StrictStr
    type: Literal["function"]
    function: ToolCallFunction


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
    tool_calls: list[ToolCallIn] | None = Field(None, description="An assistant message's tool calls (content may be null).")
    tool_call_id: StrictStr | None = Field(None, description="A tool message: the id of the call it answers.")

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
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class FunctionDef(_Req):
    name: StrictStr = Field(pattern=FUNCTION_NAME, description="a-z, A-Z, 0-9, _ and -, at most 64 characters.")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema of type object (default: no arguments). Always enforced (strict or not)."
    )
    strict: StrictBool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v):
        if v is not None and v.get("type", "object") != "object":
            raise ValueError("must be a JSON schema of type object (the arguments are a JSON object)")
        return v


class Tool(_Req):
    type: Literal["function"] = Field(description="Only function tools.")
    function: FunctionDef


class NamedFunction(_Req):
    name: StrictStr


class NamedToolChoice(_Req):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Req):
    name: StrictStr = Field(pattern=FUNCTION_NAME)
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="The JSON schema the answer satisfies (default: any JSON object)."
    )
    strict: StrictBool | None = Field(None, description="Accepted; the schema is always enforced.")


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        return self


# OpenAI parameters this server cannot honour: each is refused (documented as null only), never ignored
_REFUSED = {
    "functions": "functions (legacy function calling) is not supported; use tools",
    "function_call": "function_call (legacy function calling) is not supported; use tool_choice",
    "audio": "audio output is not supported by this text model",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "moderation": "moderation is not supported by this server",
    "verbosity": "verbosity is not supported (the model has no such setting)",
}
_NULL_ONLY = {"anyOf": [{"type": "null"}]}


def _refused(field: str) -> Any:
    return Field(None, description=f"Not supported: {_REFUSED[field]}.", json_schema_extra=_NULL_ONLY)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, description="Function tools (llama.cpp's generic tool-call format).")
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = Field(
        None, description="Default: auto with tools, none without."
    )
    parallel_tool_calls: StrictBool = Field(True, description="false: at most one tool call.")
    response_format: ResponseFormat | None = None
    # harmless metadata: accepted, changes nothing
    metadata: dict[str, StrictStr] | None = Field(None, description="Metadata: accepted, not used.")
    safety_identifier: StrictStr | None = Field(None, description="Metadata: accepted, not used.")
    store: Literal[False] | None = Field(None, description="Nothing is stored: false or null only.")
    prompt_cache_key: StrictStr | None = Field(None, description="Accepted: every prompt prefix is cached anyway.")
    prompt_cache_retention: Any = Field(None, description="Accepted: the prefix cache lives in memory.")
    prompt_cache_options: Any = Field(None, description="Accepted: the prefix cache is automatic.")
    service_tier: Literal["auto", "default"] | None = Field(None, description="One tier: auto or default only.")
    modalities: list[Literal["text"]] | None = Field(None, description='Text only: ["text"].')
    reasoning_effort: Literal["none"] | None = Field(None, description="The model does not reason: none or null only.")
    # refused
    functions: Any = _refused("functions")
    function_call: Any = _refused("function_call")
    audio: Any = _refused("audio")
    prediction: Any = _refused("prediction")
    web_search_options: Any = _refused("web_search_options")
    moderation: Any = _refused("moderation")
    verbosity: Any = _refused("verbosity")

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice(cls, v):
        if v is None or isinstance(v, dict) or v in ("auto", "none", "required"):
            return v
        raise ValueError('must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')

    @field_validator(*_REFUSED)
    @classmethod
    def _not_supported(cls, v, info):
        if v is not None:
            raise ValueError(_REFUSED[info.field_name])
        return v

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
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

    input: Annotated[StrictStr, Field(min_length=1)] | Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="The task input, a text or a conversation (chat messages: user, assistant with content or tool_calls, "
        "tool; ending with the user's or a tool's) whose next answer the model gives; the task's prompt template (its "
        "instructions as the system message, its tools) is applied server-side."
    )

    @field_validator("input", mode="before")
    @classmethod
    def _text_or_messages(cls, v):
        if isinstance(v, list) and not all(isinstance(m, dict) for m in v):
            raise ValueError("must be a string or a list of chat messages (objects with role and content)")
        if not isinstance(v, str | list):
            raise ValueError("must be a string (the input text) or a list of chat messages")  # noqa: TRY004 -- pydantic turns a ValueError into a 422
        if not v:  # said here: pydantic's union would only say "wrong type"
            raise ValueError("String should have at least 1 character" if isinstance(v, str) else "needs at least 1 message")
        return v
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


class ToolCall(_Resp):
    id: str = Field(description="call_<random>, what a tool message's tool_call_id answers.")
    type: Literal["function"]
    function: ToolCallFunction


class ToolCallMessage(AssistantMessage):
    """An answer that calls tools: ``content`` null, ``finish_reason`` tool_calls."""

    tool_calls: list[ToolCall]


class ChatChoice(_Resp):
    index: int
    message: ToolCallMessage | AssistantMessage
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
    threshold_source: str = Field(
        description="Where the server's threshold came from: `threshold` (given), `target 0.99` (that target's threshold in "
        "the artifact's calibration), `recommended (target 0.99)` (the artifact's recommended one) or `default` (0.9: "
        "the artifact has no calibration)."
    )
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
