"""The distillation report: ``report.md`` (every student against the teacher and against the baseline of its
own shape, a student of its family trained on gold labels alone, over one or several seeds, with the significance
tests, the Pareto set and the training cost), its figures, and the same table for the terminal. The numbers come from ``pipeline.report_stats``, the figures from
``pipeline.report_plots``.

Pure: summaries, predictions and costs in, ``report.md`` and PNGs out. No Ray and no MLflow here; the caller
collects the inputs and logs the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from rich.table import Table

from pipeline.pareto import pareto_front
from pipeline.report_plots import pareto_points, plot_early_exit, plot_metric_against_speedup, plot_training_cost
from pipeline.report_stats import (PairedTest, SeedTest, Spread, StudentRow, early_exit_curves, paired_tests,
                                   seed_tests, student_rows)
from pipeline.summary_schema import ParameterBreakdown, Summary

REPORT_FILE = "report.md"
PARETO_FILE = "report_pareto.png"
COST_FILE = "report_training_cost.png"
EARLY_EXIT_FILE = "report_early_exit.png"
SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    pareto_png: Path
    cost_png: Path
    early_exit_png: Path | None = None  # only when a FastBERT student was swept

    def files(self) -> list[Path]:
        return [path for path in (self.markdown, self.pareto_png, self.cost_png, self.early_exit_png) if path]


def _points(spread: Spread, signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{spread.mean * 100:{sign}.1f}"
    return text if spread.std is None else f"{text} ± {spread.std * 100:.1f}"


def _gain_cell(row: StudentRow) -> str:
    if row.gain is None:
        return "baseline" if row.is_baseline else "-"
    return _points(row.gain, signed=True) + (" (within noise)" if row.within_noise else "")


def _table(rows: list[StudentRow], metric: str) -> tuple[list[str], list[list[str]]]:
    headers = ["student", "method", "layers from", "layers", "hidden", "params", "compression", f"dev {metric}",
               f"test {metric}", "retention (test)", "latency ms", "speedup", "gain over baseline (test)"]
    with_second = any(row.teacher_layers_baseline for row in rows)
    if with_second:
        headers.append("gain over baseline from teacher layers (test)")
    cells = [[row.name, row.method, row.init_from, str(row.layers),
              "full" if row.hidden_size is None else str(row.hidden_size),
              f"{row.params / 1e6:.1f}M", f"{row.compression:.1f}×", _points(row.dev), _points(row.test),
              _points(row.retention) + "%", f"{row.latency_ms:.1f}", f"{row.speedup:.1f}×", _gain_cell(row),
              *([_points(row.teacher_layers_gain, signed=True) if row.teacher_layers_gain else "-"]
                if with_second else [])]
             for row in rows]
    return headers, cells


def report_table(summaries: Sequence[Summary]) -> Table:
    """The seed-style table for the terminal (metrics in points, ×100)."""
    headers, cells = _table(student_rows(summaries), summaries[0].metric)
    seeds = len(summaries)
    title = f"{summaries[0].experiment}: distillation report"
    title += f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""
    table = Table(title=title)
    for column in headers:
        table.add_column(column, justify="left" if column in ("student", "method") else "right")
    for row in cells:
        table.add_row(*row, style="yellow" if "(within noise)" in row[12] else None)
    return table


def markdown_table(headers: list[str], cells: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(row) + " |" for row in cells)]


def _teacher_line(summaries: Sequence[Summary]) -> str:
    metric, teacher = summaries[0].metric, summaries[0].teacher
    dev = Spread.of([x.teacher.dev[metric] for x in summaries])
    test = Spread.of([x.teacher.test[metric] for x in summaries])
    latency = np.mean([x.teacher.latency_ms for x in summaries])
    tuned = ", fine-tuned" if teacher.fine_tuned else ""
    return (f"**Teacher** (`{teacher.source}`{tuned}): dev {metric} {_points(dev)}, test {metric} "
            f"{_points(test)}; {teacher.params / 1e6:.1f}M parameters, {latency:.1f} ms latency.")


def _noise_notes(summaries: Sequence[Summary], n_test: int) -> list[str]:
    seeds, metric = len(summaries), summaries[0].metric
    notes = ["Metrics are in points (×100). Retention is the student's test metric ÷ the teacher's; the gain is "
             "the student's test metric − that of the baseline with the same family, layers and hidden size (a "
             "student trained on gold labels alone, such as `finetune`; from the pre-trained checkpoint "
             "when there is one, the best on dev when there are several; `-` when there is none), in "
             "points."]
    if seeds > 1:
        notes.append(f"Each metric cell is the mean ± sample standard deviation over {seeds} seeds; retention and "
                     "gain are computed per seed, then averaged; latency and speedup are means. A gain is marked "
                     "*within noise* when |mean gain| < √(s_student² + s_baseline²), the two test metrics' "
                     "standard deviations over seeds combined: the difference is smaller than the seed-to-seed spread.")
    else:
        notes.append("One seed: there is no spread over seeds, so no gain is marked *within noise*; the paired test "
                     "below is the evidence for a difference.")
    if metric == "accuracy":
        teacher_accuracy = float(np.mean([x.teacher.test[metric] for x in summaries]))
        # The 95% normal interval of a binomial proportion: how far a test accuracy moves by sampling alone.
        half_width = 1.96 * math.sqrt(teacher_accuracy * (1 - teacher_accuracy) / n_test) * 100
        notes.append(f"On {n_test:,} test sentences an accuracy near {teacher_accuracy * 100:.0f}% is good to about "
                     f"±{half_width:.1f} points (95% binomial interval, 1.96·√(p(1−p)/n)); smaller differences "
                     "between two models are not evidence on their own.")
    return [f"- {note}" for note in notes]


def _paired_section(tests: list[PairedTest], seeds: int, metric: str) -> list[str]:
    lines = ["## Paired test against the baseline", ""]
    if metric != "accuracy":
        return lines + [f"McNemar's test compares right and wrong answers; it does not apply to {metric}.", ""]
    if not tests:
        return lines + ["No student has a baseline of its shape to be compared with.", ""]
    explanation = ("McNemar's exact test on the same test sentences: *b* counts the sentences the student gets right "
                   "and its baseline wrong, *c* the reverse; p is the two-sided binomial test of *b* against "
                   "Binomial(b + c, ½).")
    if seeds > 1:
        explanation += (" Each seed is tested on its own and not pooled: the seeds share the sentences, so their "
                        "discordant pairs are not independent and summing them would overstate the evidence.")
    rows = [[t.student, t.baseline, str(t.run + 1), str(t.result.b), str(t.result.c), f"{t.result.p_value:.3g}"]
            for t in tests]
    lines += [explanation, "", *markdown_table(["student", "baseline", "seed run", "b", "c", "p"], rows), ""]
    if seeds > 1:
        significant: dict[str, int] = {}
        for test in tests:
            significant[test.student] = significant.get(test.student, 0) + (test.result.p_value < SIGNIFICANCE)
        lines += [f"- `{name}`: p < {SIGNIFICANCE} in {count} of {seeds} seed runs"
                  for name, count in significant.items()]
        lines.append("")
    return lines


def _seed_test_section(tests: list[SeedTest]) -> list[str]:
    if not tests:
        return []
    rows = [[t.student, t.baseline, _points(t.gain, signed=True), f"{t.p_value:.3g}", f"{t.p_holm:.3g}",
             "differs" if t.p_holm < SIGNIFICANCE else "within noise"] for t in tests]
    return ["## Across seeds", "",
            "A paired t-test of each student's per-seed test metric against its baseline's (the students of one seed "
            "share its seed and test sentences), with Holm's correction for the number of students compared. With "
            "three seeds the test has two degrees of freedom: only a gain large against its spread reaches "
            f"p < {SIGNIFICANCE}.", "",
            *markdown_table(["student", "baseline", "gain (test)", "p", "p (Holm)", "verdict"], rows), ""]


def _cost_section(rows: list[StudentRow], training: Mapping[str, Mapping]) -> list[str]:
    cells = []
    for row in rows:
        cost = training[row.name]
        forwards = f"{cost['teacher_forwards']:,}" + (" (shared)" if cost["teacher"] == "cached" else "")
        cells.append([row.name, row.method, f"{cost['epoch_seconds']:.1f}", forwards])
    return ["## Training cost", "",
            "Cached-logit methods read soft labels from one teacher pass over the train rows, paid once and shared "
            "by every such student (marked *shared*); online methods run the teacher on every train row every "
            "epoch; `finetune` never runs it.", "",
            *markdown_table(["student", "method", "seconds / epoch", "teacher forward passes"], cells), "",
            f"![Training cost per student]({COST_FILE})", ""]


def _mean_over_seeds(summaries: Sequence[Summary], select) -> Spread:
    return Spread.of([select(summary) for summary in summaries])


def _ensemble_section(summaries: Sequence[Summary], rows: list[StudentRow]) -> list[str]:
    """The ensemble's teachers and the ensemble itself, then every student that learned from it, against it."""
    if summaries[0].ensemble is None:
        return []
    metric, ensemble = summaries[0].metric, summaries[0].ensemble
    cells = [[f"teacher {index + 1}", f"`{member.source}` (train.seed {member.seed})",
              _points(_mean_over_seeds(summaries, lambda x: x.ensemble.teachers[index].dev[metric])),
              _points(_mean_over_seeds(summaries, lambda x: x.ensemble.teachers[index].test[metric]))]
             for index, member in enumerate(ensemble.teachers)]
    ensemble_test = np.array([x.ensemble.test[metric] for x in summaries])
    cells.append([f"**ensemble of {len(ensemble.teachers)}**", "argmax of the averaged probabilities",
                  _points(_mean_over_seeds(summaries, lambda x: x.ensemble.dev[metric])),
                  _points(Spread.of(ensemble_test))])
    learners = [row for row in rows if summaries[0].students[row.name].soft_labels == "ensemble"]
    student_cells = [[row.name, row.method, _points(row.test),
                      _points(Spread.of(np.array([x.students[row.name].test[metric] for x in summaries])
                                        / ensemble_test)) + "%"] for row in learners]
    return ["## Teacher ensemble", "",
            "Students with `soft_labels: ensemble` learn from the teachers' probabilities averaged at the student's "
            "temperature; the ensemble itself predicts the argmax of their probabilities averaged at T = 1.", "",
            *markdown_table(["model", "what", f"dev {metric}", f"test {metric}"], cells), "",
            *markdown_table(["student", "method", f"test {metric}", "retention of the ensemble (test)"],
                             student_cells), ""]


