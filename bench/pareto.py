"""The Pareto frontier: the points no other point beats on both axes (cheaper/faster and at least
as accurate, or as cheap/fast and more accurate)."""

from __future__ import annotations

from collections.abc import Sequence


def frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, ``x`` to minimise (cost, latency) and ``y`` to maximise
    (accuracy), sorted by ``x``. Identical points are all kept."""
    keep = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox <= x and oy >= y) and (ox < x or oy > y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (points[i][0], -points[i][1]))
