"""Ray Tune over distill: a search space from tune_spaces/<method>.yaml, ASHA on the dev metric, one MLflow
run per trial under one parent run per search, and the best student registered in the MLflow model registry.

Trials run in one of two modes (``tune.trial_mode``):
- ``in_process``: the trial trains its single worker's loop itself (``LocalIO``), so it pays no TorchTrainer
  start-up (about 25 s a trial on a small machine);
- ``nested``: the trial is a Tune function that builds and fits a ``TorchTrainer``, with a
  ``TuneReportCallback`` forwarding its reports (the Ray 2.60 pattern): multi-worker or GPU trials.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import mlflow
import ray
from mlflow.tracking import MlflowClient
from pydantic import TypeAdapter
from ray import tune

from pipeline.artifacts import Artifact
from pipeline.config import Experiment, StudentSpec
from pipeline.search_space import SearchSpace, apply_sample
from pipeline.tracking import flatten
from stages.distill import student_job, trainer
from kd.errors import StageError
from kd.worker import LocalIO, as_path, kept_student, train_student

CHECKPOINT_PATH_KEY = "checkpoint_path"


def _expected_epochs(spec) -> int:
    method = spec.method_object()
    return sum(phase.epochs if phase.epochs is not None else spec.train.epochs for phase in method.phases())


def _final_phase_epochs(spec) -> int:
    final = spec.method_object().phases()[-1]
    return final.epochs if final.epochs is not None else spec.train.epochs


def trial(config: dict[str, Any], *, exp_document: dict, base_student: dict, inputs: dict[str, list[str]],
          mode: str) -> None:
    """One Tune trial: the sampled values written into the base student, then trained and reported per epoch.
    ``inputs``: the student's stage inputs as [stage, key, path] (the stage says how to read one: a C-MLM teacher
    keeps its model elsewhere than a classifier teacher)."""
    exp = Experiment.model_validate(exp_document)
    spec = TypeAdapter(StudentSpec).validate_python(apply_sample(base_student, config))
    artifacts = {name: Artifact(stage, key, Path(path)) for name, (stage, key, path) in inputs.items()}
    job, train_source = student_job(exp, spec, artifacts)
    dev_path = artifacts["data"].path / "dev.parquet"
    if mode == "in_process":
        def report(metrics: dict, directory: Path | None) -> None:
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(directory)) if directory else None)

        def resume_from():
            checkpoint = tune.get_checkpoint()
            return as_path(checkpoint.as_directory()) if checkpoint is not None else nullcontext(None)

        train_student(job, LocalIO(train_source, dev_path, report, resume_from), verbose=False)
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        context = tune.get_context()
        run_config = ray.train.RunConfig(name=f"trial-{context.get_trial_id()}",
                                         storage_path=str(Path(context.get_trial_dir()).parent / "train"),
                                         callbacks=[TuneReportCallback()])
        result = trainer(exp, job, train_source, dev_path, run_config).fit()
        if result.error is not None:
            raise result.error


class MlflowTrialRuns(tune.Callback):
    """A nested MLflow run per trial, with its params, per-epoch metric curve and an honest end status:
    FINISHED when it ran all its epochs, KILLED when the scheduler stopped it early, FAILED on error.
    On a resumed search, a trial keeps the run it had."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, base_student: dict):
        self.tracking_uri, self.experiment_id, self.parent = tracking_uri, experiment_id, parent_run_id
        self.base_student = base_student
        self.runs: dict[str, str] = {}

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def run_id(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        existing = self.client.search_runs(
            [self.experiment_id],
            f"tags.trial_id = '{trial.trial_id}' and tags.`mlflow.parentRunId` = '{self.parent}'")
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=f"trial {trial.trial_id}",
                                         tags={"mlflow.parentRunId": self.parent, "trial_id": trial.trial_id})
            run_id = run.info.run_id
            for key, value in flatten(trial.config).items():
                self.client.log_param(run_id, key, value)
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        for key, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    key.startswith(("dev_", "loss/")) or key in ("epoch", "step", "time_this_iter_s")):
                self.client.log_metric(self.run_id(trial), key.replace("/", "_"), float(value), step=step)

    def on_trial_complete(self, iteration, trials, trial, **info):
        spec = TypeAdapter(StudentSpec).validate_python(apply_sample(self.base_student, trial.config))
        finished = (trial.last_result or {}).get("epoch", 0) >= _expected_epochs(spec)
        self.client.set_terminated(self.run_id(trial), "FINISHED" if finished else "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.client.set_terminated(self.run_id(trial), "FAILED")


def scheduler_and_searcher(exp: Experiment, space: SearchSpace, metric: str, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # Rungs count epochs of the final phase only: a two-phase method (TinyBERT) has no trained prediction layer
    # to judge before it, so its first phase must not be held against it.
    scheduler = (ASHAScheduler(time_attr="final_phase_epoch", max_t=epochs,
                               grace_period=min(exp.tune.grace_period, epochs), reduction_factor=2)
                 if exp.tune.scheduler == "asha" else FIFOScheduler())
    searcher = None
    if exp.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=exp.seed)
    return scheduler, searcher


NESTED_TRIAL_CPU = 0.1


def check_nested_fits(exp: Experiment, cluster_cpus: float) -> None:
    """A nested trial holds its own slot and its trainer's workers; Ray Data leaves those out of its budget and
    needs a whole CPU left for the read tasks feeding the workers, or the trial waits forever (measured: 2 CPUs,
    one worker)."""
    needed = NESTED_TRIAL_CPU + exp.ray.num_workers * exp.ray.cpus_per_worker + 1
    if cluster_cpus < needed:
        raise StageError(f"tune.trial_mode=nested needs at least {needed:g} CPUs for one trial (the trial, "
                         f"{exp.ray.num_workers} worker(s) × {exp.ray.cpus_per_worker:g} CPU, and one CPU for "
                         f"Ray Data's reads); this cluster has {cluster_cpus:g}. Use tune.trial_mode=in_process.")


def run_search(exp: Experiment, base_student: dict, space: SearchSpace, inputs: dict[str, Artifact], search_dir: Path,
               tracker_parent: str, experiment_id: str) -> tuple[tune.ResultGrid, float]:
    """Run (or resume) the search; returns Tune's results and the wall time of this invocation."""
    metric = space.metric or "dev_accuracy"
    spec = TypeAdapter(StudentSpec).validate_python(base_student)
    scheduler, searcher = scheduler_and_searcher(exp, space, metric, _final_phase_epochs(spec))
    if exp.tune.trial_mode == "nested":
        check_nested_fits(exp, ray.cluster_resources().get("CPU", 0.0))
    resources = {"CPU": exp.tune.cpus_per_trial} if exp.tune.trial_mode == "in_process" else {"CPU": NESTED_TRIAL_CPU}
    trainable = tune.with_resources(
        tune.with_parameters(trial, exp_document=exp.model_dump(mode="json"), base_student=base_student,
                             inputs={name: [a.stage, a.key, str(a.path)] for name, a in inputs.items()}, mode=exp.tune.trial_mode),
        resources)
    callback = MlflowTrialRuns(exp.tracking_uri, experiment_id, tracker_parent, base_student)
    started = time.perf_counter()
    if tune.Tuner.can_restore(str(search_dir)):
        tuner = tune.Tuner.restore(str(search_dir), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=space.param_space())
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(metric=metric, mode=space.mode, scheduler=scheduler, search_alg=searcher,
                                        num_samples=exp.tune.samples,
                                        max_concurrent_trials=exp.tune.max_concurrent_trials),
            run_config=tune.RunConfig(name=search_dir.name, storage_path=str(search_dir.parent),
                                      callbacks=[callback], verbose=1,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    results = tuner.fit()
    # On Ctrl-C Tune saves its state and returns normally: nothing may be registered from a search cut short.
    ended = results.num_terminated + results.num_errors
    if ended < max(len(results), exp.tune.samples):
        raise StageError(f"search interrupted with {ended} of {exp.tune.samples} trials ended; run the same command "
                         f"again to resume it from {search_dir}")
    return results, time.perf_counter() - started


def student_dir_of(result) -> Path | None:
    """The student a trial ended with: in its Tune checkpoint (in-process) or its nested run's checkpoint."""
    if result.checkpoint is not None:
        return kept_student(Path(result.checkpoint.path))
    path = (result.metrics or {}).get(CHECKPOINT_PATH_KEY)
    return kept_student(Path(path)) if path else None


def trial_records(results: tune.ResultGrid, metric: str) -> list[dict]:
    records = []
    for result in results:
        metrics = result.metrics or {}
        student = student_dir_of(result)
        records.append({
            "trial_id": metrics.get("trial_id", Path(result.path).name),
            "config": result.config,
            "status": "ERROR" if result.error else "TERMINATED",
            "epochs": metrics.get("epoch", 0),
            metric: metrics.get(metric),
            "wall_s": metrics.get("time_total_s"),
            "student_dir": str(student) if student else None,
        })
    return records


def dump_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))


def log_parent_artifacts(paths: list[Path]) -> None:
    for path in paths:
        mlflow.log_artifact(str(path))
