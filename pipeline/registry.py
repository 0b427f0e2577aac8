"""``python -m pipeline register WORKDIR STUDENT``: a student of a finished pipeline run into the MLflow model
registry, as a search registers its best trial (``stages.register`` logs and registers; this finds what to); with
``general:NAME``, the encoder of a general distillation, as a base model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.artifacts import ArtifactStore
from pipeline.summary import load_summaries
from pipeline.summary_schema import GenerationSummary, Summary
from pipeline.tracking import RUN_FILE, recorded_run
from kd.errors import StageError
from kd.layout import ENCODER_DIR, STUDENT_DIR
from kd.students import GENERAL_PREFIX
from stages.register import BEST, ServedTask, log_served, register


def choose_student(summary: Summary | GenerationSummary, student: str, max_latency_ms: float | None = None) -> str:
    """``student`` itself, or for ``best`` the student with the best dev metric, within ``max_latency_ms``."""
    students, metric = summary.students, summary.metric
    if student != BEST:
        if student not in students:
            raise StageError(f"no student {student!r} in the run; its students: {', '.join(students)} (or {BEST})")
        within = [student]
    else:
        within = list(students)
    if max_latency_ms is not None:
        within = [name for name in within if students[name].latency_ms <= max_latency_ms]
        if not within:
            fastest = min(students, key=lambda name: students[name].latency_ms)
            raise StageError(f"no student {'' if student == BEST else repr(student) + ' '}within {max_latency_ms:g} "
                             f"ms; the fastest, {fastest}, takes {students[fastest].latency_ms:.1f} ms")
    return max(within, key=lambda name: (students[name].dev[metric], -students[name].latency_ms))


def distill_run(client: MlflowClient, run, student: str):
    runs = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and "
                                                        f"tags.stage = 'distill' and params.name = '{student}'")
    if not runs:
        raise StageError(f"MLflow run {run.info.run_id} records no distill stage of {student!r}")
    # With --seeds a student is distilled once per seed; summary.json describes the first, the lowest seed.
    return min(runs, key=lambda distill: int(distill.data.params["train.seed"]))


def finished_run(workdir: Path):
    """The MLflow client and run of the last pipeline run in ``workdir``, which must have finished."""
    record = recorded_run(workdir)
    if record is None:
        raise StageError(f"{workdir} records no pipeline run ({RUN_FILE}); run `python -m pipeline run` first")
    mlflow.set_tracking_uri(record["tracking_uri"])
    client = MlflowClient()
    run = client.get_run(record["run_id"])
    if run.info.status != "FINISHED":
        raise StageError(f"the last pipeline run in {workdir} (MLflow run {run.info.run_id}) is "
                         f"{run.info.status.lower()}, not finished")
    return client, run


def register_run_general(workdir: Path, entry: str, name: str | None = None) -> tuple[str, int, str]:
    """Register the encoder of general distillation ``entry`` of the finished run in ``workdir`` as a base model
    (text in, sentence embedding out), as ``candidate``; students start from such a checkpoint with
    ``student.init_from``. Returns the registered name, version and what was registered."""
    client, run = finished_run(workdir)
    stages = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and "
                                                          f"tags.stage = 'general' and params.name = '{entry}'")
    if not stages:
        raise StageError(f"MLflow run {run.info.run_id} records no general distillation {entry!r}")
    stage = stages[0]
    artifact = ArtifactStore(workdir / "artifacts").lookup("general", stage.data.tags["key"])
    if artifact is None:
        raise StageError(f"general distillation {entry!r} (general/{stage.data.tags['key']}) is no longer in "
                         f"{workdir / 'artifacts'}; run the pipeline again to rebuild it")
    params = stage.data.params
    mlflow.start_run(run_id=run.info.run_id)
    try:
        info = log_served(artifact.path / ENCODER_DIR, ServedTask.encoder(int(params["train.max_length"])),
                          f"general-{entry}")
    finally:
        mlflow.end_run()
    result = artifact.result()
    registered_name = name or f"{run.data.params.get('name', 'experiment')}-general-{entry}"
    version = register(info.model_uri, registered_name, {
        "kind": "encoder", "teacher": params.get("teacher"), "corpus": params.get("corpus.source"),
        "steps": result["steps"], "run_id": run.info.run_id, "config": json.dumps(dict(sorted(params.items()))),
        **{name.replace("/", "_"): round(value, 4) for name, value in result["final"].items()},
    })
    return registered_name, version, f"{GENERAL_PREFIX}{entry}"


def register_run_student(workdir: Path, student: str, max_latency_ms: float | None = None,
                         name: str | None = None) -> tuple[str, int, str]:
    """Register ``student`` (or the ``best``) of the finished pipeline run in ``workdir``: its distilled model, with
    the tags a search gives its best trial, as ``candidate``. Returns the registered name, version and student.
    ``general:NAME`` registers that general distillation's encoder instead (``register_run_general``)."""
    if student.startswith(GENERAL_PREFIX):
        return register_run_general(workdir, student[len(GENERAL_PREFIX):], name)
    client, run = finished_run(workdir)
    try:
        summary = load_summaries(workdir)[0]
    except FileNotFoundError as error:
        raise StageError(str(error)) from None
    chosen = choose_student(summary, student, max_latency_ms)
    entry, metric = summary.students[chosen], summary.metric
    distill = distill_run(client, run, chosen)
    artifact = ArtifactStore(workdir / "artifacts").lookup("distill", distill.data.tags["key"])
    if artifact is None:
        raise StageError(f"{chosen}'s distilled model (distill/{distill.data.tags['key']}) is no longer in "
                         f"{workdir / 'artifacts'}; run the pipeline again to rebuild it")
    task = ServedTask.from_params(run.data.params)
    mlflow.start_run(run_id=run.info.run_id)
    try:
        info = log_served(artifact.path / STUDENT_DIR, task, chosen)
    finally:
        mlflow.end_run()  # FINISHED, as the run was: a failed registration leaves the run's status alone
    registered_name = name or _registry_name(run.data.params) or f"{summary.experiment}-{entry.method}"
    # A generator has no speedup over its teacher (a masked LM generates nothing): its speed is its own.
    speed = ({"sentences_per_second": round(entry.sentences_per_second, 2)} if isinstance(summary, GenerationSummary)
             else {"speedup": round(entry.speedup, 2)})
    version = register(info.model_uri, registered_name, {
        "method": entry.method, "teacher": summary.teacher.source, "student": chosen,
        "run_id": run.info.run_id, f"dev_{metric}": entry.dev[metric], f"test_{metric}": entry.test[metric],
        **speed, "latency_ms": round(entry.latency_ms, 2), "params": entry.params,
        "config": json.dumps(dict(sorted(distill.data.params.items()))),
    })
    return registered_name, version, chosen


def _registry_name(params: dict[str, str]) -> str | None:
    """``tune.registry_name`` of the run's experiment, the name a search of it registers under."""
    value = params.get("tune.registry_name")
    return None if value in (None, "None") else value
