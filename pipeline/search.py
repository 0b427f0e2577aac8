"""``python -m pipeline tune``: prerequisites through the stage cache, a Ray Tune search, per-trial latency,
the best student re-evaluated on test and registered, and a trial table and Pareto plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from kd.methods import get_method
from pipeline import tune_trials as tune_stage
from pipeline.artifacts import content_key
from pipeline.config import ConfigError, Experiment
from pipeline.pareto import pareto_front, plot_pareto
from pipeline.runner import PipelineRunner, without_mlm
from pipeline.search_space import load_space
from stages import evaluate, evaluate_generation, register
from kd.layout import STUDENT_DIR

SEARCH_FILE = "trials.json"


def base_student(exp: Experiment, method: str, name: str | None) -> dict:
    """The student entry a search varies: the named one, or the first of the method."""
    for spec in exp.students:
        if (name is None and spec.method == method) or spec.name == name:
            if spec.method != method:
                raise ConfigError(f"student {name!r} uses method {spec.method!r}, not {method!r}")
            return spec.model_dump(mode="json")
    raise ConfigError(f"no student {'named ' + repr(name) if name else 'with method ' + repr(method)} in the "
                      f"experiment; add one to 'students' as the base of the search")


def _parent_run(client: MlflowClient, experiment_id: str, key: str) -> str | None:
    runs = client.search_runs([experiment_id], f"tags.search_key = '{key}'", max_results=1)
    return runs[0].info.run_id if runs else None


def trials_table(records: list[dict], metric: str, title: str) -> Table:
    table = Table(title=title)
    for column in ("trial", "status", "epochs", metric, "latency ms", "wall s", "config"):
        table.add_column(column, justify="left" if column in ("trial", "status", "config") else "right")
    for record in sorted(records, key=lambda r: -(r.get(metric) or float("-inf"))):
        config = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                           for k, v in record["config"].items())
        table.add_row(record["trial_id"], record["status"], str(record["epochs"]),
                      f"{record[metric]:.4f}" if record.get(metric) is not None else "-",
                      f"{record['latency_ms']:.1f}" if record.get("latency_ms") else "-",
                      f"{record['wall_s']:.0f}" if record.get("wall_s") else "-", config)
    return table


def trials_markdown(records: list[dict], metric: str) -> str:
    lines = [f"| trial | status | epochs | {metric} | latency ms | wall s | config |", "|---|---|---|---|---|---|---|"]
    for record in sorted(records, key=lambda r: -(r.get(metric) or float("-inf"))):
        value = f"{record[metric]:.4f}" if record.get(metric) is not None else "-"
        lines.append(f"| {record['trial_id']} | {record['status']} | {record['epochs']} | {value} | "
                     f"{record.get('latency_ms') or 0:.1f} | {record.get('wall_s') or 0:.0f} | "
                     f"{json.dumps(record['config'])} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TrialSpeed:
    """How a search's trials are timed: ``key`` names the figure in each trial record (higher is better), and
    ``teacher_ms`` is the teacher's latency the speedups divide, when there is a teacher to time."""

    key: str
    label: str
    teacher_ms: float | None = None


def time_trials(runner: PipelineRunner, prepared: dict, timed: list[dict]) -> TrialSpeed:
    """Time every finished trial's student together, and write its speed into its record. A classifier's is its
    speedup over the teacher, timed again with the trials (a ratio is only fair when both sides ran under the same
    load); a generator's is its sentences per second, there being no teacher that generates."""
    data_dir = prepared["data"].path
    if runner.generates:
        speeds = runner.time_generators({record["trial_id"]: Path(record["student_dir"]) for record in timed}, data_dir)
        for record in timed:
            record["sentences_per_second"] = speeds[record["trial_id"]]["sentences_per_second"]
            record["latency_ms"] = speeds[record["trial_id"]]["ms_per_batch"]
        return TrialSpeed("sentences_per_second", "sentences per second")
    *timings, teacher_timing = ray.get(runner.evaluator().time_models.remote(
        [record["student_dir"] for record in timed] + [str(prepared["teacher"].path / STUDENT_DIR)], str(data_dir),
        runner.exp))
    for record, timing in zip(timed, timings, strict=True):
        record["latency_ms"], record["params"] = timing["latency_ms"], timing["params"]
        record["speedup"] = teacher_timing["latency_ms"] / timing["latency_ms"]
    return TrialSpeed("speedup", "speedup over the teacher", teacher_timing["latency_ms"])


