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
        console.print(f"[red]error:[/red] {error}", highlight=False)
        raise typer.Exit(2)


def _fail(error: Exception) -> None:
    console.print(f"[red]error:[/red] {error}", highlight=False)
    raise typer.Exit(1)


@app.command()
def run(config: Path = ConfigArg, set_: Optional[list[str]] = SetOption, workdir: Optional[Path] = WorkdirOption,
        verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    """Run every stage of an experiment: data, teacher, soft labels, distillation, evaluation."""
    from pipeline.runner import PipelineRunner
    from stages.errors import StageError

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    exp = _load(config, set_, workdir)
    try:
        PipelineRunner(exp, console).run()
    except StageError as error:
        _fail(error)


@app.command()
def validate(config: Path = ConfigArg, set_: Optional[list[str]] = SetOption) -> None:
    """Check an experiment file without running anything."""
    exp = _load(config, set_, None)
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

