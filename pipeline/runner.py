"""The stage graph: data → teacher → label → distill (per student) → evaluate, each stage cached by content key."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import ray
from rich.console import Console

from kd.methods import get_method
from pipeline.artifacts import Artifact, ArtifactStore, content_key, write_result
from pipeline.config import ConfigError, Experiment, reads_mlm_teacher_head
from pipeline.ray_session import check_ray, ensure_ray
from pipeline.summary import SEED_SUMMARIES, SUMMARY_FILE, build_summary, summary_table, write_workdir_report
from pipeline.tracking import Tracker, log_report, remember_run
from stages import augment, data, distill, evaluate, label, mlm_teacher, mlm_topk, teacher, vocabulary
from stages.label import ensemble_temperature
from stages.student_training import STUDENT_DIR

log = logging.getLogger(__name__)

# Bump a stage's version when its code changes what it writes, so old cached outputs are not reused.
STAGE_VERSIONS = {"data": 1, "teacher": 1, "label": 1, "distill": 1, "evaluate": 1, "mlm_teacher": 1, "augment": 1,
                  "mlm_topk": 1, "vocabulary": 1, "evaluate_ensemble": 1}


def corpus_key(stage: str, data_name: str, temperature: float | None = None) -> str:
    """Where ``prepare`` keeps a stage's output over the task's train split ("task") or the augmented corpus,
    labelled by the teacher or (``temperature``) by the ensemble."""
    key = stage if data_name == "task" else f"{stage}:{data_name}"
    return key if temperature is None else f"{key}@ensemble-T{temperature:g}"


def student_corpus(spec) -> str | None:
    """The prepared Parquet a student trains on, or None for the plain train split: masked-LM top-k for
    TextSmooth, soft labels for the other cached-signal methods, for every student on the augmented corpus
    (its copies have no gold label, so the teacher's are what an online method reads too) and for every student
    learning from the ensemble (its logits stand in for the teacher's)."""
    method = get_method(spec.method)
    temperature = ensemble_temperature(spec)
    if "mlm_topk" in method.cached_signals:
        return corpus_key("mlm_topk", spec.data, temperature)
    if method.cached_signals or spec.data == "augmented" or temperature is not None:
        return corpus_key("label", spec.data, temperature)
    return None


def evaluate_slice(exp: Experiment, spec=None) -> dict:
    """The evaluate settings that bear on one model's evaluation: the early-exit sweep only on a FastBERT student
    (left out elsewhere, the other evaluations keep the keys they had before the sweep existed)."""
    sweeps = spec is not None and spec.method == "fastbert"
    return exp.evaluate.model_dump(mode="json", exclude=None if sweeps else {"exit_speeds"})


def teacher_slice(exp: Experiment, teacher_cfg) -> dict:
    # The masked-LM adaptation is a stage of its own: the classification teacher does not depend on it.
    return {"teacher": teacher_cfg.model_dump(mode="json", exclude={"mlm"}), "labels": exp.task.num_labels,
            "seed": exp.seed, "workers": exp.ray.num_workers}


def vocabulary_name(spec) -> str:
    return f"vocabulary:{spec.name}"


def members(prepared: dict[str, Artifact]) -> dict[str, Artifact]:
    """The ensemble's teacher artifacts under their stage-input names (member_0, member_1, …)."""
    return {name: artifact for name, artifact in prepared.items() if name.startswith(label.MEMBER_PREFIX)}


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
        with self.tracker.pipeline_run(self.exp.name, self.exp.model_dump(mode="json")) as run:
            remember_run(self.exp.workdir, self.tracker.tracking_uri, run.info.run_id)
            return self._run_stages()

    def prepare(self, students: Iterable) -> dict[str, Artifact]:
        """The stages students share: data, teacher and the teacher's evaluation, and what these students read:
        the masked-LM teacher, the augmented corpus, and soft labels and masked-LM top-k over either corpus."""
        exp = self.exp
        students = list(students)
        prepared = {"data": self.stage("data", "data", data.run, exp.task, {}, params=exp.task.model_dump(mode="json"))}
        ensure_ray(exp.ray)
        prepared["teacher"] = self.stage("teacher", "teacher", teacher.run, teacher_slice(exp, exp.teacher),
                                         {"data": prepared["data"]}, params=exp.teacher.model_dump(mode="json"))
        if any(spec.soft_labels == "ensemble" for spec in students):
            self.prepare_ensemble(prepared)
        for spec in students:
            vocabulary_key = get_method(spec.method)(spec.params).vocabulary_key()
            if vocabulary_key is not None:
                prepared[vocabulary_name(spec)] = self.stage(
                    "vocabulary", f"vocabulary ({spec.method}, {spec.name})",
                    lambda cfg, ins, ctx, out, spec=spec: vocabulary.run(cfg, spec, ins, ctx, out),
                    {"method": spec.method, **vocabulary_key},
                    {"data": prepared["data"], "teacher": prepared["teacher"]}, params=vocabulary_key)
        # (corpus, ensemble temperature or None for the teacher's soft labels) of each prepared Parquet
        labelled = sorted({(spec.data, ensemble_temperature(spec)) for spec in students if student_corpus(spec)},
                          key=repr)
        smoothed = sorted({(spec.data, ensemble_temperature(spec)) for spec in students
                           if "mlm_topk" in get_method(spec.method).cached_signals}, key=repr)
        tinybert_rule = any(data_name == "augmented" for data_name, _ in labelled) and exp.augment.rule == "tinybert"
        if smoothed or tinybert_rule or any(reads_mlm_teacher_head(spec) for spec in students):
            prepared["mlm_teacher"] = self.stage(
                "mlm_teacher", "masked-LM teacher", mlm_teacher.run,
                {"mlm": exp.teacher.mlm, "max_length": exp.teacher.max_length, "seed": exp.seed},
                {"data": prepared["data"], "teacher": prepared["teacher"]}, params=exp.teacher.mlm.model_dump())
        if any(data_name == "augmented" for data_name, _ in labelled):
            augment_inputs = {"data": prepared["data"]}
            if tinybert_rule:
                augment_inputs["mlm_teacher"] = prepared["mlm_teacher"]
            prepared["augment"] = self.stage(
                "augment", f"augment ({exp.augment.rule})", augment.run,
                {"augment": exp.augment, "teacher": exp.teacher.source, "max_length": exp.teacher.max_length},
                augment_inputs, params=exp.augment.model_dump())
        for data_name, temperature in labelled:
            where = [data_name] if data_name != "task" else []
            if temperature is None:
                label_inputs = {"data": prepared["data"], "teacher": prepared["teacher"]}
                label_slice, run_label = {"max_length": exp.teacher.max_length}, label.run
            else:
                label_inputs = {"data": prepared["data"], **members(prepared)}
                label_slice = {"max_length": [member.max_length for member in exp.ensemble.teachers],
                               "temperature": temperature}
                run_label = lambda cfg, ins, ctx, out, t=temperature: label.run(cfg, ins, ctx, out, t)  # noqa: E731
                where.append(f"ensemble, T={temperature:g}")
            if data_name == "augmented":
                label_inputs["augment"] = prepared["augment"]
            prepared[corpus_key("label", data_name, temperature)] = self.stage(
                "label", "soft labels" + (f" ({', '.join(where)})" if where else ""), run_label, label_slice,
                label_inputs)
        for data_name, temperature in smoothed:
            prepared[corpus_key("mlm_topk", data_name, temperature)] = self.stage(
                "mlm_topk", "masked-LM top-k" + ("" if data_name == "task" else f" ({data_name})"), mlm_topk.run,
                {"k": exp.label.mlm_top_k, "max_length": exp.teacher.max_length},
                {"label": prepared[corpus_key("label", data_name, temperature)], "mlm_teacher": prepared["mlm_teacher"]})
        prepared["teacher_eval"] = self.stage("evaluate", "evaluate teacher", evaluate.run, evaluate_slice(exp),
                                              {"model": prepared["teacher"], "data": prepared["data"]})
        return prepared

    def prepare_ensemble(self, prepared: dict[str, Artifact]) -> None:
        """Each member of the ensemble as a teacher artifact of its own (a member equal to ``teacher`` is that
        artifact, from the cache), and the ensemble's own evaluation."""
        exp = self.exp
        count = len(exp.ensemble.teachers)
        for index, member in enumerate(exp.ensemble.teachers):
            prepared[f"{label.MEMBER_PREFIX}{index}"] = self.stage(
                "teacher", f"teacher {index + 1}/{count} of the ensemble",
                lambda cfg, ins, ctx, out, member=member: teacher.run(cfg.model_copy(update={"teacher": member}),
                                                                      ins, ctx, out),
                teacher_slice(exp, member), {"data": prepared["data"]}, params=member.model_dump(mode="json"))
        prepared["ensemble_eval"] = self.stage(
            "evaluate_ensemble", "evaluate ensemble", evaluate.run_ensemble,
            {"evaluate": evaluate_slice(exp), "max_length": [member.max_length for member in exp.ensemble.teachers]},
            {"data": prepared["data"], **members(prepared)})

    @staticmethod
    def student_inputs(prepared: dict[str, Artifact], spec,
                       distills: dict[str, Artifact] | None = None) -> dict[str, Artifact]:
        """A student's stage inputs; ``label`` is the prepared Parquet it trains on, when it is not the train split,
        ``vocabulary`` its own tokenizer, ``mlm_teacher`` the masked LM whose head it takes (the distill stage fills
        in ``params.mlm_head``, so the student's key follows that artifact's key, not its path), and ``source`` the
        distilled student it starts from (in ``distills``)."""
        inputs = {"data": prepared["data"], "teacher": prepared["teacher"]}
        corpus = student_corpus(spec)
        if corpus is not None:
            inputs["label"] = prepared[corpus]
        if reads_mlm_teacher_head(spec):
            inputs["mlm_teacher"] = prepared["mlm_teacher"]
        if vocabulary_name(spec) in prepared:
            inputs["vocabulary"] = prepared[vocabulary_name(spec)]
        source = get_method(spec.method)(spec.params).starts_from()
        if source is not None:
            if source not in (distills or {}):
                raise ConfigError(f"{spec.name} starts from student {source!r}, which is not distilled here; "
                                  "a search can only start from the teacher")
            inputs["source"] = distills[source]
        return inputs

    def _run_students(self, prepared: dict[str, Artifact], seed_offset: int) -> dict:
        """Distil and evaluate every student once, with its train seed shifted by ``seed_offset``."""
        exp = self.exp
        evaluations, distills, train_rows = {"teacher": prepared["teacher_eval"]}, {}, {}
        suffix = f" seed+{seed_offset}" if seed_offset else ""
        # Students built from another student's model come after the others.
        ordered = sorted(exp.students, key=lambda spec: get_method(spec.method)(spec.params).starts_from() is not None)
        for spec in ordered:
            if seed_offset:
                spec = spec.model_copy(update={"train": spec.train.model_copy(update={"seed": spec.train.seed + seed_offset})})
            inputs = self.student_inputs(prepared, spec, distills)
            train_rows[spec.name] = distill.train_corpus(inputs)[1]
            # ``data`` and ``soft_labels`` are keyed through the corpus they select (the ``label`` input).
            student_slice = {"spec": spec.model_dump(mode="json", exclude={"name", "data", "soft_labels"}),
                             "max_length": exp.teacher.max_length, "workers": exp.ray.num_workers}
            distills[spec.name] = self.stage(
                "distill", f"distill {spec.name} ({spec.method}){suffix}",
                lambda cfg, ins, ctx, out, spec=spec: distill.run(cfg, spec, ins, ctx, out),
                student_slice, inputs, params=spec.model_dump(mode="json"), tags={"method": spec.method},
                artifacts=lambda art: {"student": art.path / STUDENT_DIR},
            )
            evaluations[spec.name] = self.stage(
                "evaluate", f"evaluate {spec.name}{suffix}", evaluate.run, evaluate_slice(exp, spec),
                {"model": distills[spec.name], "data": prepared["data"]})
        model_dirs = {"teacher": prepared["teacher"].path, **{name: art.path for name, art in distills.items()}}
        timings = self.time_models(model_dirs, prepared["data"].path)
        return build_summary(exp, evaluations, distills, prepared, train_rows, timings)

    def time_models(self, model_dirs: dict[str, Path], data_dir: Path) -> dict[str, dict]:
        """Latencies of the teacher and every student, taken now and together. Each evaluation timed its model
        alone, in this run or an earlier one, under whatever else the machine was doing then; a speedup divides
        two latencies, so the summary takes both from one interleaved timing of all the models."""
        names = list(model_dirs)
        with self.console.status(f"[bold]timing {len(names)} models together[/bold] …"):
            timings = ray.get(self.evaluator().time_models.remote(
                [str(model_dirs[name] / STUDENT_DIR) for name in names], str(data_dir), self.exp, early_exit=True))
        return dict(zip(names, timings, strict=True))

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
        log_report(exp.workdir, paths.files())
        verdict = "nothing recomputed" if self.counts["ran"] == 0 else f"{self.counts['ran']} stage(s) ran"
        self.console.print(f"{verdict}, {self.counts['cached']} cached. Summary: {path}; report: {paths.markdown}")
        return summary
