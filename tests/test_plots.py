"""bench's figures, drawn from hand-made result dicts: pareto.png, reliability.png and latency.png.
Each test checks what the figure shows (axes, titles, lines and their data, labels that do not
collide) and that the file written is a PNG of the size the layout asks for."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest
from edgedistill.bench import plot, plot_load
from edgedistill.bench.config import Endpoint, make_config
from edgedistill.bench.run import _manifest_calibrations

from edgedistill.metrics import expected_calibration_error, reliability_bins

PNG = b"\x89PNG\r\n\x1a\n"
# the demo's endpoints: (cost per 1k, p50 ms, accuracy), several close together
DEMO = {
    "teacher": (0.0110, 410, 0.980), "gguf-q8_0": (0.0009, 31, 0.960), "gguf-q4_k_m": (0.0011, 38, 0.950),
    "onnx-int8": (0.0011, 39, 0.960), "onnx-int4": (0.0010, 35, 0.955), "gptq-int4": (0.0044, 166, 0.960),
    "cascade": (0.00095, 33, 0.960), "llama_cpp.server": (0.0020, 71, 0.945), "teacher-gguf-q4_k_m": (0.0031, 105, 0.975),
}  # fmt: skip


def png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG
    h, w = mpimg.imread(path).shape[:2]
    return w, h


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---- reliability.png ----------------------------------------------------------------------------


def calibration(conf: list[float], correct: list[int]) -> dict:
    """What bench.quality.calibration reports for an endpoint."""
    return {"n": len(conf), "ece": round(expected_calibration_error(conf, correct), 4), "bins": reliability_bins(conf, correct)}


def seven():
    cals = {}
    for i, name in enumerate(["teacher", "gguf-q8_0", "gguf-q4_k_m", "onnx-int8", "onnx-int4", "gptq-int4", "cascade"]):
        conf = [0.55 + 0.05 * (k % 9) for k in range(40 + i)]
        cals[name] = calibration(conf, [int(k % (3 + i) != 0) for k in range(40 + i)])
    return cals


def test_reliability_is_a_grid_with_one_diagram_per_endpoint(tmp_path):
    cals = seven()
    manifests = {
        "cascade": {
            "temperature": 1.37,
            "ece_before": 0.11,
            "ece_after": 0.02,
            "test": {"ece_before": 0.124, "ece_after": 0.029, "n": 47},
        }
    }
    fig = plot.reliability_figure(cals, manifests)
    axes = fig.axes
    assert len(axes) == 2 * 7  # a reliability diagram and its rows-per-bin histogram per endpoint
    diagrams, counts = axes[0::2], axes[1::2]
    # a grid of 3 columns (not one strip): 3 distinct column positions, 3 rows of diagrams
    fig.canvas.draw()
    assert len({round(a.get_position().x0, 3) for a in diagrams}) == 3
    assert len({round(a.get_position().y0, 3) for a in diagrams}) == 3
    # shared axes: every diagram reads on the same scales
    assert all(diagrams[0].get_shared_x_axes().joined(diagrams[0], a) for a in diagrams + counts)
    assert all(diagrams[0].get_shared_y_axes().joined(diagrams[0], a) for a in diagrams)
    for (name, cal), ax, cax in zip(cals.items(), diagrams, counts):
        assert ax.get_title().startswith(f"{name}: served ECE {cal['ece']:.3f} (n {cal['n']})")
        assert any(list(line.get_xdata()) == [0, 1] and list(line.get_ydata()) == [0, 1] for line in ax.get_lines())  # diagonal
        full = [b for b in cal["bins"] if b["count"]]
        bars = ax.patches[: len(full)]  # the accuracy bars, then the gap boxes
        assert [round(p.get_height(), 6) for p in bars] == [round(b["accuracy"], 6) for b in full]
        assert [p.get_height() for p in cax.patches] == [b["count"] for b in cal["bins"]]
        assert [t.get_text() for t in cax.texts] == [str(b["count"]) for b in full]
        assert cax.get_ylim()[1] > max(b["count"] for c in cals.values() for b in c["bins"])  # no count cut off
    # before / after calibration only where the manifest gives both
    assert "calibrated (T 1.37, test split, n 47): ECE 0.124 \u2192 0.029" in diagrams[-1].get_title()
    assert "calibrated" not in diagrams[0].get_title()
    w, h = png_size(plot.reliability_png(cals, tmp_path / "reliability.png", manifests))
    assert w / h < 1.5  # a readable grid, not a thin strip


def test_reliability_single_endpoint_and_calibration_line():
    fig = plot.reliability_figure({"ours": calibration([0.9, 0.8, 0.3], [1, 1, 0])})
    assert len(fig.axes) == 2
    line = plot._calibration_line
    assert line({"temperature": 2.0, "ece_before": 0.2, "ece_after": 0.05, "n": 300}) == (
        "calibrated (T 2, calibration split, n 300): ECE 0.200 \u2192 0.050"
    )
    assert line({"ece_before": 0.2}) is None and line(None) is None and line({"test": {"ece_after": 0.1}}) is None


def test_manifest_calibrations_come_from_the_endpoints_artifact_folders(tmp_path):
    good, plain, broken = tmp_path / "good", tmp_path / "plain", tmp_path / "broken"
    for d in (good, plain, broken):
        d.mkdir()
    block = {"method": "temperature", "temperature": 1.2, "ece_before": 0.1, "ece_after": 0.03}
    (good / "manifest.json").write_text(json.dumps({"kind": "artifact", "calibration": block}))
    (plain / "manifest.json").write_text(json.dumps({"kind": "artifact"}))
    (broken / "manifest.json").write_text("{not json")
    eps = [Endpoint("a", "http://x/v1", artifact=str(good)), Endpoint("b", "http://x/v1", artifact=str(plain)),
           Endpoint("c", "http://x/v1", artifact=str(broken)), Endpoint("d", "http://x/v1"),
           Endpoint("e", "http://x/v1", artifact=str(tmp_path / "missing"))]  # fmt: skip
    assert _manifest_calibrations(make_config(eps, out=tmp_path / "out", concurrency=[1])) == {"a": block}


# ---- latency.png --------------------------------------------------------------------------------


def load_rows(open_loop: bool = True) -> list[dict]:
    rows = []
    for name, (_, lat, _) in list(DEMO.items())[:3]:
        for c in (1, 4, 8):
            rows.append({"name": name, "mode": "closed", "concurrency": c, "rate": None, "offered_rate": None,
                         "latency_ms": {"p50": lat * c, "p90": lat * c * 1.5, "p99": lat * c * 2},
                         "ttft_ms": {"p50": lat * c / 2, "p90": lat * c, "p99": lat * c * 1.5},
                         "requests_per_s": c * 1000 / lat / c ** 0.5, "output_tokens_per_s": c * 9000 / lat})  # fmt: skip
        if open_loop:
            rows.append({"name": name, "mode": "open", "concurrency": None, "rate": 5.0, "offered_rate": 4.8,
                         "latency_ms": {"p50": lat, "p90": lat, "p99": lat}, "ttft_ms": None,
                         "requests_per_s": 4.7, "output_tokens_per_s": 50.0})  # fmt: skip
    rows.append({"name": "broken", "mode": "closed", "concurrency": 1, "rate": None, "offered_rate": None, "latency_ms": None,
                 "ttft_ms": None, "requests_per_s": None, "output_tokens_per_s": None})  # fmt: skip
    return rows


def test_latency_percentiles_and_throughput_against_concurrency_per_endpoint(tmp_path):
    rows = load_rows(open_loop=False)
    fig = plot_load.latency_figure(rows)
    assert len(fig.axes) == 8  # TTFT and latency at p50, p90, p99; requests/s and output tokens/s
    titles = [a.get_title() for a in fig.axes]
    for pct in ("p50", "p90", "p99"):
        assert f"closed loop: time to first token, {pct}" in titles and f"closed loop: end-to-end latency, {pct}" in titles
    assert "closed loop: throughput: requests" in titles and "closed loop: throughput: output tokens" in titles
    names = list(DEMO)[:3]
    by_title = dict(zip(titles, fig.axes))
    for title, key, pct in (("end-to-end latency, p90", "latency_ms", "p90"), ("time to first token, p99", "ttft_ms", "p99"),
                            ("throughput: output tokens", "output_tokens_per_s", None)):  # fmt: skip
        ax = by_title[f"closed loop: {title}"]
        assert [line.get_label() for line in ax.get_lines()] == names  # one line per endpoint; "broken" answered nothing
        for line, name in zip(ax.get_lines(), names):
            mine = [r for r in rows if r["name"] == name]
            assert list(line.get_xdata()) == [1, 4, 8]
            assert list(line.get_ydata()) == [r[key][pct] if pct else r[key] for r in mine]
    # the latency panels share one y range (p99 reads against p50), log: the teacher is >10x the student
    lat = [a for a in fig.axes if "latency" in a.get_title() or "first token" in a.get_title()]
    assert len({a.get_ylim() for a in lat}) == 1 and all(a.get_yscale() == "log" for a in lat)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [*names, "broken"]
    w, h = png_size(plot_load.latency_png(rows, tmp_path / "latency.png"))
    assert (w, h) == (1200, 1300)


def test_latency_open_loop_gets_its_own_columns(tmp_path):
    fig = plot_load.latency_figure(load_rows(open_loop=True))
    assert len(fig.axes) == 16
    opened = [a for a in fig.axes if a.get_title().startswith("open loop: ")]
    assert len(opened) == 8 and all("offered rate" in a.get_xlabel() for a in opened if a.get_xlabel())
    p50 = next(a for a in opened if a.get_title() == "open loop: end-to-end latency, p50")
    assert [list(line.get_xdata()) for line in p50.get_lines()] == [[4.8]] * 3  # the offered rate, not the asked 5
    ttft = next(a for a in opened if a.get_title() == "open loop: time to first token, p50")
    assert ttft.get_lines() == [] and ttft.texts[0].get_text() == "no answered requests"
    assert png_size(plot_load.latency_png(load_rows(), tmp_path / "l.png"))[0] > 2000


# ---- pareto.png ---------------------------------------------------------------------------------


def pareto_rows() -> list[dict]:
    rows = []
    for name, (cost, p50, acc) in DEMO.items():
        for c, f in ((1, 1.0), (4, 0.6)):
            rows.append({"name": name, "concurrency": c, "rate": None, "cost_per_1k_usd": cost * f, "latency_ms": {"p50": p50 / f},
                         "accuracy": acc, "accuracy_ci": [acc - 0.03, min(1.0, acc + 0.02)]})  # fmt: skip
    return rows


def sweep(chosen: float, cost: float) -> dict:
    pts = [
        {"threshold": t / 20, "test": {"cost_per_1k_usd": 0.0006 + (t / 20) ** 3 * 0.0066, "accuracy": 0.95 + 0.001 * t}}
        for t in range(21)
    ]
    return {"sweep": pts, "chosen": {"threshold": chosen, "test": {"cost_per_1k_usd": cost, "accuracy": 0.975}}}


def test_pareto_draws_the_served_cascades_sweep_only_and_labels_do_not_collide(tmp_path):
    sweeps = {"ours": sweep(0.5, 0.001), "cascade": sweep(0.93, 0.0011)}
    fig = plot.pareto_figure(pareto_rows(), sweeps)
    cost, latency = fig.axes
    dashed = [line for line in cost.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_label() for line in dashed] == ["threshold sweep of cascade\n(report split)"]
    assert not [line for line in latency.get_lines() if line.get_linestyle() == "--"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "cascade at the recommended\nthreshold 0.93 (report split)" in legend and "Pareto frontier" in legend
    assert set(DEMO) <= set(legend)  # every endpoint named once
    # labelled: the frontier, the served cascade and its recommended point; no two labels overlap
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in (cost, latency):
        texts = [t for t in ax.texts]
        boxes = [t.get_window_extent(renderer) for t in texts]
        assert all(not boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))
        assert "cascade" in [t.get_text() for t in texts] and "teacher" in [t.get_text() for t in texts]
    assert "cascade @ 0.93 (recommended)" in [t.get_text() for t in cost.texts]
    # an explicitly served endpoint's sweep wins over the name "cascade"
    fig2 = plot.pareto_figure(pareto_rows(), sweeps, served="ours")
    assert [line.get_label() for line in fig2.axes[0].get_lines() if line.get_linestyle() == "--"] == [
        "threshold sweep of ours\n(report split)"
    ]
    assert png_size(plot.pareto_png(pareto_rows(), tmp_path / "pareto.png", sweeps)) == (1560, 624)


def test_pareto_stars_the_threshold_the_cascade_is_served_at(tmp_path):
    """The sweep knows the served threshold (the cascade's /v1/models): the star is that point,
    labelled "served"; the sweep's own pick on the other half is only a small open diamond."""
    sw = sweep(0.93, 0.0011)
    t = 0.8
    sw["served"] = {"threshold": t, "test": {"cost_per_1k_usd": 0.0006 + t**3 * 0.0066, "accuracy": 0.966}}
    fig = plot.pareto_figure(pareto_rows(), {"cascade": sw})
    cost = fig.axes[0]
    legend = [x.get_text() for x in fig.legends[0].get_texts()]
    assert "cascade as served:\nthreshold 0.8 (report split)" in legend
    assert "the sweep's own pick:\nthreshold 0.93" in legend and not [x for x in legend if "recommended" in x]
    labels = [x.get_text() for x in cost.texts]
    assert "cascade @ 0.8 (served)" in labels and not [x for x in labels if "0.93" in x]
    star = next(c for c in cost.collections if c.get_label().startswith("cascade as served"))
    assert list(star.get_offsets()[0]) == pytest.approx([0.0006 + t**3 * 0.0066, 0.966])
    fig.canvas.draw()
    boxes = [x.get_window_extent(fig.canvas.get_renderer()) for x in cost.texts]
    assert all(not boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))
    sw["served"]["threshold"] = 0.93  # served at the sweep's pick: one star, no diamond
    legend = [x.get_text() for x in plot.pareto_figure(pareto_rows(), {"cascade": sw}).legends[0].get_texts()]
    assert "cascade as served:\nthreshold 0.93 (report split)" in legend and not [x for x in legend if "own pick" in x]
    png = tmp_path / "pareto-served.png"
    sw["served"]["threshold"] = t
    assert png_size(plot.pareto_png(pareto_rows(), png, {"cascade": sw})) == (1560, 624)


