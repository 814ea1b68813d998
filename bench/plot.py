"""PNG figures: ``pareto.png`` (accuracy vs cost per 1k requests and vs p50 latency, frontier
marked and labelled) and ``reliability.png`` (reliability diagrams of the served confidence).
matplotlib is imported here only, with the Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgedistill.bench.pareto import frontier


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def row_label(row: dict[str, Any]) -> str:
    return f"{row['name']} c={row['concurrency']}" if row.get("concurrency") is not None else f"{row['name']} {row['rate']:g}/s"


def _panel(ax, rows: list[dict[str, Any]], xkey, xlabel: str, log: bool, metric: str = "accuracy") -> None:
    pts = [(xkey(r), r["accuracy"], row_label(r)) for r in rows if xkey(r) is not None and r.get("accuracy") is not None]
    if not pts:
        ax.text(0.5, 0.5, f"no rows with {metric} and {xlabel}", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        return
    front = set(frontier([(x, y) for x, y, _ in pts]))
    for i, (x, y, _) in enumerate(pts):
        on = i in front
        color = "tab:red" if on else "gray"
        ax.scatter([x], [y], s=60 if on else 30, color=color if on else "none", edgecolors=color, zorder=3)
    # one label per position: rows that measured the same (cost, accuracy) share it
    groups: dict[tuple[float, float], list[int]] = {}
    for i, (x, y, _) in enumerate(pts):
        groups.setdefault((float(f"{x:.3g}"), round(y, 3)), []).append(i)
    for idx in groups.values():
        on = any(i in front for i in idx)
        text = ", ".join(pts[i][2] for i in idx)
        x, y, _ = pts[idx[0]]
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="black" if on else "gray")
    fx = sorted((pts[i][0], pts[i][1]) for i in front)
    ax.step([x for x, _ in fx], [y for _, y in fx], where="post", color="tab:red", alpha=0.6, label="Pareto frontier")
    if log and min(x for x, _, _ in pts) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (test set)")
    ax.grid(alpha=0.3)


def pareto_png(
    rows: list[dict[str, Any]], path: Path, sweeps: dict[str, dict[str, Any]] | None = None, metric: str = "accuracy"
) -> Path:
    """Two panels: the task's primary metric (a row's ``accuracy``, named ``metric``) vs cost per 1k
    requests and vs p50 end-to-end latency. Frontier
    points filled and joined; every point labelled ``endpoint load``. A cascade sweep (test split)
    is drawn as a dashed curve on the cost panel when costs are known."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    _panel(a, rows, lambda r: r.get("cost_per_1k_usd"), "cost per 1k requests (USD)", log=True, metric=metric)
    _panel(b, rows, lambda r: (r.get("latency_ms") or {}).get("p50"), "p50 end-to-end latency (ms)", log=False, metric=metric)
    for name, sw in (sweeps or {}).items():
        pts = [
            (p["test"]["cost_per_1k_usd"], p["test"]["accuracy"]) for p in sw["sweep"] if p["test"]["cost_per_1k_usd"] is not None
        ]
        if pts:
            a.plot([x for x, _ in pts], [y for _, y in pts], "--", color="tab:blue", alpha=0.6, label=f"cascade sweep ({name})")
            ch = sw["chosen"]["test"]
            if ch["cost_per_1k_usd"] is not None:
                a.scatter([ch["cost_per_1k_usd"]], [ch["accuracy"]], marker="*", s=120, color="tab:blue", zorder=4)
                a.annotate(
                    f"threshold {sw['chosen']['threshold']:.3g}",
                    (ch["cost_per_1k_usd"], ch["accuracy"]),
                    xytext=(4, -10),
                    textcoords="offset points",
                    fontsize=7,
                    color="tab:blue",
                )
    for ax in (a, b):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    a.set_title(f"{metric} vs cost")
    b.set_title(f"{metric} vs latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reliability_png(calibrations: dict[str, dict[str, Any]], path: Path) -> Path:
    """One reliability diagram per endpoint: accuracy per confidence bin against the diagonal."""
    plt = _plt()
    n = max(1, len(calibrations))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    for ax, (name, cal) in zip(axes[0], calibrations.items()):
        bins = [b for b in cal["bins"] if b["count"]]
        width = 1.0 / len(cal["bins"])
        ax.bar(
            [b["lo"] for b in bins],
            [b["accuracy"] for b in bins],
            width=width,
            align="edge",
            alpha=0.6,
            edgecolor="black",
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], s=12, color="black", zorder=3)
        for b in bins:
            ax.annotate(
                str(b["count"]),
                (b["lo"] + width / 2, b["accuracy"]),
                ha="center",
                xytext=(0, 2),
                textcoords="offset points",
                fontsize=6,
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("served confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {cal['ece']:.3f} (n={cal['n']})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
