"""Schema fuzzing of the server from its own OpenAPI document (schemathesis 4, in-process ASGI).

schemathesis generates requests for every operation -- schema-valid ones, invalid ones (wrong
types, out-of-range values, extra fields where they are forbidden), wrong methods, missing bodies
and content types -- and checks each response: no 5xx, documented status codes, content types and
headers, bodies matching the documented schemas, invalid data refused with a 4xx, and (on the app
with an API key) no operation answering without the key. ``positive_data_acceptance`` is left out:
the document cannot express every rule a valid request must also meet (the prompt must fit the
context, token ids the vocabulary), and those are refused with a 400 that says so.

Two apps, both on the fake numpy model (tests/serve_fakes.py): one with a classification task and a
fake teacher on 127.0.0.1 (half of the prompts are unsure, so the fallback and the held streams
run), one with an API key and no teacher (live streams). Bounded for CI:
``EDGEDISTILL_FUZZ_EXAMPLES`` examples per operation and phase (default 40); a summary of what ran
is printed at the end (``pytest tests/test_fuzz.py -s``).
"""

from __future__ import annotations

import os
import zlib
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.python import asgi

from tests.serve_fakes import FakeRunner, FakeTeacher
from tests.test_serve_api import classification_task, make_app

EXAMPLES = int(os.environ.get("EDGEDISTILL_FUZZ_EXAMPLES", "40"))
KEY = "fuzz-key-7c1e"
SEEN: dict[str, Counter] = {"operations": Counter(), "statuses": Counter()}


def unsure_half(prompt: str) -> tuple[str, float]:
    """The student is sure of about half of the prompts (peak 20: p ~ 1) and unsure of the rest."""
    return ("card_arrival", 20.0) if zlib.crc32(prompt.encode("utf-8", "replace")) % 2 else ("card_arrival", 1.0)


def without_lifespan(app):
    """The app, minus its lifespan: the schemathesis client may run startup/shutdown more than once,
    and shutdown closes the engine. The fixture below closes it once, at the end."""

    async def wrapper(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return

    return wrapper


class BearerKey:
    """The API key as schemathesis auth (not a configured header): its ignored_auth check then knows the
    key is the real one -- a configured header merged into operations that declare header parameters
    (the X-Edgedistill-* ones) loses that mark -- and sends probes without it and with a wrong one."""

    def get(self, case, ctx):
        return KEY

    def set(self, case, data, ctx):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def fuzz_schema(app, *, keyed: bool = False):
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.app = without_lifespan(app)
    schema.config.generation.update(max_examples=EXAMPLES)
    schema.config.checks.update(excluded_check_names=["positive_data_acceptance"])
    if keyed:
        schema.auth()(BearerKey)
    return schema


# Built at import: schemathesis parametrizes at collection (its fixture-based loader does not work
# with pytest 9). The engines are idle daemon threads until the tests run; the teacher starts then.
TEACHER = FakeTeacher(reply="card_linking")
TEACHER_APP = make_app(
    runner=FakeRunner(unsure_half, n_slots=2, ctx_per_slot=256),
    task=classification_task(),
    teacher_url=TEACHER.url,
    teacher_model="big",
    threshold=0.5,
)
os.environ["EDGEDISTILL_FUZZ_KEY"] = KEY
KEYED_APP = make_app(api_key_env="EDGEDISTILL_FUZZ_KEY", threshold=0.5)
del os.environ["EDGEDISTILL_FUZZ_KEY"]
teacher_api = fuzz_schema(TEACHER_APP)
keyed_api = fuzz_schema(KEYED_APP, keyed=True)


@pytest.fixture(scope="module", autouse=True)
def servers():
    with TEACHER:
        yield
    for app in (TEACHER_APP, KEYED_APP):
        app.state.st.engine.close()
    ops, statuses = SEEN["operations"], SEEN["statuses"]
    print(f"\nfuzz: {len(ops)} operations, {sum(ops.values())} examples ({EXAMPLES} per operation and phase)")
    for op, n in sorted(ops.items()):
        print(f"  {op}: {n}")
    print("  statuses:", dict(sorted(statuses.items())))


def _call(case) -> None:
    with asgi.get_client(case.operation.schema.app) as client:
        response = case.call_and_validate(session=client)
    SEEN["operations"][case.operation.label] += 1
    SEEN["statuses"][response.status_code] += 1


@teacher_api.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_with_task_and_teacher(case):
    _call(case)


@keyed_api.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_with_api_key(case):
    _call(case)


def test_openapi_documents_every_route_and_error():
    doc = TEACHER_APP.openapi()
    ops = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert ops == {
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
        ("/v1/models", "get"),
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/predict", "post"),
    }
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "415", "429", "503"} <= set(chat["responses"])
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    body = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    request = doc["components"]["schemas"][body]
    assert request["properties"]["model"]["enum"] == ["fake-student"]  # the one model served
    assert "$defs" not in request and "ChatMessage" in doc["components"]["schemas"]  # refs resolve
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/predict"):  # the per-request policy headers
        params = {p["name"]: p for p in doc["paths"][path]["post"]["parameters"]}
        assert params["X-Edgedistill-Fallback"]["schema"]["enum"] == ["on", "off"]
        assert params["X-Edgedistill-Threshold"]["in"] == "header"
    assert "fallback" in doc["components"]["schemas"]["PredictRequest"]["properties"]
    assert {"threshold", "teacher"} <= set(doc["components"]["schemas"]["ModelInfo"]["properties"])
    assert "student_output" in doc["components"]["schemas"]["PredictInfo"]["required"]
