"""What `--formats` can ask for, and the contract every format module (gguf, onnx, gptq) fulfils.

A format module exposes two functions:

- ``build(src, fmt, out, calib, work) -> Built``: turn the HF checkpoint ``src`` into the artifact
  files inside the (empty) folder ``out``; ``calib`` holds the task's calibration texts (chat-rendered
  prompt + answer) for methods that need data (importance matrix, GPTQ); ``work`` is a scratch folder
  shared by the formats of one run (e.g. the F16 GGUF both GGUF variants are quantized from).
  A build that chooses between candidate files takes ``score`` too (a :data:`Score`; GGUF: with or
  without the importance matrix); compress passes it where the signature has it.
- ``load(folder, manifest) -> Runtime``: open the artifact with its own runtime (``edgedistill.runtimes``:
  llama.cpp, ONNX Runtime, transformers) for the quality gate and the speed check.

Which module builds which family, and the bits of each variant, come from ``edgedistill.runtimes.registry``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgedistill.runtimes.registry import FORMATS

from edgedistill.errors import UserError
from edgedistill.spec import DEFAULT_FORMATS

# An opened runtime -> {"metric", "value", "n"}: the task's primary metric of its greedy answers on
# teacher-labelled rows outside the calibration split (``compress.evaluate.choice_scorer``); higher is better.
Score = Callable[[Any], dict[str, Any]]

# family -> variant -> bits: the formats compress builds
KNOWN: dict[str, dict[str, int]] = {name: dict(f.variants) for name, f in FORMATS.items() if f.builder}


@dataclass(frozen=True)
class FormatSpec:
    family: str
    variant: str
    options: tuple[tuple[str, str], ...] = ()  # e.g. gptq:int4:group_size=64

    @property
    def bits(self) -> int:
        return KNOWN[self.family][self.variant]

    @property
    def name(self) -> str:
        """The artifact's folder name, e.g. ``gguf-q4_k_m``."""
        return f"{self.family}-{self.variant}"

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)

    def __str__(self) -> str:
        return ":".join([self.family, self.variant, *(f"{k}={v}" for k, v in self.options)])


def parse_formats(text: str) -> list[FormatSpec]:
    """``gguf:q8_0,onnx:int4,gptq:int4:group_size=64`` -> FormatSpecs (one-line error on anything unknown)."""
    out: list[FormatSpec] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.lower().split(":")
        family = parts[0]
        if family not in KNOWN:
            raise UserError(f"--formats: unknown format {family!r} in {item!r}; use one of {', '.join(KNOWN)} (e.g. {DEFAULT_FORMATS})")
        if len(parts) < 2 or parts[1] not in KNOWN[family]:
            raise UserError(f"--formats: {item!r} needs a variant: {', '.join(f'{family}:{v}' for v in KNOWN[family])}")
        opts = []
        for kv in parts[2:]:
            k, sep, v = kv.partition("=")
            if not sep or not k or not v:
                raise UserError(f"--formats: option {kv!r} in {item!r} must look like key=value (e.g. gptq:int4:group_size=128)")
            opts.append((k, v))
        spec = FormatSpec(family, parts[1], tuple(opts))
        if spec in out:
            raise UserError(f"--formats: {item!r} is listed twice")
        out.append(spec)
    if not out:
        raise UserError(f"--formats is empty; e.g. --formats {DEFAULT_FORMATS}")
    return out


@dataclass
class Built:
    """What a format's build() reports; it goes into the artifact's manifest."""

    model_file: str  # relative to the artifact folder: the .gguf file, or the folder itself (".")
    method: str  # e.g. "llama.cpp quantize Q4_K_M with importance matrix"
    tools: dict[str, str] = field(default_factory=dict)  # tool/package -> version
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

