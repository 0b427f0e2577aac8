"""A generation task's report on synthetic summaries: the baseline each student is measured against, the gain and
its noise, the paired t-test across seeds, the files, and summary.json read back as the generation kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.generation import SCORES_FILE, find_baseline, generation_table, write_generation_report
from pipeline.summary import load_summaries, workdir_table, write_summaries, write_workdir_report
from pipeline.summary_schema import (BootstrapTest, CmlmTeacherSummary, GenerationStudentSummary, GenerationSummary,
                                     SoftTargetCost)


def student(method: str, test_bleu: float, dev_bleu: float = 20.0, layers: int = 2, init_from: str = "pretrained",
            against: BootstrapTest | None = None) -> GenerationStudentSummary:
    scores = lambda bleu: {"bleu": bleu, "rougeL": 0.4, "bleu_greedy": bleu - 1, "rougeL_greedy": 0.39,
                           "bleu_ceiling": 90.0, "rougeL_ceiling": 0.98, "sentences": 50}
    return GenerationStudentSummary(
        method=method, family="seq2seq", baseline=method == "nll", encoder_layers=layers, decoder_layers=layers,
        hidden_size=384, init="teacher", init_from=init_from, selected_epoch=2, dev=scores(dev_bleu),
        test=scores(test_bleu), params=30_000_000, size_bytes=120_000_000, sentences_per_second=80.0,
        ms_per_batch=400.0, epochs=3, epoch_seconds=30.0, train_rows=1000, evaluate_dir=Path("evaluate"),
        against_baseline=against)


def summary(cmlm_bleu: float, nll_bleu: float) -> GenerationSummary:
    bootstrap = BootstrapTest(baseline="nll_2L", difference=cmlm_bleu - nll_bleu, ci95=[-0.5, 2.5], p_value=0.03,
                              samples=1000)
    return GenerationSummary(
        experiment="synthetic", data_dir=Path("data"),
        teacher=CmlmTeacherSummary(source="package:teacher", params=22_000_000, steps=1000,
                                   masked_accuracy_before=0.21, masked_accuracy_after=0.55),
        soft_targets=SoftTargetCost(rows=1000, seconds=50.0, rows_per_second=20.0, k=8, rounds=7, temperature=10.0),
        students={"cmlm_2L": student("cmlm", cmlm_bleu, against=bootstrap), "nll_2L": student("nll", nll_bleu)})


def test_the_baseline_is_the_nll_student_of_the_same_shape_from_the_pretrained_checkpoint():
    students = {"cmlm": student("cmlm", 20), "nll_teacher": student("nll", 19, dev_bleu=30, init_from="teacher"),
                "nll": student("nll", 18, dev_bleu=10), "nll_3L": student("nll", 25, layers=3),
                "cmlm_3L": student("cmlm", 25, layers=4)}
    assert find_baseline("cmlm", students) == "nll"  # from pretrained, though another nll is better on dev
    assert find_baseline("nll", students) is None and find_baseline("cmlm_3L", students) is None
    del students["nll"]
    assert find_baseline("cmlm", students) == "nll_teacher"


def test_three_seeds_give_the_gain_its_spread_and_a_holm_corrected_t_test(tmp_path):
    summaries = [summary(21.0, 19.0), summary(22.0, 19.5), summary(20.5, 19.2)]
    files = write_generation_report(tmp_path, summaries)
    assert files == [tmp_path / "report.md", tmp_path / SCORES_FILE] and files[1].stat().st_size > 1000
    text = files[0].read_text()
    assert "mean ± std over 3 seeds" in text and "masked target tokens right on dev 21.0% before" in text
    # Gains per seed: 2.0, 2.5, 1.3 → mean +1.93 ± 0.60; the BLEUs' spreads combined (0.76, 0.25) is 0.80.
    assert "| cmlm_2L | cmlm | pretrained | 2 | 2 | 384 | 30.0M | 20.00 ± 0.00 | 21.17 ± 0.76 |" in text
    assert "+1.93 ± 0.60 |" in text and "(within noise)" not in text
    assert "## Across seeds" in text and "| cmlm_2L | nll_2L | +1.93 ± 0.60 |" in text
    assert text.count("| cmlm_2L | nll_2L | ") == 4  # three bootstrap rows (one per seed) and the t-test's
    table = generation_table(summaries)
    assert table.row_count == 2 and "3 seeds" in table.title


def test_a_gain_smaller_than_the_spread_is_within_noise(tmp_path):
    summaries = [summary(21.0, 20.0), summary(19.0, 20.5), summary(22.0, 19.5)]
    text = write_generation_report(tmp_path, summaries)[0].read_text()
    assert "(within noise)" in text


def test_a_generation_summary_is_written_read_back_and_reported_by_kind(tmp_path):
    write_summaries(tmp_path, [summary(21.0, 19.0)])
    (read,) = load_summaries(tmp_path)
    assert isinstance(read, GenerationSummary) and read.students["cmlm_2L"].against_baseline.p_value == 0.03
    assert read.students["cmlm_2L"].latency_ms == 400.0
    files = write_workdir_report(tmp_path, [read])
    assert files[0].name == "report.md" and "one seed" in files[0].read_text()
    assert "## Across seeds" not in files[0].read_text()
    assert workdir_table([read]).row_count == 2


def test_seeds_of_other_experiments_are_refused(tmp_path):
    other = summary(20.0, 19.0)
    other.students.pop("cmlm_2L")
    with pytest.raises(ValueError, match="summary 1 has other students"):
        write_generation_report(tmp_path, [summary(21.0, 19.0), other])
