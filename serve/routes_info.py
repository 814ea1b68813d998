"""The routes about the server: /health, /ready, /metrics, /v1/models."""

from __future__ import annotations

from edgedistill.serve import errors
from edgedistill.serve.openapi import responses
from edgedistill.serve.state import State
from edgedistill.serve.types import Health, ModelCard, ModelInfo, ModelList, Ready
from fastapi import FastAPI
from fastapi.responses import Response


def add_info_routes(app: FastAPI, st: State) -> None:
    @app.get("/health", responses={200: {"model": Health}})
    async def health():
        return Health(status="ok")

    @app.get("/ready", responses=responses(Ready, 503))
    async def ready():
        if st.draining:  # SIGTERM: out of the load balancer's rotation at once (serve.shutdown)
            return errors.error_response(503, "shutting down", "server_shutting_down")
        if not st.engine.ready:
            return errors.error_response(503, f"engine not ready: {st.engine.failed or 'starting'}", "not_ready")
        return Ready(status="ready", model=st.model_id, waiting=st.engine.waiting, active=st.engine.active)

    @app.get("/metrics", responses=responses(None))
    async def metrics():
        breaker_open = st.teacher is not None and st.teacher.breaker.is_open
        st.metrics.set_gauges(st.engine.waiting, st.engine.active, breaker_open)
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses=responses(ModelList))
    async def models():
        art = st.artifact
        info = ModelInfo(
            format=art.format if art else None,
            backend=art.backend if art else None,
            task=art.task.type if art and art.task else None,
            threshold=st.settings.threshold,
            threshold_source=st.threshold_source,
            teacher=st.teacher is not None,
        )
        card = ModelCard(id=st.model_id, object="model", created=st.created, owned_by="edgedistill", edgedistill=info)
        return ModelList(object="list", data=[card])
