"""The distillation report: every student against the teacher and against ``finetune`` of its own shape, over
one or several seeds, with a paired significance test, an accuracy/speedup Pareto plot and the training cost.

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
from scipy.stats import binomtest, ttest_rel

from pipeline.pareto import group_colours, pareto_front, plot_pareto

BASELINE = "finetune"
REPORT_FILE = "report.md"
PARETO_FILE = "report_pareto.png"
COST_FILE = "report_training_cost.png"
EARLY_EXIT_FILE = "report_early_exit.png"
SIGNIFICANCE = 0.05
TEACHER_SIGNALS = ("cached", "online", "none")


@dataclass(frozen=True)
class Spread:
    """A value over seeds: its mean and sample standard deviation (``None`` with a single seed)."""

    mean: float
    std: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        values = np.asarray(values, dtype=float)
        return cls(float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None)


@dataclass(frozen=True)
class StudentRow:
    """One line of the seed-style table; metric fields are fractions (0.873), not points."""

    name: str
    method: str
    layers: int
    hidden_size: int | None
    params: int
    compression: float
    dev: Spread
    test: Spread
    retention: Spread
    latency_ms: float
    speedup: float
    baseline: str | None
    gain: Spread | None
    within_noise: bool
    init_from: str = "teacher"
    # The same student shape fine-tuned from the teacher's own layers: a second baseline, which already carries a
    # transfer of the teacher's task knowledge.
    teacher_layers_baseline: str | None = None
    teacher_layers_gain: Spread | None = None


@dataclass(frozen=True)
class SeedTest:
    """A paired t-test over seeds of a student's test metric against its baseline's; ``p_holm`` is the p-value
    Holm-adjusted over every student tested against the same kind of baseline."""

    student: str
    baseline: str
    gain: Spread
    p_value: float
    p_holm: float


@dataclass(frozen=True)
class McNemar:
    """``b``: sentences the method gets right and the baseline wrong; ``c``: the reverse."""

    b: int
    c: int
    p_value: float


@dataclass(frozen=True)
class PairedTest:
    student: str
    baseline: str
    run: int  # position of the seed's summary in ``summaries``, from 0
    result: McNemar


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    pareto_png: Path
    cost_png: Path
    early_exit_png: Path | None = None  # only when a FastBERT student was swept

    def files(self) -> list[Path]:
        return [path for path in (self.markdown, self.pareto_png, self.cost_png, self.early_exit_png) if path]


def training_cost(epoch_seconds: float, train_rows: int, epochs: int, teacher: str) -> dict:
    """One entry of ``write_report``'s ``training``. ``teacher`` says how the method reads the teacher:
    ``cached`` logits cost one forward pass per train row, once, at label time, shared by every cached
    student; ``online`` signals cost one pass per train row per epoch; ``none`` (finetune) costs nothing."""
    if teacher not in TEACHER_SIGNALS:
        raise ValueError(f"teacher must be one of {TEACHER_SIGNALS}, not {teacher!r}")
    forwards = {"cached": train_rows, "online": train_rows * epochs, "none": 0}[teacher]
    return {"epoch_seconds": float(epoch_seconds), "teacher_forwards": forwards, "teacher": teacher}


def mcnemar(method_correct: np.ndarray, baseline_correct: np.ndarray) -> McNemar:
    """McNemar's exact test: under equal accuracy each discordant sentence is a fair coin, so ``b`` is
    Binomial(b + c, ½); the p-value is two-sided."""
    method_correct = np.asarray(method_correct, dtype=bool)
    baseline_correct = np.asarray(baseline_correct, dtype=bool)
    b = int(np.sum(method_correct & ~baseline_correct))
    c = int(np.sum(~method_correct & baseline_correct))
    # No discordant sentence: the two models agree everywhere, and nothing tells them apart.
    p_value = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return McNemar(b, c, p_value)


def _shape(student: dict) -> tuple[int, int | None]:
    return student["layers"], student["hidden_size"]


def init_from(student: dict) -> str:
    """Where a student's layers came from; summaries written before ``init_from`` existed copied the teacher's."""
    return student.get("init", {}).get("from", "teacher")


def _best_on_dev(candidates: list[str], students: Mapping[str, dict], metric: str) -> str | None:
    return max(candidates, key=lambda other: students[other]["dev"][metric], default=None)


def find_baseline(name: str, students: Mapping[str, dict], metric: str) -> str | None:
    """What a user would do without a teacher: the ``finetune`` student with the same layers and hidden size as
    ``name`` started from the pre-trained checkpoint; when several, the best on dev, so that a gain is measured
    against the strongest baseline chosen without looking at test. Without one (older runs), any ``finetune`` of
    the shape."""
    shaped = [other for other, s in students.items() if s["method"] == BASELINE and other != name
              and _shape(s) == _shape(students[name])]
    pretrained = [other for other in shaped if init_from(students[other]) == "pretrained"]
    if students[name]["method"] == BASELINE:
        # A finetune from the teacher's layers is measured against the pre-trained one; that one is the baseline.
        return None if init_from(students[name]) == "pretrained" else _best_on_dev(pretrained, students, metric)
    return _best_on_dev(pretrained or shaped, students, metric)


def find_teacher_layers_baseline(name: str, students: Mapping[str, dict], metric: str) -> str | None:
    """The ``finetune`` student of ``name``'s shape started from the teacher's layers, when the headline baseline
    is a pre-trained one (otherwise it is the headline baseline already)."""
    if students[name]["method"] == BASELINE:
        return None
    shaped = [other for other, s in students.items() if s["method"] == BASELINE
              and _shape(s) == _shape(students[name]) and init_from(s) == "teacher"]
    headline = find_baseline(name, students, metric)
    if headline is None or init_from(students[headline]) != "pretrained":
        return None
    return _best_on_dev(shaped, students, metric)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest p times (m − i), made monotone, capped at 1."""
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def seed_tests(summaries: Sequence[dict]) -> list[SeedTest]:
    """Every student against its headline baseline, paired by seed (students of one seed share its data order and
    test sentences), Holm-adjusted over the students compared; needs at least two seeds."""
    if len(summaries) < 2:
        return []
    metric = summaries[0]["metric"]
    pairs = []
    for row in student_rows(summaries):
        if row.baseline is None:
            continue
        test = np.array([x["students"][row.name]["test"][metric] for x in summaries])
        base = np.array([x["students"][row.baseline]["test"][metric] for x in summaries])
        # Identical per-seed results have no spread to test: nothing tells the two apart.
        p_value = 1.0 if np.allclose(test, base) else float(ttest_rel(test, base).pvalue)
        pairs.append((row, Spread.of(test - base), 1.0 if math.isnan(p_value) else p_value))
    adjusted = holm([p for *_, p in pairs])
    return [SeedTest(row.name, row.baseline, gain, p, p_holm)
            for (row, gain, p), p_holm in zip(pairs, adjusted, strict=True)]


