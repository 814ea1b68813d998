"""What one ``edgedistill bench`` run measures: endpoints, load levels, prices, teacher, ceiling.

Every flag is parsed here into a :class:`BenchConfig`; anything wrong is a one-line
:class:`~edgedistill.errors.UserError` naming the flag and what to write instead.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgedistill.bench.cost import Price, parse_price

from edgedistill.errors import UserError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Endpoint:
    """One OpenAI-compatible server to measure."""

    name: str
    url: str  # base URL, ending in /v1 (or whatever prefix the API uses)
    model: str | None = None  # from NAME=URL#model, else GET /v1/models
    api_key: str | None = None
    price: Price | None = None
    artifact: str | None = None  # the artifact folder it serves (edgedistill run sets it): its manifest calibration
    # found out by edgedistill.bench.client.discover
    edgedistill: bool = False  # an edgedistill server: answers carry the "edgedistill" object
    predict: bool = False  # it serves /v1/predict (an artifact with a task spec)
    has_teacher: bool | None = None  # an edgedistill server's /v1/models: a teacher configured (None: not said)
    threshold: float | None = None  # ... and its threshold

    @property
    def student_only(self) -> bool:
        """The server has the student-only mode (X-Edgedistill-Fallback: off, /v1/predict fallback: false):
        the /v1/models entry of those servers says whether a teacher is configured."""
        return self.has_teacher is not None

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "model": self.model,
            "price": self.price.public() if self.price else None,
            "artifact": self.artifact,
            "edgedistill": self.edgedistill,
            "predict": self.predict,
            "has_teacher": self.has_teacher,
            "threshold": self.threshold,
        }


@dataclass
class Ceiling:
    """In-process decode of a GGUF, compared with the endpoints in ``names``."""

    names: list[str]
    path: str


@dataclass
class BenchConfig:
    endpoints: list[Endpoint]
    out: Path
    spec: Any = None  # edgedistill.spec.TaskSpec: the test set, calibration columns, settings
    task_path: Path | None = None
    concurrency: list[int] = field(default_factory=lambda: [1, 4])
    rates: list[float] = field(default_factory=list)
    requests: int = 32
    warmup: int = 2
    max_tokens: int = 64
    teacher: str | None = None
    ceilings: list[Ceiling] = field(default_factory=list)
    threads: int = 1
    calibration: Path | None = None
    target: float = 0.99  # fraction of the teacher's accuracy the cascade must reach ...
    target_accuracy: float | None = None  # ... unless an absolute accuracy is given
    eval_limit: int | None = None
    timeout_s: float = 120.0
    seed: int = 0
    progress: bool = True

    @functools.cached_property
    def task(self) -> Any:
        """The task core (edgedistill.task.Task) of --task: prompts and correctness; None without one."""
        return self.spec.task if self.spec is not None else None

    def endpoint(self, name: str) -> Endpoint:
        return next(e for e in self.endpoints if e.name == name)

    def public(self) -> dict[str, Any]:
        return {
            "task": str(self.task_path) if self.task_path else None,
            "task_name": self.task.name if self.task else None,
            "task_type": self.task.type if self.task else None,
            "concurrency": self.concurrency,
            "rates": self.rates,
            "requests": self.requests,
            "warmup": self.warmup,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "teacher": self.teacher,
            "calibration": str(self.calibration) if self.calibration else None,
            "target": self.target,
            "target_accuracy": self.target_accuracy,
            "eval_limit": self.eval_limit,
            "timeout_s": self.timeout_s,
            "seed": self.seed,
            "threads": self.threads,
        }


def parse_endpoint(text: str) -> Endpoint:
    """``NAME=URL`` or ``NAME=URL#model``; a URL without a path gets ``/v1``."""
    name, eq, rest = text.partition("=")
    name = name.strip()
    if not eq or not name or not rest:
        raise UserError(f"--endpoint {text!r}: write NAME=URL[#model], e.g. --endpoint ours=http://127.0.0.1:8000/v1")
    if not _NAME.match(name):
        raise UserError(f"--endpoint {text!r}: the name {name!r} may only hold letters, digits, '_', '.', '-'")
    url, _, model = rest.partition("#")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--endpoint {text!r}: {url!r} is not an http(s) URL; e.g. http://127.0.0.1:8000/v1")
    base = url.strip().rstrip("/")
    if parts.path in ("", "/"):
        base += "/v1"
    return Endpoint(name=name, url=base, model=model.strip() or None)


