"""The stage graph: data → teacher → label → distill (per student) → evaluate, each stage cached by content key."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from rich.console import Console

from kd.methods import get_method
from pipeline.artifacts import Artifact, ArtifactStore, content_key, write_result
from pipeline.config import Experiment
from pipeline.ray_session import check_ray, ensure_ray
from pipeline.summary import SEED_SUMMARIES, SUMMARY_FILE, build_summary, summary_table, write_workdir_report
from pipeline.tracking import Tracker
from stages import augment, data, distill, evaluate, label, mlm_teacher, mlm_topk, teacher
from stages.student_training import STUDENT_DIR

log = logging.getLogger(__name__)

# Bump a stage's version when its code changes what it writes, so old cached outputs are not reused.
STAGE_VERSIONS = {"data": 1, "teacher": 1, "label": 1, "distill": 1, "evaluate": 1, "mlm_teacher": 1, "augment": 1,
                  "mlm_topk": 1}


def corpus_key(stage: str, data_name: str) -> str:
    """Where ``prepare`` keeps a stage's output over the task's train split ("task") or the augmented corpus."""
    return stage if data_name == "task" else f"{stage}:{data_name}"


def student_corpus(spec) -> str | None:
    """The prepared Parquet a student trains on, or None for the plain train split: masked-LM top-k for
    TextSmooth, soft labels for the other cached-signal methods and for every student on the augmented corpus
    (its copies have no gold label, so the teacher's are what an online method reads too)."""
    method = get_method(spec.method)
    if "mlm_topk" in method.cached_signals:
        return corpus_key("mlm_topk", spec.data)
    if method.cached_signals or spec.data == "augmented":
        return corpus_key("label", spec.data)
    return None


@dataclass
class StageContext:
    key: str
    console: Console
    evaluator: Callable[[], object]


class PipelineRunner:
    def __init__(self, exp: Experiment, console: Console | None = None, seeds: int = 1):
        self.exp = exp
        self.seeds = seeds
        self.console = console or Console()
        self.store = ArtifactStore(exp.workdir / "artifacts")
        self.tracker: Tracker | None = None
        self._evaluator = None
        self.counts = {"ran": 0, "cached": 0}

    def stage(self, stage: str, label_text: str, fn: Callable, config_slice, inputs: dict[str, Artifact],
              params: dict | None = None, tags: dict | None = None, artifacts: Callable[[Artifact], dict] | None = None) -> Artifact:
        key = content_key(stage, config_slice, inputs, STAGE_VERSIONS[stage])
        artifact = self.store.lookup(stage, key)
        cached = artifact is not None
        started = time.perf_counter()
        if cached:
            self.counts["cached"] += 1
            self.console.print(f"[dim]✓ {label_text}: cached ({stage}/{key})[/dim]")
        else:
            with self.console.status(f"[bold]{label_text}[/bold] …"):
                with self.store.writing(stage, key) as scratch:
                    result = fn(self.exp, inputs, StageContext(key, self.console, self.evaluator), scratch)
                    result["seconds"] = round(time.perf_counter() - started, 2)
                    write_result(scratch, result)
            artifact = self.store.lookup(stage, key)
            self.counts["ran"] += 1
            self.console.print(f"[green]✓[/green] {label_text}: done in {artifact.result()['seconds']:.1f}s ({stage}/{key})")
        result = artifact.result()
        self.tracker.log_stage(
            label_text, params=params or {}, result=result,
            tags={"stage": stage, "key": key, "cached": str(cached).lower(), **(tags or {})},
            artifacts=artifacts(artifact) if artifacts else None, history=result.get("history"),
        )
        return artifact

    def evaluator(self):
        """The run's evaluation actor, started on first use."""
        if self._evaluator is None:
            self._evaluator = evaluate.Evaluator.remote(self.exp.evaluate.threads)
        return self._evaluator

    def start(self) -> Tracker:
        """Check the Ray head and MLflow, failing fast before any compute. Ray starts later, once the data has been
        checked."""
        check_ray(self.exp.ray)
        self.exp.workdir.mkdir(parents=True, exist_ok=True)
        self.tracker = Tracker(self.exp.tracking_uri, self.exp.experiment_name, self.exp.artifact_root)
        return self.tracker

    def run(self) -> dict:
        self.start()
        with self.tracker.pipeline_run(self.exp.name, self.exp.model_dump(mode="json")):
            return self._run_stages()

    def prepare(self, students: Iterable) -> dict[str, Artifact]:
        """The stages students share: data, teacher and the teacher's evaluation, and what these students read:
        the masked-LM teacher, the augmented corpus, and soft labels and masked-LM top-k over either corpus."""
        exp = self.exp
        students = list(students)
        prepared = {"data": self.stage("data", "data", data.run, exp.task, {}, params=exp.task.model_dump(mode="json"))}
        ensure_ray(exp.ray)
        # The masked-LM adaptation is a stage of its own: the classification teacher does not depend on it.
        teacher_slice = {"teacher": exp.teacher.model_dump(mode="json", exclude={"mlm"}), "labels": exp.task.num_labels,
                         "seed": exp.seed, "workers": exp.ray.num_workers}
        prepared["teacher"] = self.stage("teacher", "teacher", teacher.run, teacher_slice, {"data": prepared["data"]},
                                         params=exp.teacher.model_dump(mode="json"))
        labelled = sorted({spec.data for spec in students if student_corpus(spec)})
        smoothed = sorted({spec.data for spec in students if "mlm_topk" in get_method(spec.method).cached_signals})
        tinybert_rule = "augmented" in labelled and exp.augment.rule == "tinybert"
        if smoothed or tinybert_rule:
            prepared["mlm_teacher"] = self.stage(
                "mlm_teacher", "masked-LM teacher", mlm_teacher.run,
                {"mlm": exp.teacher.mlm, "max_length": exp.teacher.max_length, "seed": exp.seed},
                {"data": prepared["data"], "teacher": prepared["teacher"]}, params=exp.teacher.mlm.model_dump())
        if "augmented" in labelled:
            augment_inputs = {"data": prepared["data"]}
            if tinybert_rule:
                augment_inputs["mlm_teacher"] = prepared["mlm_teacher"]
            prepared["augment"] = self.stage(
                "augment", f"augment ({exp.augment.rule})", augment.run,
                {"augment": exp.augment, "teacher": exp.teacher.source, "max_length": exp.teacher.max_length},
                augment_inputs, params=exp.augment.model_dump())
        for data_name in labelled:
            label_inputs = {"data": prepared["data"], "teacher": prepared["teacher"]}
            if data_name == "augmented":
                label_inputs["augment"] = prepared["augment"]
            prepared[corpus_key("label", data_name)] = self.stage(
                "label", "soft labels" + ("" if data_name == "task" else f" ({data_name})"), label.run,
                {"max_length": exp.teacher.max_length}, label_inputs)
        for data_name in smoothed:
            prepared[corpus_key("mlm_topk", data_name)] = self.stage(
                "mlm_topk", "masked-LM top-k" + ("" if data_name == "task" else f" ({data_name})"), mlm_topk.run,
                {"k": exp.label.mlm_top_k, "max_length": exp.teacher.max_length},
                {"label": prepared[corpus_key("label", data_name)], "mlm_teacher": prepared["mlm_teacher"]})
        prepared["teacher_eval"] = self.stage("evaluate", "evaluate teacher", evaluate.run, exp.evaluate,
                                              {"model": prepared["teacher"], "data": prepared["data"]})
        return prepared

    @staticmethod
    def student_inputs(prepared: dict[str, Artifact], spec) -> dict[str, Artifact]:
        """A student's stage inputs; ``label`` is the prepared Parquet it trains on, when it is not the train split."""
        inputs = {"data": prepared["data"], "teacher": prepared["teacher"]}
        corpus = student_corpus(spec)
        if corpus is not None:
            inputs["label"] = prepared[corpus]
        return inputs

    def _run_students(self, prepared: dict[str, Artifact], seed_offset: int) -> dict:
        """Distil and evaluate every student once, with its train seed shifted by ``seed_offset``."""
        exp = self.exp
        evaluations, distills = {"teacher": prepared["teacher_eval"]}, {}
        suffix = f" seed+{seed_offset}" if seed_offset else ""
        for spec in exp.students:
            if seed_offset:
                spec = spec.model_copy(update={"train": spec.train.model_copy(update={"seed": spec.train.seed + seed_offset})})
            inputs = self.student_inputs(prepared, spec)
            # ``data`` is keyed through the corpus it selects (the ``label`` input), like every other input.
            student_slice = {"spec": spec.model_dump(mode="json", exclude={"name", "data"}),
                             "max_length": exp.teacher.max_length, "workers": exp.ray.num_workers}
            distills[spec.name] = self.stage(
                "distill", f"distill {spec.name} ({spec.method}){suffix}",
                lambda cfg, ins, ctx, out, spec=spec: distill.run(cfg, spec, ins, ctx, out),
                student_slice, inputs, params=spec.model_dump(mode="json"), tags={"method": spec.method},
                artifacts=lambda art: {"student": art.path / STUDENT_DIR},
            )
            evaluations[spec.name] = self.stage(
                "evaluate", f"evaluate {spec.name}{suffix}", evaluate.run, exp.evaluate,
                {"model": distills[spec.name], "data": prepared["data"]})
        return build_summary(exp, evaluations, distills, prepared)

    def _run_stages(self) -> dict:
        import mlflow

        exp = self.exp
        prepared = self.prepare(exp.students)
        summaries = [self._run_students(prepared, offset) for offset in range(self.seeds)]
        summary = summaries[0]
        path = exp.workdir / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2))
        per_seed = exp.workdir / SEED_SUMMARIES
        if per_seed.exists():
            shutil.rmtree(per_seed)  # an earlier run with more seeds would otherwise leave its extra files behind
        per_seed.mkdir()
        for offset, seed_summary in enumerate(summaries):
            (per_seed / f"seed-{offset}.json").write_text(json.dumps(seed_summary, indent=2))
        mlflow.log_artifact(str(path))
        mlflow.log_metrics({f"{name}.dev_{metric}": value for name, s in summary["students"].items()
                            for metric, value in s["dev"].items()})
        self.console.print(summary_table(summary))
        paths = write_workdir_report(exp.workdir, summaries)
        for report_file in (paths.markdown, paths.pareto_png, paths.cost_png):
            mlflow.log_artifact(str(report_file), "report")
        verdict = "nothing recomputed" if self.counts["ran"] == 0 else f"{self.counts['ran']} stage(s) ran"
        self.console.print(f"{verdict}, {self.counts['cached']} cached. Summary: {path}; report: {paths.markdown}")
        return summary
