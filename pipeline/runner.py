"""The stage graph: data → teacher → labels / augment / masked-LM → students → evaluations.

The runner first plans every stage as a node (its stage function, the typed config slice it receives, the nodes
it reads), then runs the nodes in order. A node's key hashes exactly the slice it receives (less its ``unkeyed``
fields), its inputs' keys and the source files its code runs (``pipeline.code_keys``), so a change to a method's
loss reruns that method's students and their evaluations, and nothing upstream. ``dry_run`` computes every key
without running anything and says why each stage would run.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import ray
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kd.methods import get_method
from pipeline.artifacts import Artifact, ArtifactStore, content_key, write_result
from pipeline.code_keys import code_digests
from pipeline.config import ConfigError, Experiment
from pipeline.generation import build_generation_summary, generation_table
from pipeline.ray_session import check_ray, ensure_ray, link_worker_logs, quiet_console
from pipeline.schedule import START, Scheduler, cpu_budget, stage_capacity
from pipeline.summary import build_summary, summary_table, write_summaries, write_workdir_report
from pipeline.tracking import Tracker, log_report, remember_run
from stages import (augment, cmlm_teacher, cmlm_topk, data, distill, evaluate, evaluate_generation, general, label,
                    mlm_teacher, mlm_topk, teacher, vocabulary)
from stages.config import StageConfig
from kd.errors import StageError
from stages.label import ensemble_temperature
from stages.progress import progress_board
from kd.layout import ENCODER_DIR, MLM_DIR, STUDENT_DIR

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
RESWEEP_S = 2.0  # how often the scheduler looks again while no stage finishes (its cap may have grown)


def cluster_resources() -> dict[str, float] | None:
    """The Ray cluster's resources, or None before Ray is up."""
    return ray.cluster_resources() if ray.is_initialized() else None


def corpus_key(stage: str, data_name: str, temperature: float | None = None) -> str:
    """Where ``prepare`` keeps a stage's output over the task's train split ("task") or the augmented corpus,
    labelled by the teacher or (``temperature``) by the ensemble."""
    key = stage if data_name == "task" else f"{stage}:{data_name}"
    return key if temperature is None else f"{key}@ensemble-T{temperature:g}"


# Cached signals that are a prepared corpus of their own: the teacher's readings joined to the train rows.
READINGS = ("mlm_topk", "cmlm_topk")


def student_corpus(spec) -> str | None:
    """The prepared Parquet a student trains on, or None for the plain train split: masked-LM top-k for
    TextSmooth, the C-MLM teacher's top-k for a cmlm student, soft labels for the other cached-signal methods, for
    every student on the augmented corpus (its copies have no gold label, so the teacher's are what an online method
    reads too) and for every student learning from the ensemble (its logits stand in for the teacher's)."""
    method = get_method(spec.method)
    temperature = ensemble_temperature(spec)
    for readings in READINGS:
        if readings in method.cached_signals:
            return corpus_key(readings, spec.data, temperature)
    if method.cached_signals or spec.data == "augmented" or temperature is not None:
        return corpus_key("label", spec.data, temperature)
    return None


def without_mlm(teacher_config):
    """The teacher block as the stages after the teacher read it: its masked-LM adaptation is a stage of its own,
    which only the stages that read the masked-LM teacher depend on."""
    return teacher_config.model_copy(update={"mlm": None})


def vocabulary_name(spec) -> str:
    return f"vocabulary:{spec.name}"


def general_name(entry_name: str) -> str:
    return f"general:{entry_name}"


def members(prepared: dict[str, Artifact]) -> dict[str, Artifact]:
    """The ensemble's teacher artifacts under their stage-input names (member_0, member_1, …)."""
    return {name: artifact for name, artifact in prepared.items() if name.startswith(label.MEMBER_PREFIX)}


class StageFailures(StageError):
    """Every stage that failed in a run, and every stage not run because an input of it failed."""

    def __init__(self, failures: dict[str, str], skipped: set[str]):
        self.failures = failures
        failed = {name: reason for name, reason in failures.items() if name not in skipped}
        after = f"; {len(skipped)} stage(s) that read it did not run" if skipped else ""
        if len(failed) == 1:
            (name, reason), = failed.items()
            message = f"{reason} (stage {name!r}{after})"
        else:
            message = (f"{len(failed)} stages failed{after}; a rerun runs only what did not finish:\n"
                       + "\n".join(f"  {name}: {reason}" for name, reason in failed.items()))
        super().__init__(message)


