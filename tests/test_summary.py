"""summary.json through its schema: what the runner writes is what the report and the registry read back, and a
file of another version is refused with the way to rewrite it."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.summary import SEED_SUMMARIES, SUMMARY_FILE, load_summaries, write_summaries
from pipeline.summary_schema import (SCHEMA_VERSION, EarlyExitPoint, EnsembleMember, EnsembleSummary, Summary,
                                     SummaryOutdated)

from test_report import one_seed, student, three_seeds


def with_seed_methods() -> Summary:
    """One seed with a FastBERT sweep and a teacher ensemble, the two sections only some runs have."""
    summary = one_seed()
    sweep = [EarlyExitPoint(speed=speed, dev_accuracy=0.8, test_accuracy=0.79, avg_exit_layer=4 - speed,
                            latency_ms=30 - 10 * speed, speedup=60 / (30 - 10 * speed)) for speed in (0.0, 0.5)]
    summary.students["fast"] = student("fastbert", 4, dev=0.8, test=0.79).model_copy(update={"early_exit": sweep})
    members = [EnsembleMember(source="package:teacher", seed=seed, dev={"accuracy": 0.9}, test={"accuracy": 0.89})
               for seed in (0, 1)]
    return summary.model_copy(update={"ensemble": EnsembleSummary(teachers=members, dev={"accuracy": 0.91},
                                                                  test={"accuracy": 0.9})})


def rewrite(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def test_summaries_round_trip_through_the_workdir(tmp_path):
    summaries = [with_seed_methods(), *three_seeds()[:1]]
    assert write_summaries(tmp_path, summaries) == tmp_path / SUMMARY_FILE
    assert load_summaries(tmp_path) == summaries
    assert Summary.read(tmp_path / SUMMARY_FILE) == summaries[0]


def test_the_file_keeps_its_shape_with_the_version_in_front(tmp_path):
    plain, seeded = one_seed(), with_seed_methods()
    write_summaries(tmp_path, [plain])
    data = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert list(data) == ["schema_version", "experiment", "metric", "data_dir", "teacher", "students"]
    assert data["schema_version"] == SCHEMA_VERSION == 2
    kd = data["students"]["kd_3L"]
    assert kd["init"] == {"from": "teacher", "layers": "uniform"} and kd["hidden_size"] is None
    assert "early_exit" not in kd and kd["evaluate_dir"] == "evaluate"
    seeded_data = seeded.model_dump(mode="json")
    assert list(seeded_data["ensemble"]) == ["teachers", "dev", "test"]
    assert seeded_data["students"]["fast"]["early_exit"][1]["speedup"] == pytest.approx(2.4)


def test_a_nan_metric_is_written_and_read_as_nan(tmp_path):
    summary = one_seed()
    summary.students["kd_3L"].test["f1"] = math.nan
    write_summaries(tmp_path, [summary])
    assert "NaN" in (tmp_path / SUMMARY_FILE).read_text()
    assert math.isnan(load_summaries(tmp_path)[0].students["kd_3L"].test["f1"])


def test_a_run_with_fewer_seeds_leaves_no_per_seed_file_of_an_earlier_one(tmp_path):
    write_summaries(tmp_path, three_seeds())
    assert len(list((tmp_path / SEED_SUMMARIES).iterdir())) == 3
    write_summaries(tmp_path, [one_seed()])
    assert [path.name for path in (tmp_path / SEED_SUMMARIES).iterdir()] == ["seed-0.json"]
    assert load_summaries(tmp_path) == [one_seed()]


def test_a_file_written_before_the_version_was_recorded_is_version_1_and_refused(tmp_path):
    write_summaries(tmp_path, [with_seed_methods()])
    rewrite(tmp_path / SUMMARY_FILE, lambda data: data.pop("schema_version"))
    with pytest.raises(SummaryOutdated, match="has summary schema version 1; this code reads version 2"):
        Summary.read(tmp_path / SUMMARY_FILE)


def test_a_file_missing_a_field_is_refused_with_the_command_that_rewrites_it(tmp_path):
    write_summaries(tmp_path, [one_seed()])
    rewrite(tmp_path / SEED_SUMMARIES / "seed-0.json", lambda data: data["students"]["kd_3L"].pop("baseline"))
    with pytest.raises(SummaryOutdated) as refused:
        load_summaries(tmp_path)
    message = str(refused.value)
    assert "seed-0.json is not a version-2 summary (students.kd_3L.baseline: Field required)" in message
    assert "rerun `python -m pipeline run`" in message and "\n" not in message


def test_another_version_is_refused_and_the_cli_says_so_in_one_line(tmp_path):
    write_summaries(tmp_path, [one_seed()])
    rewrite(tmp_path / SEED_SUMMARIES / "seed-0.json", lambda data: data.update(schema_version=3))
    with pytest.raises(SummaryOutdated, match="has summary schema version 3; this code reads version 2"):
        load_summaries(tmp_path)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "schema version 3" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_workdir_without_a_summary(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no summary.json: run `python -m pipeline run` first"):
        load_summaries(tmp_path)
