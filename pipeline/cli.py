"""``python -m pipeline``: a thin command line over the stages."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, Experiment, load_experiment

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distil fine-tuned BERT teachers into small, fast students on Ray, tracked in MLflow.")
console = Console(width=None if sys.stdout.isatty() else 160)

ConfigArg = typer.Argument(..., exists=False, help="Experiment YAML file, e.g. configs/quickstart.yaml.")
SetOption = typer.Option(None, "--set", help="Override a field: key.sub=value (repeatable), e.g. students.kd_3L.train.epochs=1.")
WorkdirOption = typer.Option(None, "--workdir", help="Where artifacts, the MLflow db and summary.json go (overrides the file).")


def _load(config: Path, overrides: Optional[list[str]], workdir: Optional[Path]) -> Experiment:
    try:
        return load_experiment(config, overrides or [], workdir)
    except ConfigError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


def _preflight(exp: Experiment) -> None:
    from pipeline.preflight import check_students_fit_teacher
    from kd.errors import StageError

    try:
        check_students_fit_teacher(exp)
    except ConfigError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except StageError as error:
        _fail(error)


def _fail(error: Exception) -> None:
    console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def run(config: Path = ConfigArg, set_: Optional[list[str]] = SetOption, workdir: Optional[Path] = WorkdirOption,
        seeds: int = typer.Option(1, "--seeds", min=1, help="Train every student this many times (train.seed + i); "
                                  "the report gives mean ± std and flags differences within the spread."),
        dry_run: bool = typer.Option(False, "--dry-run", help="List every stage as cached or to run, with the "
                                     "reason (never ran, config, input or code changed); run nothing."),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level and show what Ray's workers "
                                     "print (without it, that goes to WORKDIR/logs/ray).")) -> None:
    """Run every stage of an experiment: data, teacher, soft labels, distillation, evaluation."""
    from pipeline.runner import PipelineRunner
    from kd.errors import StageError

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    exp = _load(config, set_, workdir)
    if dry_run:
        PipelineRunner(exp, console, seeds=seeds).dry_run()
        return
    _preflight(exp)
    try:
        PipelineRunner(exp, console, seeds=seeds, verbose=verbose).run()
    except StageError as error:
        _fail(error)


@app.command()
def tune(config: Path = ConfigArg,
         method: str = typer.Option(..., "--method", "-m", help="Method to search; its space is tune_spaces/<method>.yaml."),
         student: Optional[str] = typer.Option(None, "--student", help="Base student entry (default: the first of the method)."),
         samples: Optional[int] = typer.Option(None, "--samples", help="Trials to sample (tune.samples)."),
         scheduler: Optional[str] = typer.Option(None, "--scheduler", help="asha (early stopping on the dev metric) or fifo."),
         search: Optional[str] = typer.Option(None, "--search", help="random or optuna."),
         trial_mode: Optional[str] = typer.Option(None, "--trial-mode", help="in_process (no nested trainer) or nested."),
         set_: Optional[list[str]] = SetOption, workdir: Optional[Path] = WorkdirOption) -> None:
    """Search a method's hyperparameters with Ray Tune; register the best student in MLflow as 'candidate'.

    Rerunning the same command resumes an interrupted search."""
    from pipeline.search import run_tune
    from kd.errors import StageError

    overrides = list(set_ or [])
    for field, value in (("samples", samples), ("scheduler", scheduler), ("search", search), ("trial_mode", trial_mode)):
        if value is not None:
            overrides.append(f"tune.{field}={value}")
    exp = _load(config, overrides, workdir)
    _preflight(exp)
    try:
        run_tune(exp, method, student, console)
    except ConfigError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except StageError as error:
        _fail(error)


@app.command()
def promote(name: str = typer.Argument(..., help="Registered model name."),
            version: int = typer.Option(..., "--version", help="Model version to promote."),
            tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                                       help="MLflow tracking URI, e.g. sqlite:///runs/quickstart/mlflow.db."),
            alias: str = typer.Option("champion", "--alias", help="Alias to move.")) -> None:
    """Point the 'champion' alias (or another) of a registered model at a version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from stages.register import promote as move_alias

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        move_alias(name, version, alias)
    except MlflowException as error:
        _fail(error.message)
    console.print(f"{name}@{alias} → version {version}")


@app.command()
def register(workdir: Path = typer.Argument(..., help="A finished run's workdir (holds summary.json)."),
             student: str = typer.Argument(..., help="Student to register, or 'best': the best on the dev metric; "
                                           "or 'general:NAME': a general distillation's encoder, as a base model."),
             max_latency_ms: Optional[float] = typer.Option(
                 None, "--max-latency-ms", help="Only a student this fast (summary.json's latency_ms) qualifies."),
             name: Optional[str] = typer.Option(
                 None, "--name", help="Registered model name (default: tune.registry_name or <experiment>-<method>).")) -> None:
    """Register a student (or a general distillation's encoder) of a finished run in the run's MLflow model
    registry as 'candidate'."""
    from mlflow.exceptions import MlflowException

    from kd.errors import StageError
    from pipeline.registry import register_run_student
    from stages.register import CANDIDATE

    try:
        registered, version, chosen = register_run_student(workdir.resolve(), student, max_latency_ms, name)
    except StageError as error:
        _fail(error)
    except MlflowException as error:
        _fail(error.message)
    console.print(f"{chosen} → registered {registered} version {version} as '{CANDIDATE}'")


@app.command()
def report(workdir: Path = typer.Argument(..., help="A run's workdir (holds summary.json).")) -> None:
    """Write WORKDIR/report.md and its plots from a finished run (pipeline run writes them too), and log them to
    that run's MLflow run."""
    from pipeline.summary import load_summaries, workdir_table, write_workdir_report
    from pipeline.tracking import log_report

    try:
        summaries = load_summaries(workdir.resolve())
    except FileNotFoundError as error:
        _fail(error)
    files = write_workdir_report(workdir.resolve(), summaries)
    console.print(workdir_table(summaries))
    run_id = log_report(workdir.resolve(), files)
    logged = f"; logged to MLflow run {run_id}" if run_id else "; no MLflow run recorded in the workdir, not logged"
    console.print(f"report: {files[0]}{logged}")


@app.command()
def validate(config: Path = ConfigArg, set_: Optional[list[str]] = SetOption,
             check_teacher: bool = typer.Option(True, "--check-teacher/--no-check-teacher",
                                                help="Also check students and layer maps against the teacher's depth "
                                                     "(reads its config; a hub teacher needs network).")) -> None:
    """Check an experiment file without running anything."""
    exp = _load(config, set_, None)
    if check_teacher:
        _preflight(exp)
    console.print(f"[green]ok[/green]: {config} — {len(exp.students)} student(s): "
                  + ", ".join(f"{s.name} ({s.method})" for s in exp.students))


@app.command()
def methods() -> None:
    """List the registered distillation methods, their teacher signals and hyperparameters."""
    from kd.methods import METHODS

    table = Table(title="distillation methods")
    for column in ("method", "teacher signals", "hyperparameters (default)"):
        table.add_column(column)
    for name, method in sorted(METHODS.items()):
        signals = ("online: " + ", ".join(sorted(method.online_signals))) if method.online_signals else (
            "cached: " + ", ".join(sorted(method.cached_signals)) if method.cached_signals else "none")
        fields = ", ".join(f"{k}={f.default}" for k, f in method.Params.model_fields.items())
        table.add_row(name, signals, fields or "-")
    console.print(table)