def _check_summaries(summaries: Sequence[dict]) -> None:
    if not summaries:
        raise ValueError("the report needs at least one summary")
    first = summaries[0]
    for run, summary in enumerate(summaries[1:], start=1):
        if summary["metric"] != first["metric"] or set(summary["students"]) != set(first["students"]):
            raise ValueError(f"summary {run} has other students or another metric than summary 0: "
                             "every seed must run the same experiment")


def _row_order(item: tuple[str, dict]) -> tuple:
    # Widest shapes first (a null hidden size is the teacher's width), the finetune baseline heading its shape.
    name, s = item
    hidden = math.inf if s["hidden_size"] is None else s["hidden_size"]
    return -s["layers"], -hidden, s["method"] != BASELINE, name


def student_rows(summaries: Sequence[dict]) -> list[StudentRow]:
    """The seed-style table as data, one row per student, metrics averaged over the seeds' summaries.

    Retention and gain are computed per seed (student ÷ teacher, student − baseline, both on test) and then
    averaged. A gain is ``within_noise`` when, with several seeds, ``|mean gain| < sqrt(s_student² +
    s_baseline²)``, the two test metrics' sample standard deviations over seeds combined."""
    _check_summaries(summaries)
    metric, first = summaries[0]["metric"], summaries[0]["students"]
    # The baseline is chosen once for all seeds, on the dev metric averaged over them.
    mean_dev = {name: {**s, "dev": {metric: np.mean([x["students"][name]["dev"][metric] for x in summaries])}}
                for name, s in first.items()}
    teacher_test = np.array([x["teacher"]["test"][metric] for x in summaries])
    rows = []
    def gain_over(test: np.ndarray, other: str | None) -> Spread | None:
        if other is None:
            return None
        return Spread.of(test - np.array([x["students"][other]["test"][metric] for x in summaries]))

    for name, s in sorted(first.items(), key=_row_order):
        test = np.array([x["students"][name]["test"][metric] for x in summaries])
        baseline = find_baseline(name, mean_dev, metric)
        teacher_layers = find_teacher_layers_baseline(name, mean_dev, metric)
        gain, within_noise = gain_over(test, baseline), False
        if baseline is not None and len(summaries) > 1:
            base_test = np.array([x["students"][baseline]["test"][metric] for x in summaries])
            noise = math.hypot(Spread.of(test).std, Spread.of(base_test).std)
            within_noise = abs(gain.mean) < noise
        rows.append(StudentRow(
            name=name, method=s["method"], layers=s["layers"], hidden_size=s["hidden_size"], params=s["params"],
            compression=float(np.mean([x["students"][name]["compression"] for x in summaries])),
            dev=Spread.of([x["students"][name]["dev"][metric] for x in summaries]), test=Spread.of(test),
            retention=Spread.of(test / teacher_test),
            latency_ms=float(np.mean([x["students"][name]["latency_ms"] for x in summaries])),
            speedup=float(np.mean([x["students"][name]["speedup"] for x in summaries])),
            baseline=baseline, gain=gain, within_noise=within_noise, init_from=init_from(s),
            teacher_layers_baseline=teacher_layers, teacher_layers_gain=gain_over(test, teacher_layers),
        ))
    return rows


