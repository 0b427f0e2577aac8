"""MLflow: one parent run per pipeline run, one nested run per stage and per student."""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from stages.errors import StageError


# The userinfo of a URL (scheme://user:password@host): credentials belong in the environment
# (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN, AWS_*), and whatever a URI carries is kept out of params and logs.
URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")


def redact(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced by ``***``."""
    return URL_USERINFO.sub(r"\g<scheme>***@", text)


def loggable_params(params: dict) -> dict[str, str]:
    """Flattened params as MLflow takes them: strings within its length limit, URL credentials redacted."""
    return {k: redact(str(v))[:6000] for k, v in flatten(params).items()}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items: dict[str, Any] = {}
        for key, inner in value.items():
            items.update(flatten(inner, f"{prefix}{key}."))
        return items
    return {prefix.rstrip("."): value}


def metric_name(key: str) -> str:
    """MLflow-friendly curve names: ``loss/total`` → ``loss_total``, ``dev.accuracy`` → ``dev_accuracy``."""
    return key.replace("/", "_").replace(".", "_")


def numeric_leaves(value: Any) -> dict[str, float]:
    return {k: float(v) for k, v in flatten(value).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k}


# Which MLflow run a workdir's last pipeline run was: `pipeline report WORKDIR` logs the report it rewrites there.
RUN_FILE = "mlflow_run.json"
REPORT_ARTIFACTS = "report"


def remember_run(workdir: Path, tracking_uri: str, run_id: str) -> None:
    (workdir / RUN_FILE).write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": run_id}) + "\n")


def log_report(workdir: Path, files: list[Path]) -> str | None:
    """Log ``files`` under ``report/`` of the MLflow run that last ran in ``workdir`` (replacing what it had
    there); its run id, or None when the workdir names no run."""
    record = workdir / RUN_FILE
    if not record.exists():
        return None
    run = json.loads(record.read_text())
    client = MlflowClient(tracking_uri=run["tracking_uri"])
    for path in files:
        client.log_artifact(run["run_id"], str(path), REPORT_ARTIFACTS)
    return run["run_id"]


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path | None = None):
        """``artifact_root``: where a new experiment keeps its artifacts. Without it, MLflow puts the artifacts of
        a sqlite-tracked experiment in ./mlruns of whatever folder the command ran from."""
        if tracking_uri.startswith("http"):
            # An unreachable server must fail now, not after an hour of compute spent on retries.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        mlflow.set_tracking_uri(tracking_uri)
        try:
            client = MlflowClient()
            if client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment, artifact_location=artifact_root.resolve().as_uri()
                                         if artifact_root is not None else None)
            self.experiment_id = mlflow.set_experiment(experiment).experiment_id
        except Exception as error:
            raise StageError(redact(f"MLflow tracking at {tracking_uri} is unreachable: {type(error).__name__}: {error}")) from None
        self.tracking_uri = tracking_uri

    @contextmanager
    def pipeline_run(self, name: str, params: dict) -> Iterator[mlflow.ActiveRun]:
        with mlflow.start_run(run_name=name) as run:
            mlflow.log_params(loggable_params(params))
            yield run

    def log_stage(self, name: str, *, params: dict, result: dict, tags: dict[str, str],
                  artifacts: dict[str, Path] | None = None, history: list[dict] | None = None) -> str:
        with mlflow.start_run(run_name=name, nested=True) as run:
            mlflow.set_tags(tags)
            if params:
                mlflow.log_params(loggable_params(params))
            metrics = numeric_leaves({k: v for k, v in result.items() if k not in ("history", "final")})
            if metrics:
                mlflow.log_metrics(metrics)
            for record in history or []:
                step = int(record.get("step", 0))
                mlflow.log_metrics({metric_name(k): v for k, v in numeric_leaves(record).items() if k != "step"}, step=step)
            for artifact_path, local in (artifacts or {}).items():
                if local.is_dir():
                    mlflow.log_artifacts(str(local), artifact_path)
                elif local.exists():
                    mlflow.log_artifact(str(local), artifact_path)
            return run.info.run_id
