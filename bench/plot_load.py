"""``latency.png``: what vLLM's bench and GuideLLM users look at, latency percentiles and throughput
against the load level, one line per endpoint. Pure: ``results`` rows (see bench/README.md) in, a PNG out.

Per load mode that was run (closed loop: x is the concurrency; open loop: x is the offered rate), a
2 x 2 block: TTFT p50/p90/p99, end-to-end latency p50/p90/p99, requests/s and output tokens/s. An
endpoint keeps its colour and marker in every panel (and in pareto.png); the percentile is the line
style. A level where nothing was answered has no point there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgedistill.bench.plot import _plt, endpoint_styles

PCTS = ("p50", "p90", "p99")
MODES = (("closed", "concurrency (closed loop: clients)"), ("open", "offered rate (open loop, Poisson), requests/s"))
LATENCY = (("ttft_ms", "time to first token", "TTFT (ms)"), ("latency_ms", "end-to-end latency", "latency (ms)"))
THROUGHPUT = (
    ("requests_per_s", "throughput: requests", "requests/s"),
    ("output_tokens_per_s", "throughput: output tokens", "output tokens/s"),
)


def load_level(row: dict[str, Any]) -> float | None:
    """A row's x: its concurrency (closed loop) or the rate its arrivals offered (open loop; else the asked rate)."""
    if row.get("mode") == "closed" or (row.get("mode") is None and row.get("concurrency") is not None):
        return row.get("concurrency")
    return row.get("offered_rate") or row.get("rate")


def _mode(row: dict[str, Any]) -> str:
    return row.get("mode") or ("closed" if row.get("concurrency") is not None else "open")


def _series(rows: list[dict[str, Any]], key: str, pct: str | None) -> list[tuple[float, float]]:
    pts = []
    for r in rows:
        x, v = load_level(r), r.get(key)
        if pct is not None:
            v = (v or {}).get(pct)
        if x is not None and v is not None:
            pts.append((float(x), float(v)))
    return sorted(pts)


def _scale(ax, values: list[float], levels: list[float]) -> None:
    """Log y when the endpoints differ by more than 10x (a teacher next to its student), so that
    both stay readable, with plain numbers on it; x on a log scale when the levels span more than
    8x; x ticks at the levels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    pos = [v for v in values if v > 0]
    if pos and max(pos) / min(pos) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
    elif pos:
        ax.set_ylim(0, max(pos) * 1.08)
    if levels and min(levels) > 0 and max(levels) / min(levels) > 8:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_locator(FixedLocator(levels))
    ax.xaxis.set_major_formatter(plain)
    ax.grid(alpha=0.3)


def _lines(ax, mine: list[dict[str, Any]], styles: dict[str, tuple[Any, str]], key: str, pct: str | None) -> list[float]:
    """One line per endpoint; returns the values drawn."""
    values = []
    for name, (color, marker) in styles.items():
        pts = _series([r for r in mine if r["name"] == name], key, pct)
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=marker, color=color, label=name, markersize=5, linewidth=1.5)
            values += [y for _, y in pts]
    if not values:
        ax.text(0.5, 0.5, "no answered requests", ha="center", va="center", transform=ax.transAxes, color="gray")
    return values


def latency_figure(rows: list[dict[str, Any]]):
    """The figure of ``latency.png``: per load mode run, two columns of four panels: TTFT and
    end-to-end latency at p50, p90 and p99 (one shared y axis: the percentiles compare), then
    requests/s and output tokens/s. Each axis's title starts with its mode ("closed loop: " or
    "open loop: "); each line is labelled with its endpoint."""
    plt = _plt()
    modes = [(m, xl) for m, xl in MODES if any(_mode(r) == m and load_level(r) is not None for r in rows)] or [MODES[0]]
    styles = endpoint_styles(list(dict.fromkeys(r["name"] for r in rows)))
    fig, axes = plt.subplots(4, 2 * len(modes), figsize=(6.0 * 2 * len(modes), 13), layout="constrained", squeeze=False)
    for k, (mode, xlabel) in enumerate(modes):
        mine = [r for r in rows if _mode(r) == mode]
        levels = sorted({float(x) for r in mine if (x := load_level(r)) is not None})
        loop = f"{mode} loop"
        lat_axes, lat_values = [], []
        for i, pct in enumerate(PCTS):
            for j, (key, title, ylabel) in enumerate(LATENCY):
                ax = axes[i][2 * k + j]
                lat_values += _lines(ax, mine, styles, key, pct)
                ax.set_title(f"{loop}: {title}, {pct}", fontsize=10)
                ax.set_ylabel(f"{pct} {ylabel}")
                lat_axes.append(ax)
        pos = [v for v in lat_values if v > 0]
        for ax in lat_axes:  # one y scale for the six latency panels: p99 reads against p50
            _scale(ax, lat_values, levels)
            if pos and ax.get_yscale() == "log":
                ax.set_ylim(min(pos) / 1.25, max(pos) * 1.25)
        for j, (key, title, ylabel) in enumerate(THROUGHPUT):
            ax = axes[3][2 * k + j]
            _scale(ax, _lines(ax, mine, styles, key, None), levels)
            ax.set_title(f"{loop}: {title}", fontsize=10)
            ax.set_ylabel(ylabel)
        for ax in axes[3, 2 * k : 2 * k + 2]:
            ax.set_xlabel(xlabel)
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle="-") for c, m in styles.values()]
    fig.legend(handles, list(styles), loc="outside right center", fontsize=9, frameon=False)
    fig.suptitle("Latency percentiles and throughput against load, one line per endpoint", fontsize=12)
    return fig


def latency_png(rows: list[dict[str, Any]], path: Path) -> Path:
    """``latency.png``: see ``latency_figure``."""
    plt = _plt()
    fig = latency_figure(rows)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
