"""Server settings: command-line flags > environment variables (``EDGEDISTILL_*``) > a YAML/JSON
config file (``--config`` or ``EDGEDISTILL_CONFIG``) > defaults.

``Settings`` is the one declaration of the serve flags: each field is the flag ``--<name>`` (with
dashes; a bool is ``--<name>/--no-<name>``), the environment variable ``EDGEDISTILL_<NAME>`` and,
by its description, the help text (``serve.cli`` builds both entry points' options from it).

Secrets are never settings: ``api_key_env`` and ``teacher_api_key_env`` name the environment
variables that hold the keys, so a config file can be committed and a manifest never stores a key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edgedistill.errors import UserError
from edgedistill.thresholds import unmet_note


class _FileSource(PydanticBaseSettingsSource):
    """Values from the config file named by ``Settings.load(config=...)`` or ``EDGEDISTILL_CONFIG``."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None):
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self.path:
            return {}
        p = Path(self.path)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {p} is not valid YAML/JSON ({e})") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise UserError(f"config file {p} must be a mapping of setting: value")
        return data


class Settings(BaseSettings):
    """Everything `edgedistill serve` can be told. Each field is also ``EDGEDISTILL_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="EDGEDISTILL_", extra="forbid", validate_default=True)

    artifact: str = Field(
        "",
        description="Artifact folder (with manifest.json), a .gguf file, or an `edgedistill run` folder (RUN: serves the "
        "artifact RUN/serving.json points at, else RUN/report.json's cascade artifact).",
    )
    model_alias: str | None = Field(None, description="Model id served in /v1/models (default: the artifact's name).")
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 exposes the server to the network.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    api_key_env: str | None = Field(None, description="Environment variable holding the bearer key clients must send.")
    log_level: str = Field("info", description="Log level of the server: critical, error, warning, info, debug or trace.")

    # teacher fallback
    teacher_url: str | None = Field(
        None, description="OpenAI-compatible base URL of the teacher, e.g. https://api.openai.com/v1."
    )
    teacher_model: str | None = Field(None, description="Model name the teacher API expects.")
    teacher_api_key_env: str | None = Field(None, description="Environment variable holding the teacher's API key.")
    teacher_timeout_s: float = Field(30.0, gt=0, description="Give up on a teacher call after this many seconds.")
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Calibrated confidence below which the teacher answers; wins over --target (default: the artifact's "
        "recommended threshold from its manifest's calibration, 0.9 without one).",
    )
    target: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Serve at the artifact's threshold for this target (e.g. 0.99: 99 % of the teacher's quality at least "
        "cost), one of its manifest's calibration thresholds.",
    )
    breaker_failures: int = Field(3, ge=1, description="Consecutive teacher failures that open the circuit breaker.")
    breaker_cooldown_s: float = Field(30.0, ge=0, description="How long an open breaker skips the teacher.")

    # traffic log and shadow checks (serve.traffic, serve.shadow, serve.monitor)
    traffic_log: str | None = Field(
        None, description="Folder for the traffic log: one JSON line per answered request (DIR/traffic-000001.jsonl, ...)."
    )
    traffic_log_inputs: str = Field(
        "on", pattern=r"^(on|off)$", description="on: log each request's input; off: only its SHA-256 (input_sha256)."
    )
    traffic_log_max_mb: float = Field(64.0, gt=0, description="Start the next traffic log file past this size (MB).")
    shadow_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of the answers the student gave alone that are also sent to the teacher off the request "
        "path, to estimate the served answers' agreement with it (needs a teacher).",
    )

    # engine
    n_threads: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1), ge=1, description="CPU threads for llama.cpp.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to the GPU (-1: all); 0 on a CPU-only build.")
    n_slots: int = Field(4, ge=1, le=64, description="Sequences decoded together in one batch (continuous batching).")
    ctx_per_slot: int = Field(2048, ge=64, description="Context length (prompt + completion) of one sequence.")
    n_batch: int = Field(512, ge=16, description="Most tokens in one llama_decode call (prompt chunks + decode steps).")
    jump_forward: bool = Field(
        True,
        description="Under a constraint, append the tokens it forces (the only one its mask admits) in the same decode "
        "call instead of one step each; the tokens and confidences are the same (off: one step per token, for comparisons).",
    )
    confidence: bool = Field(True, description="Compute per-response confidence (off: greedy needs no softmax at all).")
    confidence_quantile: float = Field(0.1, ge=0.0, le=1.0, description="Generation: this quantile of per-token probabilities.")
    constrain: bool = Field(
        True,
        description="Decode the task's answer (/v1/predict) under its constraint: one of the labels, or its JSON schema "
        "(off: free decoding, parsed afterwards; for comparisons).",
    )

    # limits
    max_queue: int = Field(32, ge=0, description="Requests waiting for a slot before new ones get 429.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted (413 past it).")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request does not say.")
    max_n: int = Field(4, ge=1, description="Largest n (choices per request).")
    stream_hold_for_fallback: bool = Field(
        True, description="With a teacher and threshold > 0, stream only after the confidence decision (else stream live)."
    )

    # shutdown
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM/SIGINT: seconds to finish the requests in flight (new ones get 503 at once); what is "
        "left then gets 503 with Retry-After (Kubernetes' terminationGracePeriodSeconds is 30: give it a few more).",
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if bool(self.teacher_url) != bool(self.teacher_model):
            raise ValueError("teacher_url and teacher_model go together: give both or neither")
        if self.shadow_rate > 0 and not self.teacher_url:
            raise ValueError("shadow_rate needs a teacher: give teacher_url and teacher_model, or leave shadow_rate at 0")
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens_limit)
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        path = _CONFIG_FILE.get("path") or os.environ.get("EDGEDISTILL_CONFIG")
        return (init_settings, env_settings, _FileSource(settings_cls, path))

    @classmethod
    def load(cls, config: str | Path | None = None, **overrides: Any) -> Settings:
        """Build settings; ``overrides`` that are None are treated as not given (CLI flags left out)."""
        from pydantic import ValidationError

        _CONFIG_FILE["path"] = str(config) if config else None
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as err:
            e = err.errors()[0]
            loc = ".".join(str(x) for x in e["loc"]) or "settings"
            raise UserError(f"serve setting {loc}: {e['msg'].removeprefix('Value error, ')}") from None
        finally:
            _CONFIG_FILE["path"] = None

    def read_api_key(self) -> str | None:
        return _read_env_key(self.api_key_env, "api_key_env")

    def read_teacher_key(self) -> str | None:
        return _read_env_key(self.teacher_api_key_env, "teacher_api_key_env")


_CONFIG_FILE: dict[str, str | None] = {"path": None}

DEFAULT_THRESHOLD = 0.9  # an artifact without a fitted calibration (an older manifest, a bare .gguf)


def resolve_threshold(threshold: float | None, target: float | None, calibration: dict[str, Any] | None) -> tuple[float, str]:
    """The threshold in force and where it came from: ``threshold`` (given) wins, then ``target``
    (that target's threshold in the manifest's ``calibration.thresholds``), then the manifest's
    ``calibration.recommended``, then 0.9 (``default``)."""
    cal = calibration or {}
    if threshold is not None:
        return float(threshold), "threshold"
    if target is not None:
        known = [t for t in cal.get("thresholds") or [] if isinstance(t, dict) and "target" in t and "threshold" in t]
        hit = next((t for t in known if abs(float(t["target"]) - target) < 1e-9), None)
        if hit is None:
            have = ", ".join(f"{float(t['target']):g}" for t in known)
            raise UserError(
                f"target {target:g}: the artifact's calibration has "
                + (f"thresholds for {have}; pass one of them" if have else "no thresholds (compress it again to fit them)")
                + " or --threshold"
            )
        return float(hit["threshold"]), f"target {target:g}"
    rec = cal.get("recommended")
    if isinstance(rec, dict) and rec.get("threshold") is not None:
        return float(rec["threshold"]), f"recommended (target {float(rec.get('target', 0)):g})"
    return DEFAULT_THRESHOLD, "default"


def threshold_note(source: str, calibration: dict[str, Any] | None) -> str | None:
    """A warning for the threshold in force when it is the artifact's recommended one and its target
    was out of reach on the calibration split (``calibration.recommended.met`` false), else None."""
    rec = (calibration or {}).get("recommended") or {}
    if not source.startswith("recommended") or rec.get("met") is not False:
        return None
    return "note: " + unmet_note(rec, (calibration or {}).get("n"))


def _read_env_key(var: str | None, what: str) -> str | None:
    if not var:
        return None
    value = os.environ.get(var)
    if not value:
        raise UserError(f"{what}: environment variable {var} is not set (or empty); export it or drop --{what.replace('_', '-')}")
    return value
