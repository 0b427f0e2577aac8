"""Bad inputs get one clear message and a non-zero exit, before any compute where that is possible."""

import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

from conftest import free_port

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def smoke_with(tmp_path, **sections) -> Path:
    document = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    for dotted, value in sections.items():
        node = document
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    document["workdir"] = str(tmp_path / "work")
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def test_missing_teacher_folder(tmp_path):
    result = invoke("validate", smoke_with(tmp_path, teacher__source=str(tmp_path / "no-such-model")))
    assert result.exit_code == 1 and "does not exist" in result.output


def test_teacher_package_not_installed(tmp_path):
    result = invoke("validate", smoke_with(tmp_path, teacher__source="package:no_such_package/model"))
    assert result.exit_code == 1 and "is not installed" in result.output


def test_teacher_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("validate", smoke_with(tmp_path, teacher__source=str(tmp_path / "empty")))
    assert result.exit_code == 1 and "holds no config.json" in result.output


def test_student_deeper_than_teacher_is_a_config_error(tmp_path):
    result = invoke("validate", smoke_with(tmp_path), "--set", "students.kd_2L.student.layers=9")
    assert result.exit_code == 2 and "deeper than the teacher's 6 layers" in result.output


def test_unreachable_mlflow_fails_before_compute(tmp_path):
    result = invoke("run", smoke_with(tmp_path, mlflow__tracking_uri="http://127.0.0.1:9"))
    assert result.exit_code == 1 and "MLflow tracking at http://127.0.0.1:9 is unreachable" in result.output
    assert not (tmp_path / "work" / "artifacts").exists()


def test_undeclared_labels_stop_the_run_with_the_first_bad_row(tmp_path):
    data = tmp_path / "reviews.csv"
    pd.DataFrame({"sentence": [f"review {i}" for i in range(30)], "label": ["pos", "neg", "meh"] * 10}).to_csv(data, index=False)
    result = invoke("run", smoke_with(tmp_path, task__source=str(data), task__labels=["neg", "pos"], task__max_rows=None))
    assert result.exit_code == 1 and "10 row(s)" in result.output and "'meh'" in result.output


def test_a_data_file_without_rows_stops_the_run_in_one_line(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("sentence,label\n")
    result = invoke("run", smoke_with(tmp_path, task__source=str(data), task__max_rows=None))
    assert result.exit_code == 1
    assert f"error: {data} has no rows" in result.output.splitlines()[-1] and "n_samples" not in result.output


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "ray://10.255.255.1:10001"])
def test_unreachable_ray_address_fails_before_compute(tmp_path, address):
    address = address.format(port=free_port())
    started = time.monotonic()
    result = invoke("run", smoke_with(tmp_path, ray__address=address))
    assert result.exit_code == 1 and f"cannot reach Ray at {address!r}" in result.output
    assert time.monotonic() - started < 30, "ray.init alone would retry for minutes"
    assert not (tmp_path / "work").exists()
