"""The OpenAI-compatible app: ``create_app(settings, engine=None)`` builds it and wires its parts.

Request path: auth (``middleware``) -> body (size, content type, JSON: ``validation``) -> pydantic
model -> limits -> prompt -> engine (bounded, 429 past the queue: ``submission``) -> confidence ->
teacher if unsure (``cascade``) -> typed response (``responses``, ``streaming``) with an
``edgedistill`` object and an ``X-Answered-By`` header. Routes: ``routes_generation`` (chat,
completions), ``routes_predict``, ``routes_info``; the OpenAPI document: ``openapi``. Every failure
on the way is a 4xx in OpenAI's error shape; a teacher failure is never an error (the student's
answer is served, flagged). SIGTERM drains (``shutdown``): new work 503, in-flight work finished
within the grace, then ``State.on_shutdown`` runs in the lifespan shutdown.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from edgedistill.serve import errors
from edgedistill.serve.artifact import Artifact
from edgedistill.serve.engine import Engine
from edgedistill.serve.fallback import FallbackTeacher
from edgedistill.serve.middleware import Auth, Observe
from edgedistill.serve.openapi import openapi
from edgedistill.serve.recording import close_recording
from edgedistill.serve.routes_generation import add_generation_routes
from edgedistill.serve.routes_info import add_info_routes
from edgedistill.serve.routes_predict import add_predict_route
from edgedistill.serve.settings import Settings
from edgedistill.serve.shutdown import Drain, DrainGuard, run_hooks
from edgedistill.serve.state import build_state
from fastapi import FastAPI


def create_app(
    settings: Settings, engine: Engine | None = None, artifact: Artifact | None = None, teacher: FallbackTeacher | None = None
) -> FastAPI:
    """Build the app. Without ``engine``, load ``settings.artifact`` with the backend its format names."""
    api_key = settings.read_api_key()  # a missing key variable fails before minutes of model loading
    st = build_state(settings, engine, artifact, teacher, api_key)

    drain = Drain(st, settings.shutdown_grace_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await run_hooks(st.on_shutdown)  # after the requests in flight are answered (serve.shutdown)
        await close_recording(st)  # pending shadow checks cancelled, the traffic log drained and flushed
        if st.teacher is not None:
            await st.teacher.close()
        await asyncio.to_thread(st.engine.close)

    app = FastAPI(title="edgedistill serve", version="0.1.0", lifespan=lifespan)
    app.state.st = st
    app.state.drain = drain
    errors.install(app)
    app.add_middleware(DrainGuard, drain=drain)
    app.add_middleware(Auth, key=st.api_key)
    app.add_middleware(Observe, metrics=st.metrics)  # outermost: 401s are counted too
    add_info_routes(app, st)
    add_generation_routes(app, st)
    add_predict_route(app, st)
    app.openapi = lambda: openapi(app)
    return app