def paired_tests(summaries: Sequence[dict], predictions: Mapping[str, Sequence[np.ndarray]],
                 test_labels: np.ndarray) -> list[PairedTest]:
    """McNemar's test of every student against its finetune baseline, once per seed on the same test
    sentences (none for a regression metric). Seeds are not pooled: they share the sentences, so their
    discordant pairs are not independent and summing them would overstate the evidence."""
    _check_summaries(summaries)
    if summaries[0]["metric"] != "accuracy":
        return []
    labels = np.asarray(test_labels)
    correct = {}
    for name, runs in predictions.items():
        if len(runs) != len(summaries):
            raise ValueError(f"{name}: {len(runs)} prediction array(s) for {len(summaries)} summaries")
        for run, logits in enumerate(runs):
            if len(logits) != len(labels):
                raise ValueError(f"{name}, run {run}: {len(logits)} predictions for {len(labels)} test labels")
        correct[name] = [np.asarray(logits).argmax(-1) == labels for logits in runs]
    tests = []
    for row in student_rows(summaries):
        if row.baseline is None:
            continue
        missing = [n for n in (row.name, row.baseline) if n not in correct]
        if missing:
            raise ValueError(f"no test predictions for {', '.join(missing)}")
        tests.extend(PairedTest(row.name, row.baseline, run,
                                mcnemar(correct[row.name][run], correct[row.baseline][run]))
                     for run in range(len(summaries)))
    return tests


