"""Dollars per 1,000 requests.

* A local endpoint (``--price NAME=0.10/h``): the machine's price per hour divided by the requests it
  answered per hour at that load level: ``usd_per_hour / 3600 / requests_per_s * 1000``.
* An API endpoint (``--price NAME=0.15,0.60``: $ per 1M input, output tokens): the mean tokens per
  request times the prices: ``1000 * (mean_in * p_in + mean_out * p_out) / 1e6``.
* A cascade (an edgedistill server whose answers may come from the teacher): its own cost plus the
  share of requests the teacher answered times the teacher's cost per 1k requests.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from edgedistill.errors import UserError

_HOURLY = re.compile(r"^\$?\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*/\s*h(?:our|r)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Price:
    usd_per_hour: float | None = None  # local: what the machine costs per hour
    input_per_1m: float | None = None  # API: $ per million input (prompt) tokens
    output_per_1m: float | None = None  # API: $ per million output (completion) tokens

    @property
    def kind(self) -> str:
        return "local" if self.usd_per_hour is not None else "api"

    def public(self) -> dict[str, Any]:
        if self.kind == "local":
            return {"kind": "local", "usd_per_hour": self.usd_per_hour}
        return {"kind": "api", "input_per_1m": self.input_per_1m, "output_per_1m": self.output_per_1m}


def parse_price(text: str, name: str = "NAME") -> Price:
    """``0.10/h`` (local, $ per hour) or ``0.15,0.60`` (API, $ per 1M input, output tokens)."""
    t = text.strip()
    m = _HOURLY.match(t)
    if m:
        return Price(usd_per_hour=float(m.group(1)))
    parts = [p.strip().lstrip("$") for p in t.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 2 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise UserError(
            f"--price {name}={text}: write $/hour for a local endpoint ({name}=0.10/h) "
            f"or $ per 1M input,output tokens for an API ({name}=0.15,0.60)"
        )
    return Price(input_per_1m=values[0], output_per_1m=values[1])


def sig(v: float | None, digits: int = 6) -> float | None:
    """Round to significant digits: costs span $0.0001 to $100 per 1k requests."""
    return None if v is None else float(f"{v:.{digits}g}")


def local_cost_per_1k(usd_per_hour: float, requests_per_s: float | None) -> float | None:
    """The machine's hourly price spread over the requests it answers per hour."""
    if not requests_per_s or requests_per_s <= 0:
        return None
    return usd_per_hour / 3600.0 / requests_per_s * 1000.0


def api_cost_per_1k(price: Price, mean_input_tokens: float, mean_output_tokens: float) -> float:
    return 1000.0 * (mean_input_tokens * (price.input_per_1m or 0.0) + mean_output_tokens * (price.output_per_1m or 0.0)) / 1e6


def own_cost_per_1k(price: Price | None, row: dict[str, Any]) -> float | None:
    """One endpoint's cost per 1k requests at one load level (without a cascade's teacher calls)."""
    if price is None or not row.get("requests"):
        return None
    if price.kind == "local":
        return local_cost_per_1k(price.usd_per_hour or 0.0, row.get("requests_per_s"))
    n = row["requests"]
    return api_cost_per_1k(price, row["input_tokens"] / n, row["output_tokens"] / n)


def cascade_cost_per_1k(student_cost: float | None, fallback_rate: float | None, teacher_cost: float | None) -> float | None:
    """Student's cost plus the teacher's for the share of requests it answered."""
    if student_cost is None:
        return None
    if not fallback_rate:
        return student_cost
    if teacher_cost is None:
        return None
    return student_cost + fallback_rate * teacher_cost