class StageBoard:
    """The live table of stages running now, with their elapsed time and, for training stages, the progress line
    their worker posts (``stages.progress``); finished ones are printed above it."""

    POLL_SECONDS = 2.0

    def __init__(self, console: Console):
        self.console = console
        self.started: dict[str, float] = {}
        self.states: dict[str, str] = {}
        self.keys: dict[str, str] = {}
        self.lines: dict[str, str] = {}
        self.progress = None  # the ProgressBoard actor, once Ray is up
        self._lock = threading.Lock()

    def start(self, name: str, key: str | None = None) -> None:
        with self._lock:
            self.started[name] = time.perf_counter()
            self.states[name] = "running"
            if key is not None:
                self.keys[name] = key

    def poll(self) -> None:
        """Read the posted progress lines; a slow or missing board leaves the last ones shown."""
        if self.progress is None or not self.started:
            return
        try:
            lines = ray.get(self.progress.read.remote(), timeout=self.POLL_SECONDS)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return
        with self._lock:
            self.lines = lines

    def finish(self, name: str, state: str) -> None:
        with self._lock:
            self.states[name] = state
            self.started.pop(name, None)

    def __rich__(self) -> Table:
        with self._lock:
            running = dict(self.started)
            counts = {state: sum(1 for s in self.states.values() if s == state) for state in ("done", "cached", "failed")}
        table = Table(title=", ".join(f"{n} {state}" for state, n in counts.items() if n) or None, box=None)
        table.add_column("running")
        table.add_column("elapsed", justify="right")
        table.add_column("progress")
        now = time.perf_counter()
        for name, started in running.items():
            # Text, not markup: a line such as "[train] epoch 1/2" would lose its brackets as a style tag.
            table.add_row(name, f"{now - started:.0f}s", Text(self.lines.get(self.keys.get(name, ""), "")))
        return table

    @contextmanager
    def live(self):
        # One live display for the whole run: rich allows one at a time, and stages now run side by side.
        stop = threading.Event()

        def poll_until_stopped() -> None:
            while not stop.wait(self.POLL_SECONDS):
                self.poll()

        poller = threading.Thread(target=poll_until_stopped, name="stage-progress", daemon=True)
        poller.start()
        try:
            with Live(self, console=self.console, refresh_per_second=2, transient=True):
                yield
        finally:
            stop.set()
            poller.join()


@dataclass
class StageContext:
    key: str
    console: Console
    evaluator: Callable[[], object]


@dataclass
class StageNode:
    """One stage to run: ``run(config, inputs, ctx, out)`` with ``inputs`` the artifacts of the nodes named in
    ``inputs`` (stage-input name → node name). ``code`` lists the modules beyond ``run``'s own whose source the
    output depends on (a student's method)."""

    name: str
    stage: str
    run: Callable[..., dict]
    config: StageConfig
    inputs: dict[str, str] = field(default_factory=dict)
    code: tuple[str, ...] = ()
    params: dict | None = None
    tags: dict | None = None
    artifacts: Callable[[Artifact], dict] | None = None

    @property
    def code_roots(self) -> tuple[str, ...]:
        return (self.run.__module__, *self.code)


@dataclass
class Planned:
    """A node with what its key is made of."""

    node: StageNode
    key: str
    config: dict
    inputs: dict[str, str]
    code: dict[str, str]

    def manifest(self) -> dict:
        return {"node": self.node.name, "config": self.config, "inputs": self.inputs, "code": self.code}


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [path for name in sorted(set(old) | set(new))
                for path in changed_keys(old.get(name), new.get(name), f"{prefix}.{name}" if prefix else str(name))]
    return [] if old == new else [prefix or "(value)"]


