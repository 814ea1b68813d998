"""Which precision training runs in: bf16 mixed precision where it is the faster one here, else float32.

``training.precision: auto`` and ``training.logit_kd.teacher_dtype: auto`` ask :func:`fast_bf16`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the hardware has bfloat16 instructions: a bf16 GPU, or a CPU with AVX512-BF16 /
    AMX-BF16 (x86) or BF16 (Arm) instructions. Without them bf16 is emulated and slower than float32;
    with them it may still be (see :func:`fast_bf16`)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


BF16_MIN_SPEEDUP = 1.25  # bf16 must beat float32 by this much on the probe to be chosen


def bf16_speedup(hidden: int = 1024, inner: int = 4096, rows: int = 256, reps: int = 5) -> float:
    """float32 time / bf16-autocast time of a transformer MLP block's forward and backward on this
    CPU (median of ``reps`` interleaved rounds after two warm-ups; ~0.5 s). The CPU flags do not
    settle it: a 2-core AVX512-BF16 sandbox without AMX ran bf16 1.6-1.9x slower than float32 at
    every size tried, another (the README's) 1.9x faster."""
    import statistics
    from contextlib import nullcontext

    gen = torch.Generator().manual_seed(0)
    up, down = nn.Linear(hidden, inner), nn.Linear(inner, hidden)
    x = torch.randn(rows, hidden, generator=gen)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 + reps):
        for bf16 in (False, True):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
                y = down(F.silu(up(x)))
            y.float().sum().backward()
            if i >= 2:
                times[bf16].append(time.perf_counter() - t)
    return statistics.median(times[False]) / statistics.median(times[True])


_FAST_BF16: bool | None = None


def fast_bf16() -> bool:
    """Whether bf16 is the faster precision here (``auto``): a bf16 GPU; on a CPU, bf16 instructions
    and :func:`bf16_speedup` >= ``BF16_MIN_SPEEDUP`` (probed once per process)."""
    global _FAST_BF16
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if _FAST_BF16 is None:
        _FAST_BF16 = native_bf16() and bf16_speedup() >= BF16_MIN_SPEEDUP
    return _FAST_BF16


def teacher_dtype(setting: str) -> torch.dtype:
    """The frozen KD teacher's dtype: its forward pass is most of a distillation step on a CPU, and
    the KL is computed in float32 from its logits either way."""
    if setting == "auto":
        return torch.bfloat16 if fast_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]
