"""The report's numbers: every student against the teacher and against the baseline of its own shape (a
student trained on gold labels alone, ``kd.methods.base.Method.is_baseline``), averaged
over the seeds' summaries, with McNemar's test per seed, a paired t-test across seeds (Holm-corrected) and the
training cost. Pure: summaries and predictions in, dataclasses out; ``pipeline.report`` writes them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import binomtest, ttest_rel

from pipeline.summary_schema import StudentSummary, Summary

TEACHER_SIGNALS = ("cached", "online", "none")
EXIT_FIELDS = ("dev_accuracy", "test_accuracy", "avg_exit_layer", "latency_ms", "speedup")


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
    is_baseline: bool
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


def _best_on_dev(candidates: list[str], students: Mapping[str, StudentSummary], metric: str) -> str | None:
    return max(candidates, key=lambda other: students[other].dev[metric], default=None)


def find_baseline(name: str, students: Mapping[str, StudentSummary], metric: str) -> str | None:
    """What a user would do without a teacher: the baseline student (``finetune``, or a BiLSTM on gold labels
    alone) of ``name``'s family, layers and hidden size, started from the pre-trained checkpoint; when several, the
    best on dev, so that a gain is measured against the strongest baseline chosen without looking at test. Without
    a pre-trained one, any baseline of the shape."""
    shaped = [other for other, s in students.items() if s.baseline and other != name
              and s.shape == students[name].shape]
    pretrained = [other for other in shaped if students[other].init_from == "pretrained"]
    if students[name].baseline:
        # A finetune from the teacher's layers is measured against the pre-trained one; that one is the baseline.
        return None if students[name].init_from == "pretrained" else _best_on_dev(pretrained, students, metric)
    return _best_on_dev(pretrained or shaped, students, metric)


def find_teacher_layers_baseline(name: str, students: Mapping[str, StudentSummary], metric: str) -> str | None:
    """The baseline student of ``name``'s shape started from the teacher's layers, when the headline baseline is
    a pre-trained one (otherwise it is the headline baseline already)."""
    if students[name].baseline:
        return None
    shaped = [other for other, s in students.items() if s.baseline
              and s.shape == students[name].shape and s.init_from == "teacher"]
    headline = find_baseline(name, students, metric)
    if headline is None or students[headline].init.from_ != "pretrained":
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


def _test_metric(summaries: Sequence[Summary], name: str) -> np.ndarray:
    """Student ``name``'s test metric, one value per seed."""
    return np.array([x.students[name].test[x.metric] for x in summaries])


def paired_p_value(test: np.ndarray, base: np.ndarray) -> float:
    """The paired t-test's p of one student's per-seed test metric against its baseline's."""
    # Identical per-seed results have no spread to test: nothing tells the two apart.
    p_value = 1.0 if np.allclose(test, base) else float(ttest_rel(test, base).pvalue)
    return 1.0 if math.isnan(p_value) else p_value


def seed_tests(summaries: Sequence[Summary]) -> list[SeedTest]:
    """Every student against its headline baseline, paired by seed (students of one seed share its data order and
    test sentences), Holm-adjusted over the students compared; needs at least two seeds."""
    if len(summaries) < 2:
        return []
    pairs = []
    for row in student_rows(summaries):
        if row.baseline is None:
            continue
        test, base = _test_metric(summaries, row.name), _test_metric(summaries, row.baseline)
        pairs.append((row, Spread.of(test - base), paired_p_value(test, base)))
    adjusted = holm([p for *_, p in pairs])
    return [SeedTest(row.name, row.baseline, gain, p, p_holm)
            for (row, gain, p), p_holm in zip(pairs, adjusted, strict=True)]


def _check_summaries(summaries: Sequence[Summary]) -> None:
    if not summaries:
        raise ValueError("the report needs at least one summary")
    first = summaries[0]
    for run, summary in enumerate(summaries[1:], start=1):
        if summary.metric != first.metric or set(summary.students) != set(first.students):
            raise ValueError(f"summary {run} has other students or another metric than summary 0: "
                             "every seed must run the same experiment")


def _row_order(item: tuple[str, StudentSummary]) -> tuple:
    # Deepest and widest shapes first (a null hidden size is the teacher's width), the baseline heading its shape.
    name, s = item
    hidden = math.inf if s.hidden_size is None else s.hidden_size
    return -s.layers, -hidden, s.family, not s.baseline, name


def student_rows(summaries: Sequence[Summary]) -> list[StudentRow]:
    """The seed-style table as data, one row per student, metrics averaged over the seeds' summaries.

    Retention and gain are computed per seed (student ÷ teacher, student − baseline, both on test) and then
    averaged. A gain is ``within_noise`` when, with several seeds, ``|mean gain| < sqrt(s_student² +
    s_baseline²)``, the two test metrics' sample standard deviations over seeds combined."""
    _check_summaries(summaries)
    metric, first = summaries[0].metric, summaries[0].students
    # The baseline is chosen once for all seeds, on the dev metric averaged over them.
    mean_dev = {name: s.model_copy(update={"dev": {metric: np.mean([x.students[name].dev[metric] for x in summaries])}})
                for name, s in first.items()}
    teacher_test = np.array([x.teacher.test[metric] for x in summaries])
    rows = []
    def gain_over(test: np.ndarray, other: str | None) -> Spread | None:
        if other is None:
            return None
        return Spread.of(test - _test_metric(summaries, other))

    for name, s in sorted(first.items(), key=_row_order):
        test = _test_metric(summaries, name)
        baseline = find_baseline(name, mean_dev, metric)
        teacher_layers = find_teacher_layers_baseline(name, mean_dev, metric)
        gain, within_noise = gain_over(test, baseline), False
        if baseline is not None and len(summaries) > 1:
            noise = math.hypot(Spread.of(test).std, Spread.of(_test_metric(summaries, baseline)).std)
            within_noise = abs(gain.mean) < noise
        rows.append(StudentRow(
            name=name, method=s.method, is_baseline=s.baseline, layers=s.layers, hidden_size=s.hidden_size, params=s.params,
            compression=float(np.mean([x.students[name].compression for x in summaries])),
            dev=Spread.of([x.students[name].dev[metric] for x in summaries]), test=Spread.of(test),
            retention=Spread.of(test / teacher_test),
            latency_ms=float(np.mean([x.students[name].latency_ms for x in summaries])),
            speedup=float(np.mean([x.students[name].speedup for x in summaries])),
            baseline=baseline, gain=gain, within_noise=within_noise, init_from=s.init.from_,
            teacher_layers_baseline=teacher_layers, teacher_layers_gain=gain_over(test, teacher_layers),
        ))
    return rows


def paired_tests(summaries: Sequence[Summary], predictions: Mapping[str, Sequence[np.ndarray]],
                 test_labels: np.ndarray) -> list[PairedTest]:
    """McNemar's test of every student against its baseline, once per seed on the same test
    sentences (none for a regression metric). Seeds are not pooled: they share the sentences, so their
    discordant pairs are not independent and summing them would overstate the evidence."""
    _check_summaries(summaries)
    if summaries[0].metric != "accuracy":
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


def early_exit_curves(summaries: Sequence[Summary]) -> dict[str, list[dict]]:
    """Per FastBERT student, its threshold sweep with every field averaged over the seeds' summaries."""
    curves = {}
    for name, student in summaries[0].students.items():
        if student.early_exit is None:
            continue
        curves[name] = [{"speed": point.speed, **{field: float(np.mean(
            [getattr(x.students[name].early_exit[index], field) for x in summaries])) for field in EXIT_FIELDS}}
                        for index, point in enumerate(student.early_exit)]
    return curves
