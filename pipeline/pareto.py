"""Accuracy against speed: the Pareto set of models, as a table-ready list and a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def pareto_front(points: list[dict], x: str, y: str) -> list[dict]:
    """Points no other point beats on both ``x`` (higher is better, e.g. speedup) and ``y`` (higher is better)."""
    front = []
    for point in points:
        dominated = any(
            other[x] >= point[x] and other[y] >= point[y] and (other[x] > point[x] or other[y] > point[y])
            for other in points
        )
        if not dominated:
            front.append(point)
    return sorted(front, key=lambda p: p[x])


def group_colours(names: Sequence[str]) -> dict[str, tuple]:
    """A colour of its own for each name: tab10 up to ten, tab20 beyond (the methods and the teacher are twelve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette, size = ("tab10", 10) if len(names) <= 10 else ("tab20", 20)
    return {name: plt.get_cmap(palette)(index % size) for index, name in enumerate(names)}


def plot_pareto(points: list[dict], x: str, y: str, path: Path, title: str, group: str = "method") -> Path:
    """Scatter of every point coloured by ``group``, the Pareto set joined and ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    names = sorted({p[group] for p in points})
    colours = group_colours(names)
    for name in names:
        members = [p for p in points if p[group] == name]
        axes.scatter([p[x] for p in members], [p[y] for p in members], label=name, alpha=0.75, color=colours[name])
    front = pareto_front(points, x, y)
    axes.plot([p[x] for p in front], [p[y] for p in front], color="black", linewidth=1, label="Pareto set")
    axes.scatter([p[x] for p in front], [p[y] for p in front], s=140, facecolors="none", edgecolors="black")
    axes.set_xlabel(x.replace("_", " "))
    axes.set_ylabel(y.replace("_", " "))
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
