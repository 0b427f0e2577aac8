"""The distillation report on synthetic summaries and predictions: statistics, table cells, files."""

from __future__ import annotations

import io
from math import comb
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from pipeline.report import EARLY_EXIT_FILE, report_table, write_report
from pipeline.report_stats import (Spread, find_baseline, find_teacher_layers_baseline, holm, mcnemar, paired_tests,
                                   seed_tests, student_rows, training_cost)
from pipeline.summary_schema import Init, ParameterBreakdown, StudentSummary, Summary, TeacherSummary

N_TEST = 100


def breakdown(params: int, hidden_size: int = 384) -> ParameterBreakdown:
    return ParameterBreakdown(params=params, embedding_params=params // 2, word_embedding_params=params // 2 - 1000,
                              non_embedding_params=params - params // 2, vocab_size=30522, hidden_size=hidden_size)


def student(method: str, layers: int, dev: float, test: float, hidden_size: int | None = None,
            params: int = 10_000_000, latency_ms: float = 20.0, init_from: str = "teacher",
            metric: str = "accuracy", family: str = "transformer", baseline: bool | None = None) -> StudentSummary:
    return StudentSummary(
        method=method, family=family, baseline=method == "finetune" if baseline is None else baseline,
        layers=layers, init=Init(from_=init_from, layers="uniform"), selected_epoch=3,
        hidden_size=hidden_size, soft_labels="teacher", dev={metric: dev}, test={metric: test}, params=params,
        size_bytes=params * 4, latency_ms=latency_ms, throughput=32_000 / latency_ms,
        parameters=breakdown(params, hidden_size or 384), compression=20_000_000 / params,
        compression_embeddings=2.0, compression_non_embedding=2.0, speedup=60.0 / latency_ms,
        teacher_signals="none" if method == "finetune" else "cached", epochs=3, epoch_seconds=12.5, train_rows=1_000,
        evaluate_dir=Path("evaluate"))


def summary(students: dict, teacher_test: float = 0.90, metric: str = "accuracy") -> Summary:
    teacher = TeacherSummary(source="package:teacher", fine_tuned=True, dev={metric: 0.91},
                             test={metric: teacher_test}, params=20_000_000, size_bytes=80_000_000, latency_ms=60.0,
                             throughput=533.0, parameters=breakdown(20_000_000))
    return Summary(experiment="synthetic", metric=metric, data_dir=Path("data"), teacher=teacher, students=students)


def one_seed() -> Summary:
    return summary({
        "kd_3L": student("kd", 3, dev=0.86, test=0.855, latency_ms=30.0),
        "finetune_3L": student("finetune", 3, dev=0.85, test=0.84, latency_ms=30.0),
        "finetune_3L_128": student("finetune", 3, dev=0.80, test=0.80, hidden_size=128, params=2_000_000),
        "kd_3L_128": student("kd", 3, dev=0.81, test=0.83, hidden_size=128, params=2_000_000),
        "kd_4L": student("kd", 4, dev=0.87, test=0.87, latency_ms=40.0),
    })


def logits_for(correct: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Two-class logits whose argmax is the label where ``correct`` and the other class elsewhere."""
    predicted = np.where(correct, labels, 1 - labels)
    return np.eye(2)[predicted] * 2.0 - 1.0


def costs(names) -> dict:
    teacher = {"finetune": "none", "kd": "cached"}
    return {name: training_cost(12.5, 1_000, 3, teacher.get(name.split("_")[0], "online")) for name in names}


def test_mcnemar_matches_hand_computed_binomial():
    # 8 discordant sentences won by the method, 2 by the baseline, 90 concordant.
    method = np.array([True] * 8 + [False] * 2 + [True] * 60 + [False] * 30)
    baseline = np.array([False] * 8 + [True] * 2 + [True] * 60 + [False] * 30)
    result = mcnemar(method, baseline)
    hand = 2 * sum(comb(10, k) for k in range(3)) / 2 ** 10  # two-sided: P(X <= 2) + P(X >= 8), X ~ Bin(10, ½)
    assert (result.b, result.c) == (8, 2)
    assert result.p_value == pytest.approx(hand) == pytest.approx(0.109375)
    assert mcnemar(method, method).p_value == 1.0


def test_retention_and_gain_columns():
    rows = {row.name: row for row in student_rows([one_seed()])}
    kd = rows["kd_3L"]
    assert kd.retention.mean == pytest.approx(0.855 / 0.90)
    assert kd.retention.std is None
    assert kd.baseline == "finetune_3L"
    assert kd.gain.mean == pytest.approx(0.015)
    assert not kd.within_noise
    assert rows["kd_3L_128"].gain.mean == pytest.approx(0.03)
    assert rows["kd_4L"].gain is None and rows["finetune_3L"].gain is None
    assert kd.compression == pytest.approx(2.0) and kd.speedup == pytest.approx(2.0)


def test_finetune_is_matched_by_layers_and_hidden_size():
    students = one_seed().students
    assert find_baseline("kd_3L", students, "accuracy") == "finetune_3L"
    assert find_baseline("kd_3L_128", students, "accuracy") == "finetune_3L_128"
    assert find_baseline("kd_4L", students, "accuracy") is None
    assert find_baseline("finetune_3L", students, "accuracy") is None
    # Two finetune students of one shape: the better on dev is the baseline, whatever their test scores.
    students["finetune_3L_lr"] = student("finetune", 3, dev=0.88, test=0.70)
    assert find_baseline("kd_3L", students, "accuracy") == "finetune_3L_lr"


def three_seeds() -> list[Summary]:
    """``kd_3L`` beats its baseline by 1 point, less than the spread; ``pkd_3L`` by 10 points, far above it."""
    kd, finetune, pkd = (0.80, 0.83, 0.86), (0.81, 0.82, 0.83), (0.90, 0.91, 0.92)
    return [summary({"kd_3L": student("kd", 3, dev=0.8, test=kd[i]),
                     "pkd_3L": student("pkd", 3, dev=0.8, test=pkd[i]),
                     "finetune_3L": student("finetune", 3, dev=0.8, test=finetune[i])}, teacher_test=0.90 + i / 100)
            for i in range(3)]


def test_mean_and_std_over_seeds_and_the_within_noise_flag():
    rows = {row.name: row for row in student_rows(three_seeds())}
    kd = rows["kd_3L"]
    assert kd.test.mean == pytest.approx(0.83) and kd.test.std == pytest.approx(0.03)
    assert rows["finetune_3L"].test.std == pytest.approx(0.01)
    assert kd.gain.mean == pytest.approx(0.01) and kd.gain.std == pytest.approx(0.02)
    assert kd.retention == Spread.of([0.80 / 0.90, 0.83 / 0.91, 0.86 / 0.92])
    # |0.01| < sqrt(0.03² + 0.01²) ≈ 0.032: within noise; pkd's 0.09 is not.
    assert kd.within_noise
    assert rows["pkd_3L"].gain.mean == pytest.approx(0.09) and not rows["pkd_3L"].within_noise


def test_paired_tests_run_once_per_seed():
    labels = np.arange(N_TEST) % 2
    summaries = three_seeds()
    right = np.ones(N_TEST, dtype=bool)
    predictions = {"kd_3L": [logits_for(right, labels)] * 3, "pkd_3L": [logits_for(right, labels)] * 3,
                   "finetune_3L": [logits_for(np.arange(N_TEST) >= k, labels) for k in (5, 6, 7)]}
    tests = paired_tests(summaries, predictions, labels)
    kd = [t for t in tests if t.student == "kd_3L"]
    assert [(t.run, t.result.b, t.result.c) for t in kd] == [(0, 5, 0), (1, 6, 0), (2, 7, 0)]
    assert kd[0].result.p_value == pytest.approx(2 / 2 ** 5)
    with pytest.raises(ValueError, match="2 prediction array"):
        paired_tests(summaries, {**predictions, "kd_3L": predictions["kd_3L"][:2]}, labels)


def test_write_report_files_and_markdown(tmp_path):
    labels = np.arange(N_TEST) % 2
    summaries = three_seeds()
    rng = np.random.default_rng(0)
    predictions = {name: [logits_for(rng.random(N_TEST) < 0.85, labels) for _ in summaries]
                   for name in summaries[0].students}
    stale = tmp_path / "run" / EARLY_EXIT_FILE  # an earlier experiment's FastBERT plot in the same workdir
    stale.parent.mkdir()
    stale.write_bytes(b"\x89PNG")
    paths = write_report(tmp_path / "run", summaries, predictions, labels, costs(summaries[0].students))
    assert paths.early_exit_png is None and not stale.exists()
    for png in (paths.pareto_png, paths.cost_png):
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    text = paths.markdown.read_text()
    assert text.startswith("# Distillation report: synthetic")
    assert "**Teacher** (`package:teacher`, fine-tuned): dev accuracy 91.0 ± 0.0, test accuracy 91.0 ± 1.0" in text
    assert "| finetune_3L | finetune | teacher | 3 | full | 10.0M | 2.0× | 80.0 ± 0.0 | 82.0 ± 1.0 |" in text
    assert "| kd_3L | kd | teacher | 3 | full |" in text and "| +1.0 ± 2.0 (within noise) |" in text
    assert "## Across seeds" in text and "| kd_3L | finetune_3L | +1.0 ± 2.0 |" in text
    assert "| +9.0 ± 0.0 |" in text
    assert "| kd_3L | finetune_3L | 3 |" in text  # McNemar, third seed run
    assert "good to about ±" in text
    assert "](report_pareto.png)" in text and "](report_training_cost.png)" in text
    assert "| kd_3L | kd | 12.5 | 1,000 (shared) |" in text and "| pkd_3L | pkd | 12.5 | 3,000 |" in text
    assert "| finetune_3L | finetune | 12.5 | 0 |" in text


def test_write_report_single_seed_and_missing_cost(tmp_path):
    labels = np.arange(N_TEST) % 2
    single = one_seed()
    predictions = {name: [logits_for(np.ones(N_TEST, dtype=bool), labels)] for name in single.students}
    text = write_report(tmp_path, [single], predictions, labels, costs(single.students)).markdown.read_text()
    assert "| kd_4L | kd | teacher | 4 | full | 10.0M | 2.0× | 87.0 | 87.0 | 96.7% | 40.0 | 1.5× | - |" in text
    assert "| finetune_3L | finetune | teacher | 3 | full |" in text and "| baseline |" in text
    assert "within noise" not in text.split("### Noise")[0]
    with pytest.raises(ValueError, match="no training cost for kd_4L"):
        write_report(tmp_path, [single], predictions, labels,
                     {k: v for k, v in costs(single.students).items() if k != "kd_4L"})


def test_regression_report_has_no_paired_test(tmp_path):
    regression = summary({"kd_3L": student("kd", 3, dev=0.8, test=0.8, metric="pearson"),
                          "finetune_3L": student("finetune", 3, dev=0.7, test=0.7, metric="pearson")}, metric="pearson")
    scores = np.zeros((N_TEST, 1))
    text = write_report(tmp_path, [regression], {"kd_3L": [scores], "finetune_3L": [scores]}, np.zeros(N_TEST),
                        costs(regression.students)).markdown.read_text()
    assert "does not apply to pearson" in text and "good to about" not in text


def test_training_cost_counts_teacher_passes():
    assert training_cost(10, 8_000, 3, "cached")["teacher_forwards"] == 8_000
    assert training_cost(10, 8_000, 3, "online")["teacher_forwards"] == 24_000
    assert training_cost(10, 8_000, 3, "none")["teacher_forwards"] == 0
    with pytest.raises(ValueError):
        training_cost(10, 8_000, 3, "sometimes")


def test_report_table_for_the_terminal():
    table = report_table(three_seeds())
    assert table.row_count == 3 and len(table.columns) == 13
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert "within noise" in text and "mean ± std over 3 seeds" in text


def test_holm_adjusts_step_down_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_headline_baseline_is_finetune_from_the_pretrained_checkpoint_and_teacher_layers_a_second_row():
    students = {"finetune_3L": student("finetune", 3, dev=0.80, test=0.80, init_from="pretrained"),
                "finetune_3L_teacher": student("finetune", 3, dev=0.85, test=0.85),
                "kd_3L": student("kd", 3, dev=0.84, test=0.84)}
    # The teacher-layer finetune is better on dev, but it is not what a user would do without a teacher.
    assert find_baseline("kd_3L", students, "accuracy") == "finetune_3L"
    assert find_teacher_layers_baseline("kd_3L", students, "accuracy") == "finetune_3L_teacher"
    assert find_baseline("finetune_3L_teacher", students, "accuracy") == "finetune_3L"
    assert find_baseline("finetune_3L", students, "accuracy") is None


def test_a_student_is_compared_with_a_baseline_of_its_own_family():
    students = {"finetune_1L_300": student("finetune", 1, dev=0.90, test=0.90, hidden_size=300),
                "bilstm_ce": student("bilstm", 1, dev=0.70, test=0.70, hidden_size=300, family="bilstm",
                                     baseline=True),
                "bilstm_ce_5ep": student("bilstm", 1, dev=0.75, test=0.74, hidden_size=300, family="bilstm",
                                         baseline=True),
                "bilstm_augmented": student("bilstm", 1, dev=0.80, test=0.80, hidden_size=300, family="bilstm",
                                            baseline=False)}
    # The transformer of the same numbers is better on dev, but a BiLSTM is measured against BiLSTMs: the longer
    # gold-label run, chosen on dev.
    assert find_baseline("bilstm_augmented", students, "accuracy") == "bilstm_ce_5ep"
    assert find_baseline("bilstm_ce", students, "accuracy") is None
    rows = {row.name: row for row in student_rows([summary(students)])}
    assert rows["bilstm_augmented"].gain.mean == pytest.approx(0.06)
    assert rows["bilstm_ce"].is_baseline and not rows["bilstm_augmented"].is_baseline


def test_seed_tests_pair_seeds_and_correct_for_the_students_compared():
    from scipy.stats import ttest_rel

    summaries = three_seeds()
    tests = {t.student: t for t in seed_tests(summaries)}
    assert set(tests) == {row.name for row in student_rows(summaries) if row.baseline}
    kd = tests["kd_3L"]
    student = [x.students["kd_3L"].test["accuracy"] for x in summaries]
    base = [x.students[kd.baseline].test["accuracy"] for x in summaries]
    raw = {name: t.p_value for name, t in tests.items()}
    assert kd.p_value == pytest.approx(ttest_rel(student, base).pvalue)
    assert [t.p_holm for t in tests.values()] == pytest.approx(holm(list(raw.values())))
    assert seed_tests(summaries[:1]) == []
