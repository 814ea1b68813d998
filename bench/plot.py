"""PNG figures: ``pareto.png`` (the task's metric vs cost per 1k requests and vs p50 latency, one
point per endpoint, the frontier and the served cascade emphasised) and ``reliability.png`` (one
reliability diagram per endpoint, in a grid); ``latency.png`` is bench/plot_load.py's. Pure: report
dicts in, a file out. matplotlib is imported lazily (``_plt``), with the Agg backend (no display)."""

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


def endpoint_styles(names: list[str]) -> dict[str, tuple[Any, str]]:
    """(colour, marker) per endpoint in order: the same endpoint looks the same in every figure."""
    cmap = _plt().get_cmap("tab10")
    return {n: (cmap(i % 10), _MARKERS[i % len(_MARKERS)]) for i, n in enumerate(names)}


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


_OFFSETS = [(k * dx, k * dy) for k in (1, 2.2, 3.6, 5.5) for dx, dy in ((6, 4), (6, -12), (-6, 4), (-6, -12), (0, 9), (0, -17))]


def place_labels(ax, items: list[tuple[str, tuple[float, float]]], fontsize: float = 7.5) -> list[Any]:
    """Annotate each (text, data point) where the text overlaps no label placed before it and no
    other point, inside the axes: offsets are tried nearest first (right, left, above, below, then
    farther out, with a leader line); a label that fits nowhere takes the offset with the fewest
    conflicts (a label overlapped counts most, then leaving the axes, then a point covered). Call
    once the layout is final (the check is in display coordinates). Returns the annotations."""
    renderer = ax.figure.canvas.get_renderer()
    ax.figure.canvas.draw()
    pts = [ax.transData.transform(xy) for _, xy in items]
    taken: list[Any] = []
    out = []
    for i, (text, xy) in enumerate(items):
        others = [q for j, q in enumerate(pts) if j != i]
        best: tuple[tuple[int, int, int, int], tuple[float, float]] | None = None
        for k, (dx, dy) in enumerate(_OFFSETS):
            ann = _annotate(ax, text, xy, dx, dy, fontsize, leader=k >= 6)  # the farther rings: a leader line to the point
            box = text_box(ann, renderer)
            ann.remove()
            inside = ax.bbox.x0 <= box.x0 and box.x1 <= ax.bbox.x1 and ax.bbox.y0 <= box.y0 and box.y1 <= ax.bbox.y1
            clash = sum(box.padded(2).overlaps(t) for t in taken)
            covered = sum(bool(box.padded(6).contains(*q)) for q in others)
            score = (clash, int(not inside), covered, k)
            if best is None or score < best[0]:
                best = (score, (dx, dy))
            if score[:3] == (0, 0, 0):
                break
        assert best is not None
        ann = _annotate(ax, text, xy, *best[1], fontsize, leader=_OFFSETS.index(best[1]) >= 6)
        taken.append(text_box(ann, renderer))
        out.append(ann)
    return out


def text_box(ann, renderer) -> Any:
    """An annotation's text box in display coordinates, without its leader line (which crosses others)."""
    from matplotlib.text import Text

    ann.get_window_extent(renderer)  # places the text (update_positions) and its leader line
    return Text.get_window_extent(ann, renderer)


def _annotate(ax, text: str, xy: tuple[float, float], dx: float, dy: float, fontsize: float, leader: bool) -> Any:
    """One label at offset (dx, dy) points from its point, with a gray leader line to it or not."""
    return ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), fontsize=fontsize, zorder=7,
                       ha="left" if dx > 0 else "right" if dx < 0 else "center",
                       arrowprops={"arrowstyle": "-", "color": "gray", "lw": 0.5} if leader else None)  # fmt: skip