def why_rerun(planned: Planned, previous: dict | None) -> str:
    """Why a node is not cached, against the manifest of the last artifact this node wrote."""
    if previous is None:
        return "never ran"
    reasons = []
    config = changed_keys(previous.get("config"), planned.config)
    if config:
        reasons.append("config changed: " + ", ".join(config[:4]) + (" …" if len(config) > 4 else ""))
    inputs = [name for name in sorted(set(previous.get("inputs", {})) | set(planned.inputs))
              if previous.get("inputs", {}).get(name) != planned.inputs.get(name)]
    if inputs:
        reasons.append("input changed: " + ", ".join(inputs))
    code = changed_keys(previous.get("code"), planned.code)
    if code:
        reasons.append("code changed: " + ", ".join(code[:4]) + (" …" if len(code) > 4 else ""))
    return "; ".join(reasons) or "output missing"


class PipelineRunner:
    def __init__(self, exp: Experiment, console: Console | None = None, seeds: int = 1, verbose: bool = True):
        self.exp = exp
        self.seeds = seeds
        self.verbose = verbose
        self.console = console or Console()
        self.store = ArtifactStore(exp.workdir / "artifacts")
        self.tracker: Tracker | None = None
        self._evaluator = None
        self.counts = {"ran": 0, "cached": 0}
        self.nodes: dict[str, StageNode] = {}
        self.done: dict[str, Artifact] = {}
        self._planned: dict[str, Planned] = {}
        self._ray_started = False
        self._lock = threading.RLock()
        self.board = StageBoard(self.console)

    # --- planning -------------------------------------------------------------------------------------------

    def add(self, node: StageNode) -> str:
        """Plan a node (once: students that share a stage share its node) and return its name."""
        self.nodes.setdefault(node.name, node)
        return node.name

    def planned(self, name: str) -> Planned:
        """The node's key and what it is made of; its inputs' keys first."""
        if name not in self._planned:
            node = self.nodes[name]
            inputs = {input_name: self.planned(ref).key for input_name, ref in node.inputs.items()}
            config, code = node.config.key_values(), code_digests(node.code_roots)
            key = content_key(node.stage, config, inputs, code)
            self._planned[name] = Planned(node, key, config, inputs, code)
        return self._planned[name]

    def plan_prepare(self, students: Iterable) -> dict[str, str]:
        """The stages students share: data, teacher and the teacher's evaluation, and what these students read:
        the masked-LM teacher, the augmented corpus, and soft labels and masked-LM top-k over either corpus.
        Returns the node of each, by its stage-input name."""
        exp = self.exp
        students = list(students)
        if self.generates:
            return self.plan_generation(students)
        teacher_block = without_mlm(exp.teacher)
        refs = {"data": self.plan_data()}
        refs["teacher"] = self.add(StageNode("teacher", "teacher", teacher.run,
                                             teacher.Config.of(exp, teacher=teacher_block), {"data": refs["data"]},
                                             params=exp.teacher.model_dump(mode="json")))
        if any(spec.soft_labels == "ensemble" for spec in students):
            self.plan_ensemble(refs)
        for spec in students:
            vocabulary_key = spec.method_object().vocabulary_key()
            if vocabulary_key is not None:
                refs[vocabulary_name(spec)] = self.add(StageNode(
                    f"vocabulary ({spec.method}, {spec.name})", "vocabulary", vocabulary.run,
                    vocabulary.Config.of(exp, student=spec, method=spec.method, vocabulary=vocabulary_key),
                    {"data": refs["data"], "teacher": refs["teacher"]}, code=(get_method(spec.method).__module__,),
                    params=vocabulary_key))
        # (corpus, ensemble temperature or None for the teacher's soft labels) of each prepared Parquet
        labelled = sorted({(spec.data, ensemble_temperature(spec)) for spec in students if student_corpus(spec)},
                          key=repr)
        smoothed = sorted({(spec.data, ensemble_temperature(spec)) for spec in students
                           if "mlm_topk" in get_method(spec.method).cached_signals}, key=repr)
        if smoothed or any(spec.method_object().reads_mlm_teacher() for spec in students):
            self.plan_mlm_teacher(refs)
        if any(data_name == "augmented" for data_name, _ in labelled):
            self.plan_augment(refs)
        for name in sorted({spec.student.general_source for spec in students} - {None}):
            self.plan_general(exp.general_entry(name), refs)
        for data_name, temperature in labelled:
            where = [data_name] if data_name != "task" else []
            if temperature is None:
                label_inputs = {"data": refs["data"], "teacher": refs["teacher"]}
                label_config = label.Config.of(exp, teacher=teacher_block, ensemble=None, temperature=None)
            else:
                label_inputs = {"data": refs["data"], **members(refs)}
                label_config = label.Config.of(exp, teacher=teacher_block, temperature=temperature)
                where.append(f"ensemble, T={temperature:g}")
            if data_name == "augmented":
                label_inputs["augment"] = refs["augment"]
            refs[corpus_key("label", data_name, temperature)] = self.add(StageNode(
                "soft labels" + (f" ({', '.join(where)})" if where else ""), "label", label.run, label_config,
                label_inputs))
        for data_name, temperature in smoothed:
            refs[corpus_key("mlm_topk", data_name, temperature)] = self.add(StageNode(
                "masked-LM top-k" + ("" if data_name == "task" else f" ({data_name})")
                + ("" if temperature is None else f" (ensemble, T={temperature:g})"), "mlm_topk", mlm_topk.run,
                mlm_topk.Config.of(exp, teacher=teacher_block, k=exp.label.mlm_top_k),
                {"label": refs[corpus_key("label", data_name, temperature)], "mlm_teacher": refs["mlm_teacher"]}))
        refs["teacher_eval"] = self.add(StageNode(
            "evaluate teacher", "evaluate", evaluate.run, evaluate.Config.of(exp, teacher=teacher_block),
            {"model": refs["teacher"], "data": refs["data"]}))
        return refs

    @property
    def generates(self) -> bool:
        """A generation task: its teacher is a C-MLM teacher and its students seq2seq models (docs/generation.md)."""
        return self.exp.task.task_type == "seq2seq"

    def plan_data(self) -> str:
        return self.add(StageNode("data", "data", data.run, data.Config.of(self.exp),
                                  params=self.exp.task.model_dump(mode="json")))

    def plan_generation(self, students: list) -> dict[str, str]:
        """A generation task's shared stages: the data, the C-MLM teacher (the students' ``teacher`` input), and its
        top-k readings of the train pairs when a student learns from them."""
        exp = self.exp
        refs = {"data": self.plan_data()}
        refs["teacher"] = self.add(StageNode(
            "C-MLM teacher", "cmlm_teacher", cmlm_teacher.run,
            cmlm_teacher.Config.of(exp, teacher=without_mlm(exp.teacher), cmlm=exp.cmlm.teacher_settings()),
            {"data": refs["data"]}, params=exp.cmlm.teacher_settings().model_dump(),
            artifacts=lambda art: {"cmlm_teacher": art.path / MLM_DIR}))
        for corpus in sorted({student_corpus(spec) for spec in students} - {None}):
            readings = {name: getattr(exp.cmlm, name) for name in cmlm_topk.Config.model_fields if name != "label"}
            refs[corpus] = self.add(StageNode(
                "C-MLM top-k", "cmlm_topk", cmlm_topk.run, cmlm_topk.Config.of(exp, **readings),
                {"data": refs["data"], "cmlm_teacher": refs["teacher"]}, params=readings))
        return refs

    def generation_evaluation(self) -> evaluate_generation.Config:
        return evaluate_generation.Config.of(self.exp.evaluate, max_source_length=self.exp.cmlm.max_source_length)

    def plan_evaluation(self, spec, distill_ref: str, refs: dict[str, str], suffix: str) -> str:
        exp = self.exp
        if self.generates:
            return self.add(StageNode(
                f"evaluate {spec.name}{suffix}", "evaluate_generation", evaluate_generation.run,
                self.generation_evaluation(),
                {"model": distill_ref, "data": refs["data"]}))
        sweeps = exp.evaluate.exit_speeds if get_method(spec.method).exits_early else []
        return self.add(StageNode(
            f"evaluate {spec.name}{suffix}", "evaluate", evaluate.run,
            evaluate.Config.of(exp, teacher=without_mlm(exp.teacher), exit_speeds=sweeps),
            {"model": distill_ref, "data": refs["data"]}))

    def plan_mlm_teacher(self, refs: dict[str, str]) -> str:
        refs["mlm_teacher"] = self.add(StageNode(
            "masked-LM teacher", "mlm_teacher", mlm_teacher.run, mlm_teacher.Config.of(self.exp),
            {"data": refs["data"], "teacher": refs["teacher"]}, params=self.exp.teacher.mlm.model_dump()))
        return refs["mlm_teacher"]

    def plan_augment(self, refs: dict[str, str]) -> str:
        """The augmented transfer corpus; its TinyBERT rule draws replacements from the masked-LM teacher."""
        exp = self.exp
        inputs = {"data": refs["data"]}
        if exp.augment.rule == "tinybert":
            inputs["mlm_teacher"] = self.plan_mlm_teacher(refs)
        refs["augment"] = self.add(StageNode(
            f"augment ({exp.augment.rule})", "augment", augment.run,
            augment.Config.of(exp, teacher=without_mlm(exp.teacher)), inputs, params=exp.augment.model_dump()))
        return refs["augment"]

    def plan_general(self, entry, refs: dict[str, str]) -> str:
        """A general distillation (``general:`` entry): it reads the task's data only for a ``task`` or
        ``augmented`` corpus and the teachers it learns from, so one over WordNet from the pre-trained checkpoint
        starts with the run, beside the teacher's fine-tuning."""
        inputs = {}
        if entry.corpus.source in ("task", "augmented"):
            inputs["data"] = refs["data"]
        if entry.corpus.source == "augmented":
            inputs["augment"] = self.plan_augment(refs)
        if entry.teacher == "finetuned":
            inputs["teacher"] = refs["teacher"]
        if entry.teacher == "mlm" or entry.losses.masked:
            inputs["mlm_teacher"] = self.plan_mlm_teacher(refs)
        name = general_name(entry.name)
        refs[name] = self.add(StageNode(
            f"general distillation ({entry.name})", "general", general.run,
            general.Config.of(self.exp, general=entry, teacher=without_mlm(self.exp.teacher)), inputs,
            params=entry.model_dump(mode="json"), artifacts=lambda art: {"encoder": art.path / ENCODER_DIR}))
        return refs[name]

    def plan_ensemble(self, refs: dict[str, str]) -> None:
        """Each member of the ensemble as a teacher node of its own (a member equal to ``teacher`` is that node's
        artifact, from the cache), and the ensemble's own evaluation."""
        exp = self.exp
        count = len(exp.ensemble.teachers)
        for index, member in enumerate(exp.ensemble.teachers):
            refs[f"{label.MEMBER_PREFIX}{index}"] = self.add(StageNode(
                f"teacher {index + 1}/{count} of the ensemble", "teacher", teacher.run,
                teacher.Config.of(exp, teacher=member), {"data": refs["data"]},
                params=member.model_dump(mode="json")))
        refs["ensemble_eval"] = self.add(StageNode(
            "evaluate ensemble", "evaluate_ensemble", evaluate.run_ensemble,
            evaluate.EnsembleEvaluationConfig.of(exp, teacher=without_mlm(exp.teacher)),
            {"data": refs["data"], **members(refs)}))

    @staticmethod
    def student_refs(refs: dict[str, str], spec, distills: dict[str, str] | None = None) -> dict[str, str]:
        """A student's stage inputs; ``label`` is the prepared Parquet it trains on, when it is not the train split,
        ``vocabulary`` its own tokenizer, ``mlm_teacher`` the masked LM whose head it takes (the distill stage fills
        in ``params.mlm_head``, so the student's key follows that artifact's key, not its path), and ``source`` the
        distilled student it starts from (in ``distills``)."""
        inputs = {"data": refs["data"], "teacher": refs["teacher"]}
        corpus = student_corpus(spec)
        if corpus is not None:
            inputs["label"] = refs[corpus]
        if spec.method_object().reads_mlm_teacher():
            inputs["mlm_teacher"] = refs["mlm_teacher"]
        if vocabulary_name(spec) in refs:
            inputs["vocabulary"] = refs[vocabulary_name(spec)]
        if spec.student.general_source is not None:
            inputs["layers"] = refs[general_name(spec.student.general_source)]
        source = spec.method_object().starts_from()
        if source is not None:
            if source not in (distills or {}):
                raise ConfigError(f"{spec.name} starts from student {source!r}, which is not distilled here; "
                                  "a search can only start from the teacher")
            inputs["source"] = distills[source]
        return inputs

    def student_inputs(self, prepared: dict[str, Artifact], spec) -> dict[str, Artifact]:
        """``student_refs`` over artifacts that ``prepare`` returned."""
        return {name: prepared[ref] for name, ref in self.student_refs({k: k for k in prepared}, spec).items()}

    def plan_students(self, refs: dict[str, str], seed_offset: int) -> dict[str, tuple[Any, str, str]]:
        """Every student's distill and evaluate nodes, with its train seed shifted by ``seed_offset``: by name,
        (its entry, its distill node, its evaluate node)."""
        exp = self.exp
        planned, distills = {}, {}
        suffix = f" seed+{seed_offset}" if seed_offset else ""
        # Students built from another student's model come after the others.
        ordered = sorted(exp.students, key=lambda spec: spec.method_object().starts_from() is not None)
        for spec in ordered:
            if seed_offset:
                spec = spec.model_copy(update={"train": spec.train.model_copy(update={"seed": spec.train.seed + seed_offset})})
            distills[spec.name] = self.add(StageNode(
                f"distill {spec.name} ({spec.method}){suffix}", "distill", distill.run,
                distill.Config.of(exp, student=spec, teacher=without_mlm(exp.teacher)),
                self.student_refs(refs, spec, distills), code=(get_method(spec.method).__module__,),
                params=spec.model_dump(mode="json"), tags={"method": spec.method},
                artifacts=lambda art: {"student": art.path / STUDENT_DIR}))
            evaluation = self.plan_evaluation(spec, distills[spec.name], refs, suffix)
            planned[spec.name] = (spec, distills[spec.name], evaluation)
        return planned

    def plan(self) -> tuple[dict[str, str], list[dict[str, tuple[Any, str, str]]]]:
        refs = self.plan_prepare(self.exp.students)
        for entry in self.exp.general:  # also those no student starts from: their encoders are outputs too
            self.plan_general(entry, refs)
        return refs, [self.plan_students(refs, offset) for offset in range(self.seeds)]

    # --- running --------------------------------------------------------------------------------------------

    def previous_manifest(self, planned: Planned) -> dict | None:
        """The manifest of the newest artifact this node wrote under another key."""
        manifests = [(path.stat().st_mtime, path) for path in (self.store.root / planned.node.stage).glob(f"*/{MANIFEST_FILE}")]
        for _, path in sorted(manifests, reverse=True):
            manifest = json.loads(path.read_text())
            if manifest.get("node") == planned.node.name:
                return manifest
        return None

    def dry_run(self) -> list[dict]:
        """Every stage of the experiment as cached, or to run with the reason; runs nothing, starts nothing."""
        self.plan()
        rows = []
        for name, node in self.nodes.items():
            planned = self.planned(name)
            cached = self.store.lookup(node.stage, planned.key) is not None
            rows.append({"stage": name, "key": f"{node.stage}/{planned.key}", "cached": cached,
                         "reason": "" if cached else why_rerun(planned, self.previous_manifest(planned))})
        table = Table(title=f"{self.exp.name}: {sum(not r['cached'] for r in rows)} of {len(rows)} stages to run")
        for column in ("stage", "state", "why", "key"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["stage"], "[dim]cached[/dim]" if row["cached"] else "[yellow]to run[/yellow]",
                          row["reason"], row["key"])
        self.console.print(table)
        return rows

    def execute(self, name: str) -> Artifact:
        """Run one node whose inputs are done (or take it from the cache), and log it to MLflow."""
        node, planned = self.nodes[name], self.planned(name)
        inputs = {input_name: self.done[ref] for input_name, ref in node.inputs.items()}
        artifact = self.store.lookup(node.stage, planned.key)
        cached = artifact is not None
        if cached:
            self.board.finish(name, "cached")
            self.console.print(f"[dim]✓ {name}: cached ({node.stage}/{planned.key})[/dim]")
        else:
            if node.stage != "data":
                self.start_ray()  # the data is checked before Ray's seconds of start-up are spent
            self.board.start(name, planned.key)
            started, started_at = time.perf_counter(), time.time()
            with self.store.writing(node.stage, planned.key) as scratch:
                result = node.run(node.config, inputs, StageContext(planned.key, self.console, self.evaluator),
                                  scratch)
                # Wall-clock bounds, so that stages run side by side can be seen to overlap (and schedules replayed).
                result.update(seconds=round(time.perf_counter() - started, 2), started_at=started_at,
                              finished_at=time.time())
                write_result(scratch, result)
                (scratch / MANIFEST_FILE).write_text(json.dumps(planned.manifest(), indent=2))
            artifact = self.store.lookup(node.stage, planned.key)
            self.board.finish(name, "done")
            self.console.print(f"[green]✓[/green] {name}: done in {artifact.result()['seconds']:.1f}s "
                               f"({node.stage}/{planned.key})")
        with self._lock:
            self.counts["cached" if cached else "ran"] += 1
        result = artifact.result()
        self.tracker.log_stage(
            name, params=node.params or {}, result=result,
            tags={"stage": node.stage, "key": planned.key, "cached": str(cached).lower(), **(node.tags or {})},
            artifacts=node.artifacts(artifact) if node.artifacts else None, history=result.get("history"),
        )
        self.done[name] = artifact
        return artifact

    def concurrency(self) -> int:
        """How many stages may run at once: ``ray.max_concurrent_stages``, else as many training stages as the
        cluster's CPUs (and GPUs) hold, one CPU left for the Ray Data reads that feed them. Before Ray is up only
        the data stage can run, so one."""
        return stage_capacity(self.exp.ray, cluster_resources)

    def cpu_budget(self) -> float | None:
        """The CPUs running stages' actors may hold at once: the cluster's less one for Ray Data's reads (None
        before Ray is up, when ``concurrency`` allows one stage)."""
        return cpu_budget(cluster_resources())

    def scheduling(self) -> dict:
        """What the scheduler knows of the planned nodes besides their inputs, for ``Scheduler`` and ``simulate``
        alike: each node's artifact key (nodes of one key never compute it side by side) and the CPUs its actors
        hold."""
        return {"keys": {name: (node.stage, self.planned(name).key) for name, node in self.nodes.items()},
                "cpus": {name: node.config.cpus_held() for name, node in self.nodes.items()}}

    def execute_all(self) -> None:
        """Run every planned node as soon as its inputs are done, up to ``concurrency()`` at once. A failed node
        fails the nodes that read it and no others; once nothing more can run, every failure is raised together."""
        # The policy; benchmarks/bench_schedule.py simulates it.
        scheduler = Scheduler(self.nodes, done=self.done, **self.scheduling())
        running: dict[Future, str] = {}
        with ThreadPoolExecutor(thread_name_prefix="stage") as pool, self.board.live():
            while True:
                for action, name in scheduler.sweep(self.concurrency, self.cpu_budget):
                    if action == START:
                        running[pool.submit(self.execute, name)] = name
                    else:
                        self.board.finish(name, "skipped")
                if not running:
                    break
                # The cap can grow while nothing finishes: Ray starts inside the first stage that needs it (one
                # stage at a time until then; a cold benchmark's teacher trained alone for 10 min beside two idle
                # ensemble members), and an autoscaling cluster adds nodes. A sweep is cheap.
                finished, _ = wait(running, timeout=RESWEEP_S, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    error = future.exception()
                    if error is None:
                        scheduler.finish(name)
                    else:
                        scheduler.fail(name, str(error) if isinstance(error, StageError)
                                       else f"{type(error).__name__}: {error}")
                        self.board.finish(name, "failed")
                        log.debug("stage %s failed", name, exc_info=error)
        if scheduler.failed:
            raise StageFailures(scheduler.failed, scheduler.skipped)

    def start_ray(self) -> None:
        with self._lock:
            if not self._ray_started:
                if not self.verbose:
                    quiet_console()
                ensure_ray(self.exp.ray, log_to_driver=self.verbose)
                self._ray_started = True
                self.board.progress = progress_board()
                if not self.verbose:
                    logs = link_worker_logs(self.exp.workdir)
                    if logs is not None:
                        self.console.print(f"[dim]worker output: {logs} (run with -v to see it here)[/dim]")

    def evaluator(self):
        """The run's evaluation actor, started on first use."""
        self.start_ray()
        with self._lock:
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
        """Plan and run the stages ``students`` share; their artifacts by stage-input name."""
        refs = self.plan_prepare(students)
        self.execute_all()
        return {name: self.done[ref] for name, ref in refs.items()}

    def summarise(self, prepared: dict[str, Artifact], students: dict[str, tuple[Any, str, str]]):
        """One seed's summary, with the teacher and every student timed together now (a generation task's students
        together, without a teacher: a masked LM generates nothing to time against)."""
        evaluations = {} if self.generates else {"teacher": prepared["teacher_eval"]}
        distills, train_rows = {}, {}
        for student_name, (spec, distill_node, evaluate_node) in students.items():
            distills[student_name] = self.done[distill_node]
            evaluations[student_name] = self.done[evaluate_node]
            inputs = {name: self.done[ref] for name, ref in self.nodes[distill_node].inputs.items()}
            train_rows[student_name] = distill.train_corpus(inputs)[1]
        if self.generates:
            timings = self.time_generators({name: art.path / STUDENT_DIR for name, art in distills.items()},
                                           prepared["data"].path)
            return build_generation_summary(self.exp, evaluations, distills, prepared, train_rows, timings)
        model_dirs = {"teacher": prepared["teacher"].path, **{name: art.path for name, art in distills.items()}}
        timings = self.time_models(model_dirs, prepared["data"].path)
        return build_summary(self.exp, evaluations, distills, prepared, train_rows, timings)

    def time_models(self, model_dirs: dict[str, Path], data_dir: Path) -> dict[str, dict]:
        """Latencies of the teacher and every student, taken now and together. Each evaluation timed its model
        alone, in this run or an earlier one, under whatever else the machine was doing then; a speedup divides
        two latencies, so the summary takes both from one interleaved timing of all the models."""
        names = list(model_dirs)
        with self.console.status(f"[bold]timing {len(names)} models together[/bold] …"):
            timings = ray.get(self.evaluator().time_models.remote(
                [str(model_dirs[name] / STUDENT_DIR) for name in names], str(data_dir),
                evaluate.Config.of(self.exp, teacher=without_mlm(self.exp.teacher)), early_exit=True))
        return dict(zip(names, timings, strict=True))

    def time_generators(self, model_dirs: dict[str, Path], data_dir: Path) -> dict[str, dict]:
        """A generation task's students (saved model folders by name), their generation timed now and together, as
        ``time_models`` times classifiers."""
        names = list(model_dirs)
        settings = self.generation_evaluation().model_dump()
        task = ray.remote(num_cpus=1)(evaluate_generation.time_generators)
        with self.console.status(f"[bold]timing {len(names)} students together[/bold] …"):
            timings = ray.get(task.remote([str(model_dirs[name]) for name in names], str(data_dir), settings))
        return dict(zip(names, timings, strict=True))

    def _run_stages(self) -> dict:
        import mlflow

        exp = self.exp
        refs, per_seed = self.plan()
        self.execute_all()
        prepared = {name: self.done[ref] for name, ref in refs.items()}
        summaries = [self.summarise(prepared, students) for students in per_seed]
        summary = summaries[0]
        path = write_summaries(exp.workdir, summaries)
        mlflow.log_artifact(str(path))
        mlflow.log_metrics({f"{name}.dev_{metric}": value for name, s in summary.students.items()
                            for metric, value in s.dev.items()})
        self.console.print(generation_table(summaries) if self.generates else summary_table(summary))
        files = write_workdir_report(exp.workdir, summaries)
        log_report(exp.workdir, files)
        verdict = "nothing recomputed" if self.counts["ran"] == 0 else f"{self.counts['ran']} stage(s) ran"
        self.console.print(f"{verdict}, {self.counts['cached']} cached. Summary: {path}; report: {files[0]}")
        return summary.model_dump(mode="json")  # run() returns what summary.json holds, in JSON types
