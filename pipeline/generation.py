"""A generation task's results (``task.task_type: seq2seq``): its ``summary.json`` built from the run's stages, the
terminal table, and ``report.md`` with its figure. Every student is compared, on the same test sentences, with the
baseline of its shape (a student of its family trained on gold targets alone, ``nll``): Koehn's paired bootstrap of
BLEU per seed, and a paired t-test of the per-seed test BLEU across seeds (Holm-corrected).

The classification report (``pipeline.report``) does not apply: a generator has no class predictions, and its
teacher is a masked LM that generates nothing, so there is no retention or speedup over it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from rich.table import Table
from transformers import AutoConfig, AutoModelForMaskedLM

from kd.generation import paired_bootstrap
from kd.layout import MLM_DIR, STUDENT_DIR
from pipeline.report_plots import plot_generation_scores
from pipeline import report_stats
from pipeline.report import markdown_table
from pipeline.report_stats import Spread, holm, paired_p_value
from pipeline.summary_schema import (BootstrapTest, CmlmTeacherSummary, GenerationStudentSummary, GenerationSummary,
                                     SoftTargetCost)
from kd.students import count_parameters
from stages.cmlm_teacher import read_pairs
from stages.evaluate_generation import TEST_BEAM

REPORT_FILE = "report.md"
SCORES_FILE = "report_bleu.png"
SIGNIFICANCE = 0.05
BOOTSTRAP_SAMPLES = 1000
SOFT_TARGETS = "cmlm_topk"  # the prepared corpus of the cmlm students (pipeline.runner.corpus_key)


def _parameters(config) -> int:
    """A masked LM's parameters, from its config alone (built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(AutoModelForMaskedLM.from_config(config))


def hypotheses(evaluate_dir: Path) -> list[str]:
    """A student's beam-search outputs on test, one per test pair, as its evaluation wrote them."""
    return (evaluate_dir / TEST_BEAM).read_text(encoding="utf-8").split("\n")[:-1]


def find_baseline(name: str, students: Mapping[str, GenerationStudentSummary]) -> str | None:
    """The baseline of ``name``'s shape, chosen as the classification report chooses it
    (``pipeline.report_stats.find_baseline``: from the pre-trained checkpoint when there is one, the best on dev
    among several); None for a baseline."""
    return None if students[name].baseline else report_stats.find_baseline(name, students, "bleu")


def build_generation_summary(exp, evaluations: dict, distills: dict, prepared: dict, train_rows: dict[str, int],
                             timings: dict[str, dict] | None = None) -> GenerationSummary:
    """``evaluations`` and ``distills``: stage artifacts by student name; ``prepared``: the shared stages' artifacts
    (``teacher`` is the C-MLM teacher); ``train_rows``: the pairs each student trained on; ``timings``: generation
    speeds taken together (``stages.evaluate_generation.time_generators``) by name, which replace each evaluation's
    own."""
    timings = timings or {}
    teacher_result = prepared["teacher"].result()
    teacher_config = AutoConfig.from_pretrained(prepared["teacher"].path / MLM_DIR)
    teacher = CmlmTeacherSummary(source=exp.teacher.source, params=_parameters(teacher_config),
                                 steps=teacher_result["steps"],
                                 masked_accuracy_before=teacher_result["masked_accuracy"]["before"],
                                 masked_accuracy_after=teacher_result["masked_accuracy"]["after"])
    soft_targets = None
    if SOFT_TARGETS in prepared:
        readings = prepared[SOFT_TARGETS].result()
        soft_targets = SoftTargetCost(**{name: readings[name] for name in SoftTargetCost.model_fields})
    students, results = {}, {name: evaluation.result() for name, evaluation in evaluations.items()}
    for spec in exp.students:
        result = results[spec.name]
        speed = timings.get(spec.name, result["latency"])
        trained = distills[spec.name].result()
        config = AutoConfig.from_pretrained(distills[spec.name].path / STUDENT_DIR)
        epochs = [h for h in trained.get("history", []) if "dev" in h]
        method = spec.method_object()
        students[spec.name] = GenerationStudentSummary(
            method=spec.method, family=method.family, baseline=method.is_baseline(),
            encoder_layers=config.encoder_layers, decoder_layers=config.decoder_layers, hidden_size=config.d_model,
            init=method.shape(spec.student, teacher_config).init, init_from=spec.student.init_from,
            selected_epoch=trained.get("selected_epoch"),
            dev=result["dev"], test=result["test"], params=result["params"], size_bytes=result["size_bytes"],
            sentences_per_second=speed["sentences_per_second"], ms_per_batch=speed["ms_per_batch"], epochs=len(epochs),
            epoch_seconds=float(np.mean([h["epoch_seconds"] for h in epochs])) if epochs else None,
            train_rows=train_rows[spec.name], evaluate_dir=evaluations[spec.name].path)
    _, references = read_pairs(prepared["data"].path, "test")
    for name, student in students.items():
        baseline = find_baseline(name, students)
        if baseline is None:
            continue
        lowercase = bool(results[name].get("lowercase", False))
        test = paired_bootstrap(hypotheses(student.evaluate_dir), hypotheses(students[baseline].evaluate_dir),
                                references, samples=BOOTSTRAP_SAMPLES, seed=exp.seed, lowercase=lowercase)
        student.against_baseline = BootstrapTest(baseline=baseline, difference=test["difference"],
                                                 ci95=test["ci95"], p_value=test["p_value"], samples=test["samples"])
    return GenerationSummary(experiment=exp.name, data_dir=prepared["data"].path, teacher=teacher,
                             soft_targets=soft_targets, students=students)


