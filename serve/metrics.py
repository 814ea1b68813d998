"""Prometheus metrics on a per-app registry (two apps in one process do not collide), and the
updates the request path makes to them (tokens and answers counted, time to first token, gauges)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # the *_created series only double the output

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
CONF_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "edgedistill_"
        self.requests = Counter(p + "requests_total", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(p + "request_latency_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Time to the first generated token", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter(
            p + "tokens_total", "Tokens of the answers served (their usage), by who answered", ["kind", "answered_by"], registry=r
        )
        self.student_tokens = Counter(
            p + "student_tokens_total", "Tokens the student processed, whoever answered", ["kind"], registry=r
        )
        self.fallbacks = Counter(
            p + "fallbacks_total", "Requests sent to the teacher, by outcome", ["reason", "outcome"], registry=r
        )
        self.confidence = Histogram(
            p + "confidence", "Calibrated student confidence", ["route"], buckets=CONF_BUCKETS, registry=r
        )
        self.answered = Counter(p + "answered_total", "Responses by who answered", ["answered_by"], registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Sequences waiting for a slot", registry=r)
        self.active = Gauge(p + "active_sequences", "Sequences being decoded", registry=r)
        self.breaker_open = Gauge(p + "teacher_circuit_open", "1 while the teacher's circuit breaker is open", registry=r)
        self.rejected = Counter(p + "rejected_total", "Requests refused before the engine", ["reason"], registry=r)
        # the traffic log (serve.traffic): what it wrote, dropped under pressure, failed to write
        self.traffic_records = Counter(p + "traffic_log_records_total", "Traffic log records written", registry=r)
        self.traffic_dropped = Counter(
            p + "traffic_log_dropped_total", "Traffic log records dropped (the writer's queue was full)", registry=r
        )
        self.traffic_errors = Counter(
            p + "traffic_log_errors_total", "Traffic log records lost to a write error (disk full, unwritable folder)", registry=r
        )
        # live monitoring (serve.monitor, serve.shadow)
        self.shadow_agreement = Gauge(
            p + "shadow_agreement",
            "Estimated agreement of the served answers with the teacher (fallbacks agree; student answers from the "
            "random shadow checks), with its 95 % interval",
            ["bound"],
            registry=r,
        )
        self.shadow_checks = Counter(p + "shadow_checks_total", "Shadow checks compared with the teacher", registry=r)
        self.shadow_requests = Counter(
            p + "shadow_requests_total", "Shadow checks by outcome: compared, dropped, failed, cancelled", ["outcome"], registry=r
        )
        self.shadow_tokens = Counter(p + "shadow_tokens_total", "Teacher tokens the shadow checks cost", ["kind"], registry=r)
        self.fallback_rate = Gauge(
            p + "fallback_rate", "Share of the recent answers the cascade sent to the teacher (sliding window)", registry=r
        )
        self.confidence_drift = Gauge(
            p + "confidence_drift",
            "Population stability index of the recent calibrated confidences against the calibration split's",
            registry=r,
        )
        for bound in ("estimate", "low", "high"):
            self.shadow_agreement.labels(bound).set(float("nan"))
        self.fallback_rate.set(float("nan"))
        self.confidence_drift.set(float("nan"))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def record_ttft(self, route: str, first_token_s: float | None) -> None:
        if first_token_s is not None:
            self.ttft.labels(route).observe(first_token_s)

    def count_answer(
        self, answered_by: str, prompt_tokens: int, completion_tokens: int, teacher_usage: dict[str, Any] | None
    ) -> None:
        """Tokens the student processed; tokens of the answer served, by who answered (a teacher's from
        the usage it reported, none when it reported none); the answer."""
        self.student_tokens.labels("prompt").inc(prompt_tokens)
        self.student_tokens.labels("completion").inc(completion_tokens)
        if answered_by == "teacher":
            if teacher_usage is not None:
                self.tokens.labels("prompt", "teacher").inc(teacher_usage["prompt_tokens"])
                self.tokens.labels("completion", "teacher").inc(teacher_usage["completion_tokens"])
        else:
            self.tokens.labels("prompt", "student").inc(prompt_tokens)
            self.tokens.labels("completion", "student").inc(completion_tokens)
        self.answered.labels(answered_by).inc()

    def set_gauges(self, waiting: int, active: int, breaker_open: bool) -> None:
        self.queue_depth.set(waiting)
        self.active.set(active)
        self.breaker_open.set(1 if breaker_open else 0)