def test_place_labels_moves_a_label_off_its_neighbours():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    items = [("first long label", (5, 5)), ("second long label", (5.1, 5.05)), ("third long label", (4.9, 5.1))]
    anns = plot.place_labels(ax, items)
    fig.canvas.draw()
    boxes = [a.get_window_extent() for a in anns]
    assert all(not boxes[i].overlaps(boxes[j]) for i in range(3) for j in range(i))
    assert len({a.get_position() if a.xyann is None else a.xyann for a in anns}) == 3  # three different offsets


def test_place_labels_on_one_crowded_spot_overlap_no_text():
    """More labels on one spot than the nearest ring holds: the farther rings (with a leader line) take
    the rest. Their leader lines cross other labels; their texts must not (the cascade, its served star
    and the teacher sat on one spot of the demo's cost panel, and two labels were printed on each other)."""
    from matplotlib.text import Text

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    items = [(f"endpoint number {i}", (5 + 0.01 * i, 5)) for i in range(8)]
    anns = plot.place_labels(ax, items)
    fig.canvas.draw()
    boxes = [Text.get_window_extent(a) for a in anns]
    assert [(i, j) for i in range(8) for j in range(i) if boxes[i].overlaps(boxes[j])] == []
    assert any(a.arrow_patch is not None for a in anns)  # some went to a farther ring, with its leader line


def test_log_ticks_on_a_narrow_range_are_few_and_distinct():
    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_xlim(0.0024, 0.0095)  # less than a decade: matplotlib put 0.003 ... 0.009 there, labels touching
    plot.log_ticks(ax.xaxis, *ax.get_xlim())
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 0.0024 <= t <= 0.0095]
    assert 2 <= len(ticks) <= 4
    boxes = [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()]
    assert all(not boxes[i].overlaps(boxes[j]) for i in range(len(boxes)) for j in range(i))
    plot.log_ticks(ax.xaxis, 0.0005, 0.012)
    assert list(ax.xaxis.get_major_locator().tick_values(0, 1)) == pytest.approx([0.0005, 0.001, 0.002, 0.005, 0.01])