def _pairs(flag: str, values: list[str], example: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        key, eq, val = v.partition("=")
        if not eq or not key.strip() or not val.strip():
            raise UserError(f"{flag} {v!r}: write NAME=VALUE, e.g. {flag} {example}")
        out.append((key.strip(), val.strip()))
    return out


def parse_list(flag: str, text: str | None, kind: type) -> list:
    """``"1,4,8"`` -> ``[1, 4, 8]``; each value must be > 0."""
    if text is None or not text.strip():
        return []
    out = []
    for part in text.split(","):
        try:
            v = kind(part.strip())
        except ValueError:
            raise UserError(
                f"{flag} {text!r}: {part.strip()!r} is not a {'whole ' if kind is int else ''}number; e.g. {flag} 1,4,8"
            ) from None
        if not (math.isfinite(v) and v > 0):
            raise UserError(f"{flag} {text!r}: every value must be a positive number")
        out.append(v)
    return list(dict.fromkeys(out))


def build_config(
    endpoint: list[str],
    *,
    out: Path,
    task: Path | None = None,
    concurrency: str | None = "1,4",
    rate: str | None = None,
    price: list[str] | None = None,
    api_key_env: list[str] | None = None,
    ceiling: list[str] | None = None,
    **settings: Any,
) -> BenchConfig:
    """The CLI's flags (see ``edgedistill bench --help``) as typed objects, then :func:`make_config`."""
    if not endpoint:
        raise UserError("give at least one --endpoint NAME=URL, e.g. --endpoint ours=http://127.0.0.1:8000/v1")
    eps = [parse_endpoint(e) for e in endpoint]
    by_name = _by_name(eps)
    for name, val in _pairs("--price", price or [], "ours=0.10/h or teacher=0.15,0.60"):
        _known(by_name, "--price", name).price = parse_price(val, name)
    for name, var in _pairs("--api-key-env", api_key_env or [], "teacher=OPENAI_API_KEY"):
        key = os.environ.get(var)
        if not key:
            raise UserError(f"--api-key-env {name}={var}: the environment variable {var} is not set")
        _known(by_name, "--api-key-env", name).api_key = key
    ceilings = []
    for names_text, path in _pairs("--ceiling", ceiling or [], "ours=model.gguf"):
        ceilings.append(Ceiling([n.strip() for n in names_text.split(",") if n.strip()], path))
    conc = parse_list("--concurrency", concurrency, int)
    rates = parse_list("--rate", rate, float)
    return make_config(eps, out=out, task=task, concurrency=conc, rates=rates, ceilings=ceilings, **settings)


def _by_name(eps: list[Endpoint]) -> dict[str, Endpoint]:
    names = [e.name for e in eps]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UserError(f"--endpoint: the name {dup!r} is used twice; give each endpoint its own name")
    return {e.name: e for e in eps}


def _known(by_name: dict[str, Endpoint], flag: str, name: str) -> Endpoint:
    if name not in by_name:
        raise UserError(f"{flag}: {name!r} is not an endpoint name (endpoints: {', '.join(by_name)})")
    return by_name[name]


def make_config(
    endpoints: list[Endpoint],
    *,
    out: Path,
    task: Path | None = None,
    concurrency: list[int] | None = None,
    rates: list[float] | None = None,
    requests: int = 32,
    warmup: int = 2,
    max_tokens: int | None = None,
    teacher: str | None = None,
    ceilings: list[Ceiling] | None = None,
    threads: int | None = None,
    calibration: Path | None = None,
    target: float = 0.99,
    target_accuracy: float | None = None,
    eval_limit: int | None = None,
    timeout: float = 120.0,
    seed: int = 0,
    progress: bool = True,
) -> BenchConfig:
    """Check and combine typed settings (what ``edgedistill run`` builds; the CLI's flags come through
    :func:`build_config`). Errors name the CLI flag a user would change."""
    if not endpoints:
        raise UserError("give at least one --endpoint NAME=URL, e.g. --endpoint ours=http://127.0.0.1:8000/v1")
    by_name = _by_name(endpoints)
    if teacher is not None:
        _known(by_name, "--teacher", teacher)
    ceilings = list(ceilings or [])
    for c in ceilings:
        for n in c.names:
            _known(by_name, "--ceiling", n)
    conc, rates = list(concurrency or []), list(rates or [])
    if not conc and not rates:
        raise UserError("nothing to measure: give --concurrency (e.g. 1,4,8) and/or --rate (requests/s, e.g. 2,5)")
    if requests < 1:
        raise UserError(f"--requests {requests}: measure at least 1 request per load level")
    if warmup < 0:
        raise UserError(f"--warmup {warmup}: must be 0 or more")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens}: must be at least 1")
    if timeout <= 0:
        raise UserError(f"--timeout {timeout}: must be positive (seconds)")
    if not 0 < target <= 1:
        raise UserError(f"--target {target}: a fraction of the teacher's accuracy in (0, 1], e.g. 0.99")
    if target_accuracy is not None and not 0 <= target_accuracy <= 1:
        raise UserError(f"--target-accuracy {target_accuracy}: an accuracy in [0, 1]")
    if eval_limit is not None and eval_limit < 1:
        raise UserError(f"--eval-limit {eval_limit}: must be at least 1")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")

    spec = None
    if task is not None:
        from edgedistill.spec import load_spec

        spec = load_spec(task)
    if calibration is not None:
        if spec is None:
            raise UserError("--calibration needs --task (the calibration file is read with the task's test-set columns)")
        if not Path(calibration).exists():
            raise UserError(f"--calibration {calibration}: file does not exist")
    if max_tokens is None:
        if spec is None:
            max_tokens = 64
        else:
            max_tokens = spec.task.output_budget  # the task's one output budget, as serve's /v1/predict decodes
    return BenchConfig(
        endpoints=list(endpoints),
        out=Path(out),
        spec=spec,
        task_path=Path(task) if task else None,
        concurrency=conc,
        rates=rates,
        requests=requests,
        warmup=warmup,
        max_tokens=max_tokens,
        teacher=teacher,
        ceilings=ceilings,
        threads=threads or max(1, os.cpu_count() or 1),
        calibration=Path(calibration) if calibration else None,
        target=target,
        target_accuracy=target_accuracy,
        eval_limit=eval_limit,
        timeout_s=timeout,
        seed=seed,
        progress=progress,
    )