def evaluate_best(runner: PipelineRunner, prepared: dict, method: str, metric: str, best_dir: Path,
                  search_dir: Path, speed: TrialSpeed) -> tuple[dict, dict]:
    """The best trial's student evaluated on dev and test as ``pipeline run`` evaluates one, and the figures its
    registered version is tagged with: the searched metric (``dev_…``) on dev and test, or a generator's BLEU (its
    search metric, token accuracy under teacher forcing, is not what its evaluation scores)."""
    exp, data_dir = runner.exp, str(prepared["data"].path)
    if runner.generates:
        out = search_dir / "best_evaluation"
        out.mkdir(exist_ok=True)
        task = ray.remote(num_cpus=1)(evaluate_generation.evaluate_generation)
        evaluation = ray.get(task.remote(str(best_dir), data_dir, str(out), runner.generation_evaluation().model_dump()))
        return evaluation, {"dev_bleu": evaluation["dev"]["bleu"], "test_bleu": evaluation["test"]["bleu"],
                            speed.key: evaluation["latency"][speed.key]}
    sweeps = exp.evaluate.exit_speeds if get_method(method).exits_early else []
    evaluation_config = evaluate.Config.of(exp, teacher=without_mlm(exp.teacher), exit_speeds=sweeps)
    evaluation, _ = ray.get(runner.evaluator().evaluate.remote(str(best_dir), data_dir, evaluation_config))
    name = metric.removeprefix("dev_")
    return evaluation, {f"dev_{name}": evaluation["dev"][name], f"test_{name}": evaluation["test"][name],
                        speed.key: round(speed.teacher_ms / evaluation["latency_ms"], 2)}


def run_tune(exp: Experiment, method: str, student: str | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    base = base_student(exp, method, student)
    space = load_space(method, base)  # a bad space fails here, before Ray or MLflow start
    metric = space.metric or "dev_accuracy"
    runner = PipelineRunner(exp, console)
    tracker = runner.start()
    key = content_key("tune", {"base": base, "space": space.model_dump(mode="json", exclude={"source"}),
                               "tune": exp.tune.model_dump(exclude={"registry_name"}), "max_length": exp.teacher.max_length})
    search_dir = exp.workdir / "tune" / f"{method}-{key}"
    client = MlflowClient()
    parent_id = _parent_run(client, tracker.experiment_id, key)
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else f"tune {method}") as parent:
        tracker.parent_run_id = parent.info.run_id  # the prerequisite stages' runs nest under the search
        if parent_id is None:
            mlflow.set_tags({"search_key": key, "method": method, "kind": "tune"})
            mlflow.log_params({"samples": exp.tune.samples, "scheduler": exp.tune.scheduler, "search": exp.tune.search,
                               "trial_mode": exp.tune.trial_mode, "metric": metric, "base_student": base["name"]})
        else:
            console.print(f"[yellow]resuming[/yellow] search {search_dir.name} (MLflow run {parent_id})")
        spec = next(spec for spec in exp.students if spec.name == base["name"])
        prepared = runner.prepare([spec])
        inputs = runner.student_inputs(prepared, spec)
        results, wall = tune_stage.run_search(exp, base, space, inputs, search_dir, parent.info.run_id,
                                              tracker.experiment_id)
        records = tune_stage.trial_records(results, metric)
        for record in records:
            record["method"] = method
        speed = time_trials(runner, prepared, [record for record in records if record["student_dir"]])
        (search_dir / SEARCH_FILE).write_text(json.dumps(records, indent=2, default=str))

        best = results.get_best_result(metric=metric, mode=space.mode)
        best_dir = tune_stage.student_dir_of(best)
        best_record = next(r for r in records if r["student_dir"] == str(best_dir))
        evaluation, scores = evaluate_best(runner, prepared, method, metric, best_dir, search_dir, speed)
        mlflow.log_metrics({f"best_dev_{k}": v for k, v in evaluation["dev"].items()}
                           | {f"best_test_{k}": v for k, v in evaluation["test"].items()}
                           | {f"best_{speed.key}": scores[speed.key], "wall_s": wall,
                              "wall_s_per_trial": wall / max(len(records), 1)})
        info = register.log_student(best_dir, exp)
        name = exp.tune.registry_name or f"{exp.name}-{method}"
        version = register.register(info.model_uri, name, {
            "method": method, "teacher": exp.teacher.source, "trial_id": best_record["trial_id"], metric: best_record[metric],
            **scores, "params": evaluation["params"], "config": json.dumps(best.config),
        })

        all_points = [r for path in sorted((exp.workdir / "tune").glob(f"*/{SEARCH_FILE}"))
                      for r in json.loads(path.read_text()) if r.get(speed.key) and r.get(metric) is not None]
        plot = plot_pareto(all_points, speed.key, metric, search_dir / "pareto.png",
                           f"{exp.name}: {metric} against {speed.label}, all searches")
        table_md = search_dir / "trials.md"
        table_md.write_text(f"# Search {search_dir.name}\n\n" + trials_markdown(records, metric)
                            + "\n## Pareto set (all searches)\n\n"
                            + "\n".join(f"- {p['method']} {p['trial_id']}: {metric} {p[metric]:.4f}, "
                                        f"{speed.label} {p[speed.key]:.2f}"
                                        for p in pareto_front(all_points, speed.key, metric)))
        for path in (plot, table_md, search_dir / SEARCH_FILE):
            mlflow.log_artifact(str(path))
        console.print(trials_table(records, metric, f"{method} search: {len(records)} trials, {wall:.0f} s"))
        console.print(f"best trial {best_record['trial_id']}: dev {evaluation['dev']}, test {evaluation['test']}, "
                      f"{speed.label} {scores[speed.key]:.2f} → registered {name} version {version} as "
                      f"'{register.CANDIDATE}'")
        console.print(f"Pareto plot: {plot}")
    return {"search_dir": str(search_dir), "records": records, "registered": {"name": name, "version": version},
            "best": evaluation, "wall_s": wall}
