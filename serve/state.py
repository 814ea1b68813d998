"""What a running server holds (``State``) and how it is built from settings (``build_state``):
the engine (loaded from the artifact unless given), the teacher, the metrics, the label trie.

The app (``app.create_app``) and the calibration (``calibrate``) both build it here; neither needs
the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgedistill.runtimes.constrain import Constraint, Grammar, LabelSet, for_task
from edgedistill.serve.artifact import Artifact, load_artifact
from edgedistill.serve.engine import Engine
from edgedistill.serve.fallback import CircuitBreaker, FallbackTeacher
from edgedistill.serve.metrics import Metrics
from edgedistill.serve.monitor import LiveMonitor
from edgedistill.serve.settings import Settings, resolve_threshold
from edgedistill.serve.shadow import ShadowChecks
from edgedistill.serve.structured import SchemaCache
from edgedistill.serve.traffic import TrafficLog


@dataclass
class State:
    settings: Settings
    engine: Engine
    model_id: str
    artifact: Artifact | None
    teacher: FallbackTeacher | None
    metrics: Metrics
    api_key: str | None
    created: int = field(default_factory=lambda: int(time.time()))
    label_trie: dict | None = None  # classification: the labels' token trie (confidence, and the constraint's)
    task_constraint: Constraint | None = None  # what /v1/predict decodes under (compiled once, at start)
    avg_latency_s: float = 1.0
    teacher_refuses_response_format: bool = False  # its API answered 400 to response_format: prompt alone
    schemas: SchemaCache | None = None  # chat's response_format / tool-call grammars, compiled once per schema
    draining: bool = False  # SIGTERM/SIGINT came: /ready is 503, new requests 503 (``serve.shutdown``)
    # run (in order) in the app's lifespan shutdown, after the requests in flight are answered and before
    # the teacher client and the engine close: flush what must not be lost (sync or async; failures logged)
    on_shutdown: list[Callable[[], Any]] = field(default_factory=list)
    threshold_source: str = "threshold"  # where settings.threshold came from (settings.resolve_threshold)
    monitor: LiveMonitor | None = None  # the live gauges' windows (serve.monitor)
    traffic: TrafficLog | None = None  # --traffic-log
    shadow: ShadowChecks | None = None  # --shadow-rate

    @property
    def calibration(self) -> dict[str, Any]:
        """The artifact's fitted calibration (empty: temperature 1)."""
        return self.artifact.calibration if self.artifact else {}


def build_state(
    settings: Settings,
    engine: Engine | None = None,
    artifact: Artifact | None = None,
    teacher: FallbackTeacher | None = None,
    api_key: str | None = None,
) -> State:
    """Without ``engine``, load ``settings.artifact`` with the backend its format names. A missing
    teacher key variable fails before minutes of model loading. The state's ``settings.threshold``
    is the threshold in force (given, or from the artifact's calibration: ``resolve_threshold``)."""
    teacher_key = settings.read_teacher_key() if teacher is None and settings.teacher_url else None
    if engine is None:
        artifact = artifact or load_artifact(settings.artifact)
    # the threshold in force, resolved before the model loads (an unknown --target fails at once); a
    # copy of the settings, so the caller's still say what was given
    threshold, source = resolve_threshold(settings.threshold, settings.target, artifact.calibration if artifact else None)
    settings = settings.model_copy(update={"threshold": threshold})
    if engine is None:
        engine = _make_engine(artifact, settings)
    if teacher is None and settings.teacher_url:
        teacher = FallbackTeacher(
            settings.teacher_url,
            settings.teacher_model or "",
            api_key=teacher_key,
            timeout_s=settings.teacher_timeout_s,
            breaker=CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s),
        )
    model_id = settings.model_alias or (artifact.name if artifact else "student")
    st = State(settings, engine, model_id, artifact, teacher, Metrics(), api_key, schemas=SchemaCache(engine.runner),
               threshold_source=source)  # fmt: skip
    st.monitor = LiveMonitor(st.metrics, st.calibration)
    if settings.traffic_log:
        st.traffic = TrafficLog(
            settings.traffic_log,
            st.metrics,
            inputs=settings.traffic_log_inputs == "on",
            max_bytes=int(settings.traffic_log_max_mb * (1 << 20)),
        )
    if teacher is not None and settings.shadow_rate > 0:
        st.shadow = ShadowChecks(teacher, settings.shadow_rate, st.metrics)
    task = artifact.task if artifact else None
    if task is not None:
        constraint = for_task(task, engine.runner)
        if isinstance(constraint, LabelSet):
            st.label_trie = constraint.trie
        elif isinstance(constraint, Grammar):  # a chat request with the task's schema reuses it
            st.schemas.seed(task.answer_schema(), constraint)  # type: ignore[union-attr]
        if settings.constrain:
            st.task_constraint = constraint
    return st


def _make_engine(artifact: Artifact, s: Settings) -> Engine:
    from edgedistill.runtimes.registry import make_runner

    return Engine(make_runner(artifact, s), max_queue=s.max_queue, jump_forward=s.jump_forward)