def _bleu(spread: Spread, signed: bool = False) -> str:
    text = f"{spread.mean:{'+' if signed else ''}.2f}"
    return text if spread.std is None else f"{text} ± {spread.std:.2f}"


def _over_seeds(summaries: Sequence[GenerationSummary], name: str, split: str, metric: str) -> Spread:
    return Spread.of([getattr(summary.students[name], split)[metric] for summary in summaries])


def _gain(summaries: Sequence[GenerationSummary], name: str) -> tuple[Spread, bool] | None:
    """Test BLEU minus the baseline's, per seed then averaged, and whether it is within the seed-to-seed spread."""
    baseline = find_baseline(name, summaries[0].students)
    if baseline is None:
        return None
    student = np.array([s.students[name].test["bleu"] for s in summaries])
    base = np.array([s.students[baseline].test["bleu"] for s in summaries])
    gain = Spread.of(student - base)
    noise = math.hypot(Spread.of(student).std or 0.0, Spread.of(base).std or 0.0)
    return gain, len(summaries) > 1 and abs(gain.mean) < noise


def _rows(summaries: Sequence[GenerationSummary]) -> tuple[list[str], list[list[str]]]:
    headers = ["student", "method", "encoder from", "encoder", "decoder", "width", "params", "dev BLEU", "test BLEU",
               "test BLEU (greedy)", "test ROUGE-L", "sentences/s", "gain over baseline (test BLEU)"]
    first = summaries[0].students
    order = sorted(first, key=lambda name: (-first[name].encoder_layers, -first[name].hidden_size,
                                            not first[name].baseline, name))
    cells = []
    for name in order:
        student, gain = first[name], _gain(summaries, name)
        gain_cell = ("baseline" if student.baseline else "-") if gain is None else (
            _bleu(gain[0], signed=True) + (" (within noise)" if gain[1] else ""))
        rouge = _over_seeds(summaries, name, "test", "rougeL")
        encoder_from = student.init_from if student.init == "teacher" else "random"
        cells.append([name, student.method, encoder_from, str(student.encoder_layers), str(student.decoder_layers),
                      str(student.hidden_size), f"{student.params / 1e6:.1f}M",
                      _bleu(_over_seeds(summaries, name, "dev", "bleu")), _bleu(_over_seeds(summaries, name, "test", "bleu")),
                      _bleu(_over_seeds(summaries, name, "test", "bleu_greedy")),
                      f"{rouge.mean:.4f}" + ("" if rouge.std is None else f" ± {rouge.std:.4f}"),
                      f"{np.mean([s.students[name].sentences_per_second for s in summaries]):.1f}", gain_cell])
    return headers, cells


def generation_table(summaries: Sequence[GenerationSummary]) -> Table:
    seeds = len(summaries)
    title = f"{summaries[0].experiment}: generation students (BLEU"
    title += f", mean ± std over {seeds} seeds)" if seeds > 1 else ")"
    headers, cells = _rows(summaries)
    table = Table(title=title)
    for column in headers:
        table.add_column(column, justify="left" if column in ("student", "method") else "right")
    for row in cells:
        table.add_row(*row, style="yellow" if "(within noise)" in row[-1] else None)
    return table


