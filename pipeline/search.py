"""``python -m pipeline tune``: prerequisites through the stage cache, a Ray Tune search, per-trial latency,
the best student re-evaluated on test and registered, and a trial table and Pareto plot."""

from __future__ import annotations

import json

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
from stages import evaluate, register
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
        evaluator = runner.evaluator()
        data_dir = str(prepared["data"].path)
        # The teacher is timed again with the trials, not read from its evaluation: a speedup is only a fair
        # ratio when both sides ran under the same load.
        timed = [record for record in records if record["student_dir"]]
        *timings, teacher_timing = ray.get(evaluator.time_models.remote(
            [record["student_dir"] for record in timed] + [str(prepared["teacher"].path / STUDENT_DIR)], data_dir, exp))
        teacher_latency = teacher_timing["latency_ms"]
        for record in records:
            record["method"] = method
        for record, timing in zip(timed, timings, strict=True):
            record["latency_ms"], record["params"] = timing["latency_ms"], timing["params"]
            record["speedup"] = teacher_latency / timing["latency_ms"]
        (search_dir / SEARCH_FILE).write_text(json.dumps(records, indent=2, default=str))

        best = results.get_best_result(metric=metric, mode=space.mode)
        best_dir = tune_stage.student_dir_of(best)
        best_record = next(r for r in records if r["student_dir"] == str(best_dir))
        sweeps = exp.evaluate.exit_speeds if get_method(method).exits_early else []
        evaluation_config = evaluate.Config.of(exp, teacher=without_mlm(exp.teacher), exit_speeds=sweeps)
        evaluation, _ = ray.get(evaluator.evaluate.remote(str(best_dir), str(prepared["data"].path), evaluation_config))
        speedup = teacher_latency / evaluation["latency_ms"]
        mlflow.log_metrics({f"best_dev_{k}": v for k, v in evaluation["dev"].items()}
                           | {f"best_test_{k}": v for k, v in evaluation["test"].items()}
                           | {"best_speedup": speedup, "wall_s": wall, "wall_s_per_trial": wall / max(len(records), 1)})
        info = register.log_student(best_dir, exp)
        name = exp.tune.registry_name or f"{exp.name}-{method}"
        version = register.register(info.model_uri, name, {
            "method": method, "teacher": exp.teacher.source, "trial_id": best_record["trial_id"],
            "dev_" + metric.removeprefix("dev_"): evaluation["dev"][metric.removeprefix("dev_")],
            "test_" + metric.removeprefix("dev_"): evaluation["test"][metric.removeprefix("dev_")],
            "speedup": round(speedup, 2), "params": evaluation["params"], "config": json.dumps(best.config),
        })

        all_points = [r for path in sorted((exp.workdir / "tune").glob(f"*/{SEARCH_FILE}"))
                      for r in json.loads(path.read_text()) if r.get("speedup") and r.get(metric) is not None]
        plot = plot_pareto(all_points, "speedup", metric, search_dir / "pareto.png",
                           f"{exp.name}: {metric} against speedup over the teacher, all searches")
        table_md = search_dir / "trials.md"
        table_md.write_text(f"# Search {search_dir.name}\n\n" + trials_markdown(records, metric)
                            + "\n## Pareto set (all searches)\n\n"
                            + "\n".join(f"- {p['method']} {p['trial_id']}: {metric} {p[metric]:.4f}, "
                                        f"speedup {p['speedup']:.2f}x" for p in pareto_front(all_points, "speedup", metric)))
        for path in (plot, table_md, search_dir / SEARCH_FILE):
            mlflow.log_artifact(str(path))
        console.print(trials_table(records, metric, f"{method} search: {len(records)} trials, {wall:.0f} s"))
        console.print(f"best trial {best_record['trial_id']}: dev {evaluation['dev']}, test {evaluation['test']}, "
                      f"speedup {speedup:.2f}x → registered {name} version {version} as '{register.CANDIDATE}'")
        console.print(f"Pareto plot: {plot}")
    return {"search_dir": str(search_dir), "records": records, "registered": {"name": name, "version": version},
            "best": evaluation, "wall_s": wall}