def _points(spread: Spread, signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{spread.mean * 100:{sign}.1f}"
    return text if spread.std is None else f"{text} ± {spread.std * 100:.1f}"


def _gain_cell(row: StudentRow) -> str:
    if row.gain is None:
        return "baseline" if row.method == BASELINE else "-"
    return _points(row.gain, signed=True) + (" (within noise)" if row.within_noise else "")


def _table(rows: list[StudentRow], metric: str) -> tuple[list[str], list[list[str]]]:
    headers = ["student", "method", "layers from", "layers", "hidden", "params", "compression", f"dev {metric}",
               f"test {metric}", "retention (test)", "latency ms", "speedup", f"gain over {BASELINE} (test)"]
    with_second = any(row.teacher_layers_baseline for row in rows)
    if with_second:
        headers.append(f"gain over {BASELINE} from teacher layers (test)")
    cells = [[row.name, row.method, row.init_from, str(row.layers),
              "full" if row.hidden_size is None else str(row.hidden_size),
              f"{row.params / 1e6:.1f}M", f"{row.compression:.1f}×", _points(row.dev), _points(row.test),
              _points(row.retention) + "%", f"{row.latency_ms:.1f}", f"{row.speedup:.1f}×", _gain_cell(row),
              *([_points(row.teacher_layers_gain, signed=True) if row.teacher_layers_gain else "-"]
                if with_second else [])]
             for row in rows]
    return headers, cells


def report_table(summaries: Sequence[dict]) -> Table:
    """The seed-style table for the terminal (metrics in points, ×100)."""
    headers, cells = _table(student_rows(summaries), summaries[0]["metric"])
    seeds = len(summaries)
    title = f"{summaries[0]['experiment']}: distillation report"
    title += f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""
    table = Table(title=title)
    for column in headers:
        table.add_column(column, justify="left" if column in ("student", "method") else "right")
    for row in cells:
        table.add_row(*row, style="yellow" if "(within noise)" in row[12] else None)
    return table


def _markdown_table(headers: list[str], cells: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(row) + " |" for row in cells)]


def _teacher_line(summaries: Sequence[dict]) -> str:
    metric, teacher = summaries[0]["metric"], summaries[0]["teacher"]
    dev = Spread.of([x["teacher"]["dev"][metric] for x in summaries])
    test = Spread.of([x["teacher"]["test"][metric] for x in summaries])
    latency = np.mean([x["teacher"]["latency_ms"] for x in summaries])
    tuned = ", fine-tuned" if teacher.get("fine_tuned") else ""
    return (f"**Teacher** (`{teacher.get('source', '?')}`{tuned}): dev {metric} {_points(dev)}, test {metric} "
            f"{_points(test)}; {teacher['params'] / 1e6:.1f}M parameters, {latency:.1f} ms latency.")


def _noise_notes(summaries: Sequence[dict], n_test: int) -> list[str]:
    seeds, metric = len(summaries), summaries[0]["metric"]
    notes = ["Metrics are in points (×100). Retention is the student's test metric ÷ the teacher's; the gain is "
             f"the student's test metric − that of the `{BASELINE}` student with the same layers and hidden size "
             "(the best on dev when there are several; `-` when there is none), in points."]
    if seeds > 1:
        notes.append(f"Each metric cell is the mean ± sample standard deviation over {seeds} seeds; retention and "
                     "gain are computed per seed, then averaged; latency and speedup are means. A gain is marked "
                     "*within noise* when |mean gain| < √(s_student² + s_baseline²), the two test metrics' "
                     "standard deviations over seeds combined: the difference is smaller than the seed-to-seed spread.")
    else:
        notes.append("One seed: there is no spread over seeds, so no gain is marked *within noise*; the paired test "
                     "below is the evidence for a difference.")
    if metric == "accuracy":
        teacher_accuracy = float(np.mean([x["teacher"]["test"][metric] for x in summaries]))
        # The 95% normal interval of a binomial proportion: how far a test accuracy moves by sampling alone.
        half_width = 1.96 * math.sqrt(teacher_accuracy * (1 - teacher_accuracy) / n_test) * 100
        notes.append(f"On {n_test:,} test sentences an accuracy near {teacher_accuracy * 100:.0f}% is good to about "
                     f"±{half_width:.1f} points (95% binomial interval, 1.96·√(p(1−p)/n)); smaller differences "
                     "between two models are not evidence on their own.")
    return [f"- {note}" for note in notes]


