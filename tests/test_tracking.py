"""Credentials never reach MLflow params or error messages: they come from the environment only."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import Tracker, log_report, redact, remember_run
from kd.errors import StageError

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("text, expected", [
    (f"https://alice:{SECRET}@mlflow.example.com:5000", "https://***@mlflow.example.com:5000"),
    (f"http://{SECRET}@host/path", "http://***@host/path"),
    (f"uri postgresql://u:{SECRET}@db/mlflow and s3://bucket/kd", "uri postgresql://***@db/mlflow and s3://bucket/kd"),
    ("sqlite:////tmp/run/mlflow.db", "sqlite:////tmp/run/mlflow.db"),
    ("http://host:5000/path?user=a@b", "http://host:5000/path?user=a@b"),
    ("mail alice@example.com", "mail alice@example.com"),
])
def test_redact_hides_url_userinfo(text, expected):
    assert redact(text) == expected


def test_no_credentials_in_mlflow_params(tmp_path, monkeypatch):
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "safety", tmp_path / "artifacts")
    config = {"mlflow": {"tracking_uri": f"https://alice:{SECRET}@mlflow.example.com"},
              "ray": {"storage_path": f"s3://key:{SECRET}@bucket/kd"}}
    with tracker.pipeline_run("safety", config) as run:
        tracker.log_stage("stage", params=config, result={"seconds": 1.0}, tags={"stage": "x"})
    client = MlflowClient(tracker.tracking_uri)
    runs = [client.get_run(run.info.run_id)] + client.search_runs([tracker.experiment_id])
    for logged in runs:
        assert SECRET not in repr(logged.data.params) + repr(logged.data.tags)
    assert client.get_run(run.info.run_id).data.params["mlflow.tracking_uri"] == "https://***@mlflow.example.com"
    mlflow.set_tracking_uri(None)


def test_unreachable_tracking_error_hides_credentials():
    with pytest.raises(StageError) as error:
        Tracker(f"http://alice:{SECRET}@127.0.0.1:9", "safety")
    assert "http://***@127.0.0.1:9" in str(error.value) and SECRET not in str(error.value)


def test_log_report_goes_to_the_run_the_workdir_names_and_nowhere_without_one(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    assert log_report(tmp_path, [report]) is None
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("reports", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    remember_run(tmp_path, uri, run_id)
    assert log_report(tmp_path, [report]) == run_id
    assert [a.path for a in client.list_artifacts(run_id, "report")] == ["report/report.md"]