def _parameters_section(summaries: Sequence[Summary], rows: list[StudentRow]) -> list[str]:
    """Parameters in the embedding tables and outside them: a small vocabulary (DualTrain) shrinks the first."""
    def cells(name: str, parameters: ParameterBreakdown, compression: list[str]) -> list[str]:
        return [name, f"{parameters.vocab_size:,}", f"{parameters.params / 1e6:.2f}M",
                f"{parameters.embedding_params / 1e6:.2f}M", f"{parameters.non_embedding_params / 1e6:.2f}M",
                *compression]

    table = [cells("teacher", summaries[0].teacher.parameters, ["1.0×", "1.0×", "1.0×"])]
    for row in rows:
        student = summaries[0].students[row.name]
        table.append(cells(row.name, student.parameters, [
            f"{student.compression:.1f}×", f"{student.compression_embeddings:.1f}×",
            f"{student.compression_non_embedding:.1f}×"]))
    return ["## Parameters: embedding tables and the rest", "",
            "Embedding tables are the word, position and token-type tables; the compression columns are the "
            "teacher's count ÷ the student's, over all parameters (the *compression* of the table above, embedding "
            "table included), over the tables alone and over the rest.", "",
            *markdown_table(["model", "vocabulary", "params", "embedding tables", "the rest", "compression",
                              "compression (tables)", "compression (rest)"], table), ""]