def _paired_section(tests: list[PairedTest], seeds: int, metric: str) -> list[str]:
    lines = [f"## Paired test against {BASELINE}", ""]
    if metric != "accuracy":
        return lines + [f"McNemar's test compares right and wrong answers; it does not apply to {metric}.", ""]
    if not tests:
        return lines + [f"No student has a `{BASELINE}` student of its shape to be compared with.", ""]
    explanation = ("McNemar's exact test on the same test sentences: *b* counts the sentences the student gets right "
                   "and its baseline wrong, *c* the reverse; p is the two-sided binomial test of *b* against "
                   "Binomial(b + c, ½).")
    if seeds > 1:
        explanation += (" Each seed is tested on its own and not pooled: the seeds share the sentences, so their "
                        "discordant pairs are not independent and summing them would overstate the evidence.")
    rows = [[t.student, t.baseline, str(t.run + 1), str(t.result.b), str(t.result.c), f"{t.result.p_value:.3g}"]
            for t in tests]
    lines += [explanation, "", *_markdown_table(["student", "baseline", "seed run", "b", "c", "p"], rows), ""]
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
            *_markdown_table(["student", "baseline", "gain (test)", "p", "p (Holm)", "verdict"], rows), ""]


def _pareto_points(summaries: Sequence[dict], rows: list[StudentRow]) -> tuple[list[dict], str]:
    metric = summaries[0]["metric"]
    y = f"test_{metric}"
    teacher = {"name": "teacher", "method": "teacher", "speedup": 1.0,
               y: float(np.mean([x["teacher"]["test"][metric] for x in summaries])) * 100}
    return [teacher, *({"name": r.name, "method": r.method, "speedup": r.speedup, y: r.test.mean * 100}
                       for r in rows)], y


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
            *_markdown_table(["student", "method", "seconds / epoch", "teacher forward passes"], cells), "",
            f"![Training cost per student]({COST_FILE})", ""]


def _mean_over_seeds(summaries: Sequence[dict], select) -> Spread:
    return Spread.of([select(summary) for summary in summaries])


def _ensemble_section(summaries: Sequence[dict], rows: list[StudentRow]) -> list[str]:
    """The ensemble's teachers and the ensemble itself, then every student that learned from it, against it."""
    if "ensemble" not in summaries[0]:
        return []
    metric, ensemble = summaries[0]["metric"], summaries[0]["ensemble"]
    cells = [[f"teacher {index + 1}", f"`{member['source']}` (train.seed {member['seed']})",
              _points(_mean_over_seeds(summaries, lambda x: x["ensemble"]["teachers"][index]["dev"][metric])),
              _points(_mean_over_seeds(summaries, lambda x: x["ensemble"]["teachers"][index]["test"][metric]))]
             for index, member in enumerate(ensemble["teachers"])]
    ensemble_test = np.array([x["ensemble"]["test"][metric] for x in summaries])
    cells.append([f"**ensemble of {len(ensemble['teachers'])}**", "argmax of the averaged probabilities",
                  _points(_mean_over_seeds(summaries, lambda x: x["ensemble"]["dev"][metric])),
                  _points(Spread.of(ensemble_test))])
    learners = [row for row in rows if summaries[0]["students"][row.name].get("soft_labels") == "ensemble"]
    student_cells = [[row.name, row.method, _points(row.test),
                      _points(Spread.of(np.array([x["students"][row.name]["test"][metric] for x in summaries])
                                        / ensemble_test)) + "%"] for row in learners]
    return ["## Teacher ensemble", "",
            "Students with `soft_labels: ensemble` learn from the teachers' probabilities averaged at the student's "
            "temperature; the ensemble itself predicts the argmax of their probabilities averaged at T = 1.", "",
            *_markdown_table(["model", "what", f"dev {metric}", f"test {metric}"], cells), "",
            *_markdown_table(["student", "method", f"test {metric}", "retention of the ensemble (test)"],
                             student_cells), ""]


