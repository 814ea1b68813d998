"""One table: a manifest's ``format`` -> the runtime that runs it, the compress module that builds it,
its variants' bits and the serve backend it names.

Modules are referenced by dotted name and imported only when used, so this table (and the torch-free
core that reads it) never imports a runtime's libraries or compress.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgedistill.runtimes.base import Runner


@dataclass(frozen=True)
class ModelFormat:
    name: str  # the manifest's ``format``
    backend: str  # what serve reports and picks the runner by
    runner: str  # "module:Class" of the runtime's serve ``Runner``
    builder: str | None = None  # the compress module that builds it (``--formats``); None: not built by compress
    variants: dict[str, int] = field(default_factory=dict)  # variant -> bits
    gpu_offload: bool = False  # the runner takes ``n_gpu_layers``

    @property
    def runtime(self) -> str:
        """The runtime's module."""
        return self.runner.partition(":")[0]


FORMATS: dict[str, ModelFormat] = {
    f.name: f
    for f in (
        ModelFormat(
            "gguf",
            "llama.cpp",
            "edgedistill.runtimes.llama:LlamaRunner",
            "edgedistill.compress.gguf",
            {"f16": 16, "q8_0": 8, "q6_k": 6, "q5_k_m": 5, "q4_k_m": 4, "q4_0": 4},
            gpu_offload=True,
        ),
        ModelFormat(
            "onnx", "onnxruntime", "edgedistill.runtimes.onnx:OnnxRunner", "edgedistill.compress.onnx", {"fp32": 32, "int8": 8, "int4": 4}
        ),
        ModelFormat("hf", "transformers", "edgedistill.runtimes.hf:HFRunner"),  # the FP checkpoint distill writes
        ModelFormat("gptq", "transformers", "edgedistill.runtimes.hf:HFRunner", "edgedistill.compress.gptq", {"int4": 4, "int8": 8}),
    )
}


def builder(family: str) -> Any:
    """The compress module that builds ``family`` (imports compress)."""
    spec = FORMATS.get(family)
    if spec is None or spec.builder is None:
        raise KeyError(f"no builder for format {family!r}")
    return importlib.import_module(spec.builder)


def open_runner(
    fmt: str, model_path: Path, *, n_slots: int, ctx_per_slot: int, n_batch: int, n_threads: int, n_gpu_layers: int = 0
) -> Runner:
    """The format's runtime, opened as serve's ``Runner`` (its libraries are imported here, when used)."""
    spec = FORMATS.get(fmt) or FORMATS["hf"]  # what serve did before: anything else goes to transformers
    module, _, name = spec.runner.partition(":")
    cls = getattr(importlib.import_module(module), name)
    extra = {"n_gpu_layers": n_gpu_layers} if spec.gpu_offload else {}
    return cls(model_path, n_slots=n_slots, ctx_per_slot=ctx_per_slot, n_batch=n_batch, n_threads=n_threads, **extra)


class _Served(Protocol):
    format: str
    model_path: Path


class _RunnerSettings(Protocol):
    n_slots: int
    ctx_per_slot: int
    n_batch: int
    n_threads: int
    n_gpu_layers: int


def make_runner(artifact: _Served, s: _RunnerSettings) -> Runner:
    """serve's runner for an artifact (``serve.artifact.Artifact``) under its settings (``serve.settings.Settings``)."""
    return open_runner(
        artifact.format,
        artifact.model_path,
        n_slots=s.n_slots,
        ctx_per_slot=s.ctx_per_slot,
        n_batch=s.n_batch,
        n_threads=s.n_threads,
        n_gpu_layers=s.n_gpu_layers,
    )