def log_ticks(axis, lo: float, hi: float) -> None:
    """Plain-number ticks on a log axis over [lo, hi]: 1, 2, 5 x 10^k, or on less than a decade a few
    of 1..9 x 10^k (matplotlib's own put every one there, and their labels ran into each other)."""
    import math

    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    ticks = [m * 10.0**k for k in decades for m in (1, 2, 5) if lo <= m * 10.0**k <= hi]
    if len(ticks) < 3:
        ticks = [m * 10.0**k for k in decades for m in range(1, 10) if lo <= m * 10.0**k <= hi]
        ticks = ticks[:: max(1, -(-len(ticks) // 4))]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _panel(ax, rows: list[dict[str, Any]], xkey, xlabel: str, log: bool, metric: str, styles: dict[str, tuple[Any, str]],
           served: str | None) -> list[tuple[str, tuple[float, float]]]:  # fmt: skip
    """The points, their intervals and the frontier; returns what to label (the frontier and the served cascade)."""
    pts = endpoint_points(rows, xkey)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} (test set)")
    ax.grid(alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, f"no rows with {metric} and {xlabel}", ha="center", va="center", transform=ax.transAxes)
        return []
    names = list(pts)
    front = [names[i] for i in frontier([pts[n] for n in names])]
    cis = _intervals(rows)
    for name in names:
        color, marker = styles[name]
        on = name in front
        if name in cis:  # the 95 % interval of the metric: points whose bars overlap differ by less than the noise
            x, y = pts[name]
            ax.errorbar([x], [y], yerr=[[y - cis[name][0]], [cis[name][1] - y]], color=color, alpha=0.3, lw=1, capsize=2, zorder=2)
        big = on or name == served
        ax.scatter(*pts[name], s=90 if big else 35, marker=marker, color=color, edgecolors="black" if big else "none",
                   linewidths=1.2 if big else 0, zorder=4 if big else 3, label=name)  # fmt: skip
    fx = [pts[n] for n in front]
    ax.step([x for x, _ in fx], [y for _, y in fx], where="post", color="tab:red", alpha=0.55, lw=2, zorder=2, label="Pareto frontier")
    if log and min(x for x, _ in pts.values()) > 0:
        ax.set_xscale("log")
    labels = [(n, pts[n]) for n in front]
    if served in pts and served not in front:
        labels.append((served, pts[served]))
    return labels


def served_sweep(sweeps: dict[str, dict[str, Any]] | None, served: str | None = None) -> str | None:
    """Which sweep pareto.png draws: the served cascade's (``served``, else the endpoint named
    ``cascade``, else the only or first one)."""
    sweeps = sweeps or {}
    for name in (served, "cascade"):
        if name in sweeps:
            return name
    return next(iter(sweeps), None)


def pareto_figure(rows: list[dict[str, Any]], sweeps: dict[str, dict[str, Any]] | None = None, metric: str = "accuracy",
                  served: str | None = None):  # fmt: skip
    """The figure of ``pareto.png``: two panels, the task's primary metric (a row's ``accuracy``,
    named ``metric``) vs cost per 1k requests and vs p50 end-to-end latency, one point per endpoint
    (its cheapest / fastest load), the same colour and marker for an endpoint in both panels (and in
    latency.png), its 95 % interval as an error bar where the row has ``accuracy_ci``. Emphasised:
    the Pareto frontier (joined, points outlined and labelled) and the served cascade (``served``,
    see ``served_sweep``): its point outlined and labelled, its threshold sweep on the report split
    as a dashed curve on the cost panel in its colour, the threshold it is served at a large star
    (``_mark_threshold``).
    Labels are placed where they overlap no other label or point; the legend names every point."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5.2))
    styles = endpoint_styles(list(dict.fromkeys(r["name"] for r in rows)))
    name = served_sweep(sweeps, served)
    la = _panel(a, rows, lambda r: r.get("cost_per_1k_usd"), "cost per 1k requests (USD)", log=True, metric=metric, styles=styles, served=name)
    lb = _panel(b, rows, lambda r: (r.get("latency_ms") or {}).get("p50"), "p50 end-to-end latency (ms)", log=False, metric=metric,
                styles=styles, served=name)  # fmt: skip
    if name is not None:
        sw = sweeps[name]
        color = styles[name][0] if name in styles else "tab:blue"
        pts = sorted((p["test"]["cost_per_1k_usd"], p["test"]["accuracy"]) for p in sw["sweep"] if p["test"]["cost_per_1k_usd"] is not None)
        if pts:
            a.plot([x for x, _ in pts], [y for _, y in pts], "--", color=color, alpha=0.8, lw=1.3, zorder=2,
                   label=f"threshold sweep of {name}\n(report split)")  # fmt: skip
            _mark_threshold(a, la, name, sw, color)
    handles, labels = a.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.8, 0.5), fontsize=8, frameon=False)
    a.set_title(f"{metric} vs cost")
    b.set_title(f"{metric} vs latency")
    if a.get_xscale() == "log":  # once everything is drawn: the ticks follow the final range
        log_ticks(a.xaxis, *a.get_xlim())
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    place_labels(a, la)
    place_labels(b, lb)
    return fig


def _mark_threshold(ax, labels: list[tuple[str, tuple[float, float]]], name: str, sw: dict[str, Any], color: Any) -> None:
    """The star on the sweep: the threshold the cascade is SERVED at (``sw["served"]``, from its
    /v1/models), labelled so; the sweep's own pick, when different, a small open diamond in the
    legend only. A sweep without a served threshold (an endpoint that does not say it): its pick,
    labelled as the sweep's recommendation."""
    ch, served = sw["chosen"], sw.get("served")
    if served and served["test"].get("cost_per_1k_usd") is not None:
        xy = (served["test"]["cost_per_1k_usd"], served["test"]["accuracy"])
        ax.scatter(*xy, marker="*", s=260, color=color, edgecolors="black", linewidths=1.2, zorder=6,
                   label=f"{name} as served:\nthreshold {served['threshold']:.3g} (report split)")  # fmt: skip
        labels.append((f"{name} @ {served['threshold']:.3g} (served)", xy))
        if ch["threshold"] != served["threshold"] and ch["test"]["cost_per_1k_usd"] is not None:
            ax.scatter(ch["test"]["cost_per_1k_usd"], ch["test"]["accuracy"], marker="D", s=40, facecolors="none", edgecolors=color,
                       linewidths=1.2, zorder=5, label=f"the sweep's own pick:\nthreshold {ch['threshold']:.3g}")  # fmt: skip
    elif ch["test"]["cost_per_1k_usd"] is not None:
        xy = (ch["test"]["cost_per_1k_usd"], ch["test"]["accuracy"])
        ax.scatter(*xy, marker="*", s=260, color=color, edgecolors="black", linewidths=1.2, zorder=6,
                   label=f"{name} at the recommended\nthreshold {ch['threshold']:.3g} (report split)")  # fmt: skip
        labels.append((f"{name} @ {ch['threshold']:.3g} (recommended)", xy))


def pareto_png(rows: list[dict[str, Any]], path: Path, sweeps: dict[str, dict[str, Any]] | None = None, metric: str = "accuracy",
               served: str | None = None) -> Path:  # fmt: skip
    """``pareto.png``: see ``pareto_figure``."""
    plt = _plt()
    fig = pareto_figure(rows, sweeps, metric, served)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _calibration_line(block: dict[str, Any] | None) -> str | None:
    """The manifest's calibration as one line: ECE before -> after the fitted temperature, on the test
    split when compress measured it there (``test``), else on the calibration split; None when the
    manifest does not give both."""
    if not isinstance(block, dict):
        return None
    test = block.get("test") if isinstance(block.get("test"), dict) else {}
    src, where = (test, "test split") if test.get("ece_before") is not None and test.get("ece_after") is not None else (block, "calibration split")
    before, after = src.get("ece_before"), src.get("ece_after")
    if not isinstance(before, int | float) or not isinstance(after, int | float):
        return None
    n = src.get("n")
    t = block.get("temperature")
    temp = f"T {t:.3g}, " if isinstance(t, int | float) and not isinstance(t, bool) else ""
    return f"calibrated ({temp}{where}{f', n {n}' if n else ''}): ECE {before:.3f} \u2192 {after:.3f}"


def reliability_figure(calibrations: dict[str, dict[str, Any]], manifests: dict[str, dict[str, Any]] | None = None, ncols: int = 3):
    """The figure of ``reliability.png``: one reliability diagram per endpoint in a grid of up to
    ``ncols`` columns. Each: the accuracy of the student's own answer per confidence bin (bars; the
    red part is the gap to the bin's mean confidence, what ECE averages), the diagonal, the rows per
    bin below it, the bench's ECE in the title and, where ``manifests[name]`` (an artifact manifest's
    ``calibration`` block) gives both, its ECE before and after calibration. Axes are shared."""
    plt = _plt()
    names = list(calibrations)
    ncols = max(1, min(ncols, len(names)))
    nrows = max(1, -(-len(names) // ncols))
    fig = plt.figure(figsize=(4.4 * ncols, 4.6 * nrows + 0.9), layout="constrained")
    gs = fig.add_gridspec(2 * nrows, ncols, height_ratios=[3.2, 1.0] * nrows)
    manifests = manifests or {}
    ref = cref = None
    for k, name in enumerate(names):
        row, col = divmod(k, ncols)
        ax = fig.add_subplot(gs[2 * row, col], sharex=ref, sharey=ref)
        cax = fig.add_subplot(gs[2 * row + 1, col], sharex=ax, sharey=cref)
        ref, cref = ref or ax, cref or cax
        _reliability_panel(ax, cax, name, calibrations[name], manifests.get(name), first_col=col == 0)
    top = max([b["count"] for c in calibrations.values() for b in c["bins"]] + [1])
    if cref is not None:
        cref.set_ylim(0, top * 1.35)  # shared: room for the count above the tallest bar of any panel
    handles = [
        plt.Rectangle((0, 0), 1, 1, facecolor="#7fa8d1", edgecolor="black"),
        plt.Rectangle((0, 0), 1, 1, fill=False, hatch="////", edgecolor="tab:red"),
        plt.Line2D([], [], linestyle="--", color="gray"),
    ]
    labels = ["accuracy per confidence bin", "gap to the bin's mean confidence", "perfect calibration"]
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    fig.suptitle("Reliability of the served confidence on the test set (the student's own answers, 10 bins)", fontsize=11)
    return fig


def _reliability_panel(ax, cax, name: str, cal: dict[str, Any], manifest: dict[str, Any] | None, first_col: bool) -> None:
    bins = cal["bins"]
    full = [b for b in bins if b["count"]]
    width = 1.0 / len(bins)
    acc = [b["accuracy"] for b in full]
    conf = [b["confidence"] for b in full]
    ax.bar([b["lo"] for b in full], acc, width=width, align="edge", color="#7fa8d1", edgecolor="black", linewidth=0.6)
    # the gap, hatched and unfilled so that it reads the same above (overconfident) or inside (underconfident) a bar
    ax.bar([b["lo"] for b in full], [c - a for a, c in zip(acc, conf)], bottom=acc, width=width, align="edge",
           fill=False, hatch="////", edgecolor="tab:red", linewidth=0.8)  # fmt: skip
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.25)
    ax.tick_params(labelbottom=False, labelleft=first_col)
    if first_col:
        ax.set_ylabel("accuracy")
    title = f"{name}: served ECE {cal['ece']:.3f} (n {cal['n']})"
    line = _calibration_line(manifest)
    ax.set_title(title + (f"\n{line}" if line else ""), fontsize=9)
    counts = [b["count"] for b in bins]
    cax.bar([b["lo"] for b in bins], counts, width=width, align="edge", color="gray", alpha=0.6, edgecolor="black", linewidth=0.5)
    for b in full:
        cax.annotate(str(b["count"]), (b["lo"] + width / 2, b["count"]), ha="center", va="bottom", xytext=(0, 1),
                     textcoords="offset points", fontsize=7)  # fmt: skip
    cax.set_xlabel("served confidence")
    cax.tick_params(labelleft=first_col)
    if first_col:
        cax.set_ylabel("rows")


def reliability_png(
    calibrations: dict[str, dict[str, Any]], path: Path, manifests: dict[str, dict[str, Any]] | None = None
) -> Path:
    """``reliability.png``: see ``reliability_figure``."""
    plt = _plt()
    fig = reliability_figure(calibrations, manifests)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