def _parameters_section(summaries: Sequence[dict], rows: list[StudentRow]) -> list[str]:
    """Parameters in the embedding tables and outside them: a small vocabulary (DualTrain) shrinks the first."""
    teacher = summaries[0]["teacher"].get("parameters")
    if teacher is None:
        return []

    def cells(name: str, parameters: dict, compression: list[str]) -> list[str]:
        return [name, f"{parameters['vocab_size']:,}", f"{parameters['params'] / 1e6:.2f}M",
                f"{parameters['embedding_params'] / 1e6:.2f}M", f"{parameters['non_embedding_params'] / 1e6:.2f}M",
                *compression]

    table = [cells("teacher", teacher, ["1.0×", "1.0×", "1.0×"])]
    for row in rows:
        student = summaries[0]["students"][row.name]
        if "parameters" in student:
            table.append(cells(row.name, student["parameters"], [
                f"{student['compression']:.1f}×", f"{student['compression_embeddings']:.1f}×",
                f"{student['compression_non_embedding']:.1f}×"]))
    return ["## Parameters: embedding tables and the rest", "",
            "Embedding tables are the word, position and token-type tables; the compression columns are the "
            "teacher's count ÷ the student's, over all parameters (the *compression* of the table above, embedding "
            "table included), over the tables alone and over the rest.", "",
            *_markdown_table(["model", "vocabulary", "params", "embedding tables", "the rest", "compression",
                              "compression (tables)", "compression (rest)"], table), ""]


EXIT_FIELDS = ("dev_accuracy", "test_accuracy", "avg_exit_layer", "latency_ms", "speedup")


def early_exit_curves(summaries: Sequence[dict]) -> dict[str, list[dict]]:
    """Per FastBERT student, its threshold sweep with every field averaged over the seeds' summaries."""
    curves = {}
    for name, student in summaries[0]["students"].items():
        if "early_exit" not in student:
            continue
        curves[name] = [{"speed": point["speed"], **{field: float(np.mean(
            [x["students"][name]["early_exit"][index][field] for x in summaries])) for field in EXIT_FIELDS}}
                        for index, point in enumerate(student["early_exit"])]
    return curves


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
        lines += [f"`{name}`:", "", *_markdown_table(
            ["threshold", "dev accuracy", "test accuracy", "mean exit layer (test)", "latency ms", "speedup"], cells), ""]
    return lines + [f"![Early exit: accuracy and speedup against the threshold]({EARLY_EXIT_FILE})", ""]


def write_report(workdir: Path, summaries: Sequence[dict], predictions: Mapping[str, Sequence[np.ndarray]],
                 test_labels: np.ndarray, training: Mapping[str, Mapping]) -> ReportPaths:
    """Write ``workdir/report.md`` and its two PNGs.

    ``summaries``: one ``summary.json`` dict per seed, all of the same experiment. ``predictions``: student
    name → its test logits, one array per seed in the order of ``summaries``, rows in the order of the test
    split. ``test_labels``: the test split's labels (the split does not depend on the seed). ``training``:
    student name → ``training_cost(...)`` (``epoch_seconds``, ``teacher_forwards``, ``teacher``), for every
    student."""
    rows = student_rows(summaries)
    missing = [r.name for r in rows if r.name not in training]
    if missing:
        raise ValueError(f"no training cost for {', '.join(missing)}")
    metric, seeds = summaries[0]["metric"], len(summaries)
    tests = paired_tests(summaries, predictions, test_labels)
    workdir.mkdir(parents=True, exist_ok=True)
    points, y = _pareto_points(summaries, rows)
    pareto_png = plot_pareto(points, "speedup", y, workdir / PARETO_FILE,
                             f"{summaries[0]['experiment']}: test {metric} against speedup")
    cost_png = plot_training_cost(rows, training, workdir / COST_FILE)
    curves = early_exit_curves(summaries)
    early_exit_png = plot_early_exit(curves, workdir / EARLY_EXIT_FILE) if curves else None
    if early_exit_png is None:
        # An earlier experiment in the same workdir may have had FastBERT; its plot is not this report's.
        (workdir / EARLY_EXIT_FILE).unlink(missing_ok=True)
    front = ", ".join(f"{p['name']} ({p['speedup']:.1f}×, {p[y]:.1f})" for p in pareto_front(points, "speedup", y))
    headers, cells = _table(rows, metric)
    spread = f", mean ± std over {seeds} seeds" if seeds > 1 else ", one seed"
    lines = [f"# Distillation report: {summaries[0]['experiment']}", "",
             f"Metric: {metric} (points, ×100){spread}; {len(test_labels):,} test sentences.", "",
             _teacher_line(summaries), "",
             "## Students", "", *_markdown_table(headers, cells), "",
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
