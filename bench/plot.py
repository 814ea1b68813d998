"""PNG figures: ``pareto.png`` (accuracy vs cost per 1k requests and vs p50 latency, one point per
endpoint, frontier marked and labelled) and ``reliability.png`` (reliability diagrams of the served confidence).
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


_MARKERS = "osD^vP*XhH<>p8"


def endpoint_points(rows: list[dict[str, Any]], xkey) -> dict[str, tuple[float, float]]:
    """One point per endpoint, (x, accuracy): the endpoint's lowest x over its load rows (its cheapest
    or fastest measured load), so every endpoint appears once however many loads were run."""
    out: dict[str, tuple[float, float]] = {}
    for r in rows:
        x, y = xkey(r), r.get("accuracy")
        if x is None or y is None:
            continue
        if r["name"] not in out or x < out[r["name"]][0]:
            out[r["name"]] = (float(x), float(y))
    return out


def _intervals(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each endpoint's 95 % interval of its accuracy (a row's ``accuracy_ci``), where the bench gave one."""
    return {r["name"]: tuple(r["accuracy_ci"]) for r in rows if isinstance(r.get("accuracy_ci"), list | tuple) and len(r["accuracy_ci"]) == 2}


def _panel(ax, rows: list[dict[str, Any]], xkey, xlabel: str, log: bool, metric: str, styles: dict[str, tuple[str, str]]) -> None:
    pts = endpoint_points(rows, xkey)
    if not pts:
        ax.text(0.5, 0.5, f"no rows with {metric} and {xlabel}", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        return
    names = list(pts)
    front = [names[i] for i in frontier([pts[n] for n in names])]
    cis = _intervals(rows)
    for name in names:
        color, marker = styles[name]
        on = name in front
        if name in cis:  # the 95 % interval of the metric: points whose bars overlap differ by less than the noise
            x, y = pts[name]
            ax.errorbar([x], [y], yerr=[[y - cis[name][0]], [cis[name][1] - y]], color=color, alpha=0.35, capsize=2, zorder=2)
        ax.scatter(*pts[name], s=70 if on else 40, marker=marker, color=color, edgecolors="black" if on else color, zorder=3, label=name)
    fx = [pts[n] for n in front]
    ax.step([x for x, _ in fx], [y for _, y in fx], where="post", color="tab:red", alpha=0.5, zorder=2, label="Pareto frontier")
    for i, name in enumerate(front):  # only the frontier is annotated; the legend names every point
        ax.annotate(name, pts[name], textcoords="offset points", xytext=(5, 5 if i % 2 == 0 else -11), fontsize=7)
    if log and min(x for x, _ in pts.values()) > 0:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels (2x10^-3, 3x10^-3, ...) overlap on a narrow range
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (test set)")
    ax.grid(alpha=0.3)


def pareto_png(
    rows: list[dict[str, Any]], path: Path, sweeps: dict[str, dict[str, Any]] | None = None, metric: str = "accuracy"
) -> Path:
    """Two panels: the task's primary metric (a row's ``accuracy``, named ``metric``) vs cost per 1k
    requests and vs p50 end-to-end latency, one point per endpoint (its cheapest / fastest load),
    the same colour and marker for an endpoint in both panels, its 95 % interval as an error bar
    where the row has ``accuracy_ci``, the Pareto frontier joined and its
    points annotated, every point named in the legend. The served cascade's threshold sweep (test
    split; the ``cascade`` endpoint's, else the first) is drawn as a dashed curve on the cost panel."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    cmap = plt.get_cmap("tab10")
    names = list(dict.fromkeys(r["name"] for r in rows))
    styles = {n: (cmap(i % 10), _MARKERS[i % len(_MARKERS)]) for i, n in enumerate(names)}
    _panel(a, rows, lambda r: r.get("cost_per_1k_usd"), "cost per 1k requests (USD)", log=True, metric=metric, styles=styles)
    _panel(b, rows, lambda r: (r.get("latency_ms") or {}).get("p50"), "p50 end-to-end latency (ms)", log=False, metric=metric, styles=styles)
    sweeps = sweeps or {}
    name = "cascade" if "cascade" in sweeps else next(iter(sweeps), None)
    if name is not None:
        sw = sweeps[name]
        pts = [(p["test"]["cost_per_1k_usd"], p["test"]["accuracy"]) for p in sw["sweep"] if p["test"]["cost_per_1k_usd"] is not None]
        if pts:
            pts.sort()
            a.plot([x for x, _ in pts], [y for _, y in pts], "--", color="tab:blue", alpha=0.5, label=f"sweep of {name}\n(test half)")
            ch = sw["chosen"]["test"]
            if ch["cost_per_1k_usd"] is not None:
                a.scatter([ch["cost_per_1k_usd"]], [ch["accuracy"]], marker="*", s=140, color="tab:blue", zorder=4,
                          label=f"recommended threshold {sw['chosen']['threshold']:.3g}")  # fmt: skip
    handles, labels = a.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.83, 0.5), fontsize=8, frameon=False)
    a.set_title(f"{metric} vs cost")
    b.set_title(f"{metric} vs latency")
    fig.tight_layout(rect=(0, 0, 0.82, 1))
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
