"""The report's figures: test metric against speedup with its Pareto set, the training cost per student, and
FastBERT's early-exit sweep. Matplotlib is imported when a figure is drawn, with the file-only Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.pareto import group_colours, plot_pareto
from pipeline.report_stats import Spread, StudentRow
from pipeline.summary_schema import Summary


def pareto_points(summaries: Sequence[Summary], rows: list[StudentRow]) -> tuple[list[dict], str]:
    """The teacher and every student as points of the Pareto plot, test metric in points; also that metric's key."""
    metric = summaries[0].metric
    y = f"test_{metric}"
    teacher = {"name": "teacher", "method": "teacher", "speedup": 1.0,
               y: float(np.mean([x.teacher.test[metric] for x in summaries])) * 100}
    return [teacher, *({"name": r.name, "method": r.method, "speedup": r.speedup, y: r.test.mean * 100}
                       for r in rows)], y


def plot_metric_against_speedup(points: list[dict], y: str, path: Path, experiment: str, metric: str) -> Path:
    return plot_pareto(points, "speedup", y, path, f"{experiment}: test {metric} against speedup")


def plot_training_cost(rows: list[StudentRow], training: Mapping[str, Mapping], path: Path) -> Path:
    """Two bar charts side by side: seconds per epoch and teacher forward passes, per student; shared
    (cached-logit) passes hatched, since they are paid once for all such students."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in rows]
    methods = sorted({r.method for r in rows})
    colours = group_colours(methods)
    bar_colours = [colours[r.method] for r in rows]
    figure, (seconds_axes, forwards_axes) = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.6), dpi=120,
                                                         sharey=True)
    seconds_axes.barh(names, [training[n]["epoch_seconds"] for n in names], color=bar_colours)
    seconds_axes.set_xlabel("wall seconds per epoch")
    bars = forwards_axes.barh(names, [training[n]["teacher_forwards"] for n in names], color=bar_colours)
    for bar, name in zip(bars, names):
        if training[name]["teacher"] == "cached":
            bar.set_hatch("//")
    forwards_axes.set_xlabel("teacher forward passes (hatched: shared label pass)")
    seconds_axes.invert_yaxis()
    for axes in (seconds_axes, forwards_axes):
        axes.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in methods]
    forwards_axes.legend(handles, methods, fontsize=8, loc="lower right")
    figure.suptitle("Training cost per student")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_early_exit(curves: Mapping[str, list[dict]], path: Path) -> Path:
    """Test accuracy and speedup over the teacher against the exit threshold, a line per FastBERT student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (accuracy_axes, speedup_axes) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for name, points in curves.items():
        speeds = [p["speed"] for p in points]
        accuracy_axes.plot(speeds, [p["test_accuracy"] * 100 for p in points], marker="o", label=name)
        speedup_axes.plot(speeds, [p["speedup"] for p in points], marker="o", label=name)
    accuracy_axes.set_ylabel("test accuracy (points)")
    speedup_axes.set_ylabel("speedup over the teacher (×)")
    for axes in (accuracy_axes, speedup_axes):
        axes.set_xlabel("exit threshold (speed): normalised entropy below it exits")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("FastBERT early exit")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_generation_scores(scores: Mapping[str, Spread], path: Path, experiment: str) -> Path:
    """A generation task's students as bars of test BLEU, with the standard deviation over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    figure, axes = plt.subplots(figsize=(7, 0.45 * len(names) + 1.4), dpi=120)
    axes.barh(names, [scores[name].mean for name in names],
              xerr=[scores[name].std or 0.0 for name in names], color="#4c72b0", capsize=3)
    axes.invert_yaxis()
    axes.set_xlabel("test BLEU (beam)")
    axes.grid(axis="x", alpha=0.3)
    axes.set_title(f"{experiment}: test BLEU per student")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