def _bootstrap_section(summaries: Sequence[GenerationSummary]) -> list[str]:
    rows = [[name, student.against_baseline.baseline, str(seed + 1), f"{student.against_baseline.difference:+.2f}",
             "[{:+.2f}, {:+.2f}]".format(*student.against_baseline.ci95), f"{student.against_baseline.p_value:.3g}"]
            for seed, summary in enumerate(summaries) for name, student in summary.students.items()
            if student.against_baseline is not None]
    lines = ["## Paired bootstrap against the baseline", ""]
    if not rows:
        return lines + ["No student has a baseline of its shape (a `nll` student of the same layers and width).", ""]
    samples = next(s.against_baseline.samples for s in summaries[0].students.values() if s.against_baseline)
    return lines + [
        f"Koehn's paired bootstrap on the same test sentences: {samples:,} resamples of the test set, corpus BLEU of "
        "both systems on each; p is two-sided. Each seed is tested on its own: the seeds share the sentences.", "",
        *markdown_table(["student", "baseline", "seed run", "Δ BLEU", "95% interval", "p"], rows), ""]


def _seed_section(summaries: Sequence[GenerationSummary]) -> list[str]:
    if len(summaries) < 2:
        return []
    pairs = []
    for name in summaries[0].students:
        baseline = find_baseline(name, summaries[0].students)
        if baseline is None:
            continue
        student = np.array([s.students[name].test["bleu"] for s in summaries])
        base = np.array([s.students[baseline].test["bleu"] for s in summaries])
        pairs.append((name, baseline, Spread.of(student - base), paired_p_value(student, base)))
    if not pairs:
        return []
    adjusted = holm([p for *_, p in pairs])
    rows = [[name, baseline, _bleu(gain, signed=True), f"{p:.3g}", f"{p_holm:.3g}",
             "differs" if p_holm < SIGNIFICANCE else "within noise"]
            for (name, baseline, gain, p), p_holm in zip(pairs, adjusted, strict=True)]
    return ["## Across seeds", "",
            "A paired t-test of each student's per-seed test BLEU against its baseline's, with Holm's correction for "
            "the number of students compared.", "",
            *markdown_table(["student", "baseline", "gain (test BLEU)", "p", "p (Holm)", "verdict"], rows), ""]


def _teacher_lines(summaries: Sequence[GenerationSummary]) -> list[str]:
    teacher, readings = summaries[0].teacher, summaries[0].soft_targets
    lines = [f"**C-MLM teacher** (`{teacher.source}`, {teacher.params / 1e6:.1f}M parameters, {teacher.steps:,} "
             f"steps): masked target tokens right on dev {teacher.masked_accuracy_before * 100:.1f}% before its "
             f"fine-tuning, {teacher.masked_accuracy_after * 100:.1f}% after."]
    if readings is not None:
        lines += ["", f"**Its readings** (stage `cmlm_topk`: top-{readings.k} at T = {readings.temperature:g}, "
                     f"{readings.rounds} masking rounds): {readings.rows:,} train pairs in {readings.seconds:.0f} s, "
                     f"{readings.rows_per_second:.1f} pairs/s."]
    return lines


def write_generation_report(workdir: Path, summaries: Sequence[GenerationSummary]) -> list[Path]:
    """``workdir/report.md`` and its figure, from one summary per seed; returns the files written."""
    first = summaries[0]
    for run, summary in enumerate(summaries[1:], start=1):
        if set(summary.students) != set(first.students):
            raise ValueError(f"summary {run} has other students than summary 0: every seed must run the same "
                             "experiment")
    seeds = len(summaries)
    headers, cells = _rows(summaries)
    sentences = int(next(iter(first.students.values())).test["sentences"])
    scores = {name: _over_seeds(summaries, name, "test", "bleu") for name in first.students}
    png = plot_generation_scores(scores, workdir / SCORES_FILE, first.experiment)
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    lines = [f"# Generation report: {first.experiment}", "",
             f"BLEU (sacreBLEU, 0-100) and ROUGE-L F1 with beam search unless marked greedy; {spread}; "
             f"{sentences:,} test pairs.", "", *_teacher_lines(summaries), "",
             "## Students", "", *markdown_table(headers, cells), "",
             "- The gain is the student's test BLEU − that of the baseline of its shape (`nll`: the same student "
             "on gold targets alone), per seed then averaged; *within noise* when |mean gain| is below the two "
             "BLEUs' seed-to-seed standard deviations combined.",
             "- Sentences per second: greedy generation of one test batch, every student timed together, in turn within "
             "each repeat, when the run finished.", "",
             *_bootstrap_section(summaries), *_seed_section(summaries),
             f"![Test BLEU per student]({SCORES_FILE})", ""]
    markdown = workdir / REPORT_FILE
    markdown.write_text("\n".join(lines))
    return [markdown, png]
