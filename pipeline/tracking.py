"""MLflow: one parent run per pipeline run, one nested run per stage and per student."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from kd.errors import StageError


# The userinfo of a URL (scheme://user:password@host): credentials belong in the environment
# (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN, AWS_*), and whatever a URI carries is kept out of params and logs.
# MLflow's limits on one log_batch request.
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100
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


def recorded_run(workdir: Path) -> dict | None:
    """``tracking_uri`` and ``run_id`` of the pipeline run that last ran in ``workdir``, or None."""
    record = workdir / RUN_FILE
    return json.loads(record.read_text()) if record.exists() else None


def log_report(workdir: Path, files: list[Path]) -> str | None:
    """Log ``files`` under ``report/`` of the MLflow run that last ran in ``workdir`` (replacing what it had
    there); its run id, or None when the workdir names no run."""
    run = recorded_run(workdir)
    if run is None:
        return None
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
        self.parent_run_id: str | None = None
        self._lock = threading.Lock()

    @contextmanager
    def pipeline_run(self, name: str, params: dict) -> Iterator[mlflow.ActiveRun]:
        with mlflow.start_run(run_name=name) as run:
            mlflow.log_params(loggable_params(params))
            self.parent_run_id = run.info.run_id
            yield run

    def log_stage(self, name: str, *, params: dict, result: dict, tags: dict[str, str],
                  artifacts: dict[str, Path] | None = None, history: list[dict] | None = None) -> str:
        """A nested run under the pipeline run, written through explicit run ids: stages finish on other threads,
        where MLflow's fluent API has no active parent run. Metrics go in batches, not a request per value."""
        client = MlflowClient(self.tracking_uri)
        run_tags = {**tags, **({MLFLOW_PARENT_RUN_ID: self.parent_run_id} if self.parent_run_id else {})}
        run_id = client.create_run(self.experiment_id, run_name=name, tags=run_tags).info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, 0) for key, value in
                   numeric_leaves({k: v for k, v in result.items() if k not in ("history", "final")}).items()]
        for record in history or []:
            step = int(record.get("step", 0))
            metrics += [Metric(metric_name(key), value, now, step)
                        for key, value in numeric_leaves(record).items() if key != "step"]
        parameters = [Param(key, value) for key, value in loggable_params(params).items()]
        with self._lock:  # one writer at a time: a sqlite store refuses concurrent writes
            for start in range(0, len(parameters), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=parameters[start:start + MAX_PARAMS_PER_BATCH])
            for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])
            for artifact_path, local in (artifacts or {}).items():
                if local.is_dir():
                    client.log_artifacts(run_id, str(local), artifact_path)
                elif local.exists():
                    client.log_artifact(run_id, str(local), artifact_path)
            client.set_terminated(run_id, "FINISHED")
        return run_id