def _early_exit_section(curves: Mapping[str, list[dict]]) -> list[str]:
    if not curves:
        return []
    lines = ["## Early exit (FastBERT)", "",
             "Adaptive inference: after each layer a sample leaves with that layer's branch when the normalised "
             "entropy of its prediction is below the threshold (0: nobody leaves early). Accuracy and the mean exit "
             "layer are over all dev / test sentences; latency is timed like every other latency here (the same "
             "test batch), with per-sample exit inside the batch.", ""]
    for name, points in curves.items():
        cells = [[f"{p['speed']:g}", f"{p['dev_accuracy'] * 100:.1f}", f"{p['test_accuracy'] * 100:.1f}",
                  f"{p['avg_exit_layer']:.2f}", f"{p['latency_ms']:.1f}", f"{p['speedup']:.2f}×"] for p in points]
        lines += [f"`{name}`:", "", *markdown_table(
            ["threshold", "dev accuracy", "test accuracy", "mean exit layer (test)", "latency ms", "speedup"], cells), ""]
    return lines + [f"![Early exit: accuracy and speedup against the threshold]({EARLY_EXIT_FILE})", ""]


def write_report(workdir: Path, summaries: Sequence[Summary], predictions: Mapping[str, Sequence[np.ndarray]],
                 test_labels: np.ndarray, training: Mapping[str, Mapping]) -> ReportPaths:
    """Write ``workdir/report.md`` and its two PNGs.

    ``summaries``: one summary per seed, all of the same experiment. ``predictions``: student
    name → its test logits, one array per seed in the order of ``summaries``, rows in the order of the test
    split. ``test_labels``: the test split's labels (the split does not depend on the seed). ``training``:
    student name → ``training_cost(...)`` (``epoch_seconds``, ``teacher_forwards``, ``teacher``), for every
    student."""
    rows = student_rows(summaries)
    missing = [r.name for r in rows if r.name not in training]
    if missing:
        raise ValueError(f"no training cost for {', '.join(missing)}")
    metric, seeds = summaries[0].metric, len(summaries)
    tests = paired_tests(summaries, predictions, test_labels)
    workdir.mkdir(parents=True, exist_ok=True)
    points, y = pareto_points(summaries, rows)
    pareto_png = plot_metric_against_speedup(points, y, workdir / PARETO_FILE, summaries[0].experiment, metric)
    cost_png = plot_training_cost(rows, training, workdir / COST_FILE)
    curves = early_exit_curves(summaries)
    early_exit_png = plot_early_exit(curves, workdir / EARLY_EXIT_FILE) if curves else None
    if early_exit_png is None:
        # An earlier experiment in the same workdir may have had FastBERT; its plot is not this report's.
        (workdir / EARLY_EXIT_FILE).unlink(missing_ok=True)
    front = ", ".join(f"{p['name']} ({p['speedup']:.1f}×, {p[y]:.1f})" for p in pareto_front(points, "speedup", y))
    headers, cells = _table(rows, metric)
    spread = f", mean ± std over {seeds} seeds" if seeds > 1 else ", one seed"
    lines = [f"# Distillation report: {summaries[0].experiment}", "",
             f"Metric: {metric} (points, ×100){spread}; {len(test_labels):,} test sentences.", "",
             _teacher_line(summaries), "",
             "## Students", "", *markdown_table(headers, cells), "",
             "### Noise", "", *_noise_notes(summaries, len(test_labels)), "",
             *_paired_section(tests, seeds, metric),
             *_seed_test_section(seed_tests(summaries)),
             *_ensemble_section(summaries, rows),
             *_parameters_section(summaries, rows),
             f"## {metric.capitalize()} against speedup", "",
             f"Pareto set (no other model is at least as fast and as good on test, and better in one): {front}.", "",
             f"![Test {metric} against speedup]({PARETO_FILE})", "",
             *_early_exit_section(curves),
             *_cost_section(rows, training)]
    markdown = workdir / REPORT_FILE
    markdown.write_text("\n".join(lines))
    return ReportPaths(markdown, pareto_png, cost_png, early_exit_png)
