"""One load level's samples -> the numbers of a ``results`` row (latency percentiles, tokens, rates).

Definitions follow vLLM's ``benchmark_serving``: TTFT is the time to the first chunk carrying text;
ITL the gaps between consecutive text chunks, pooled over all requests; TPOT per request
``(latency - TTFT) / (output tokens - 1)``. Percentiles are numpy's (linear interpolation).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from edgedistill.bench.client import Sample
from edgedistill.bench.cost import sig

PERCENTILES = (50, 90, 99)


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float] | None:
    """``{"p50", "p90", "p99", "mean"}`` in milliseconds of values in seconds; None when empty."""
    if not len(values_s):
        return None
    ms = np.asarray(values_s, dtype=float) * 1000.0
    p = np.percentile(ms, PERCENTILES)
    out = {f"p{q}": round(float(v), 3) for q, v in zip(PERCENTILES, p)}
    out["mean"] = round(float(ms.mean()), 3)
    return out


def token_source(samples: Sequence[Sample]) -> str | None:
    """Where the output token counts came from: the server's usage, the chunk count, or both."""
    kinds = {"usage" if s.completion_tokens is not None else "chunks" for s in samples}
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else "mixed"


def count_mismatches(samples: Sequence[Sample]) -> int:
    """Requests whose usage disagrees with their text chunks. One chunk per token is what a live
    stream sends; the usage may count one more (the end-of-generation token, which has no text)."""
    return sum(1 for s in samples if s.completion_tokens is not None and not s.chunks <= s.completion_tokens <= s.chunks + 1)


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """The measured numbers of one load level. ``requests`` counts answered requests only; every
    other request sent is an error, so ``requests + errors`` is what was sent."""
    ok = [s for s in samples if s.ok]
    errors = Counter(s.error for s in samples if not s.ok)
    if samples:
        duration = max(s.end for s in samples) - min(s.start for s in samples)
    else:
        duration = 0.0
    out_tokens = sum(s.output_tokens for s in ok)
    in_tokens = sum(s.prompt_tokens if s.prompt_tokens is not None else -(-s.prompt_chars // 4) for s in ok)
    routed = [s for s in ok if s.answered_by is not None]
    return {
        "requests": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(sorted(errors.items())),
        "duration_s": round(duration, 6),
        "latency_ms": percentiles_ms([s.latency_s for s in ok]),
        "ttft_ms": percentiles_ms([s.ttft_s for s in ok if s.ttft_s is not None]),
        "itl_ms": percentiles_ms([g for s in ok for g in s.itl_s()]),
        "tpot_ms": percentiles_ms([t for s in ok if (t := s.tpot_s()) is not None]),
        "output_tokens": out_tokens,
        "output_tokens_source": token_source(ok),
        "stream_chunks": sum(s.chunks for s in ok),
        "token_count_mismatches": count_mismatches(ok),
        "empty_answers": sum(1 for s in ok if not s.text),
        "input_tokens": in_tokens,
        "input_tokens_source": None if not ok else ("usage" if all(s.prompt_tokens is not None for s in ok) else "estimated"),
        "output_tokens_per_s": sig(out_tokens / duration) if duration > 0 else None,
        "requests_per_s": sig(len(ok) / duration) if duration > 0 else None,
        "fallback_rate": round(sum(s.answered_by == "teacher" for s in routed) / len(routed), 4) if routed else None,
        # what the teacher was asked (answered or failed): the share a cascade's cost pays the teacher for
        "teacher_call_rate": round(sum(s.teacher_called for s in routed) / len(routed), 4) if routed else None,
    }
