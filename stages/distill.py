"""Ray Train: one TorchTrainer per student, training a registered method from cached or online teacher signals.

The teacher stage reuses ``fit`` with the ``finetune`` method to fine-tune the teacher itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from contextlib import nullcontext
from typing import Any, ContextManager, Iterable

import ray
import torch
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from kd.layout import ENCODER_DIR, HISTORY_FILE, MLM_DIR, PRETRAINED_DIR, STUDENT_DIR, TOKENIZER_DIR
from kd.methods import get_method
from kd.worker import FrameData, Rows, as_path, kept_student, selected_epoch, train_job, train_student
from stages.config import RunPlace, StudentSpec, TaskConfig, TeacherConfig
from kd.errors import StageError
from stages.label import ensemble_temperature
from stages.models import resolve_model_source
from stages.progress import ProgressPoster

PROGRESS_KEY = "progress_key"  # in a training job: the stage key its progress lines are posted under
DEV_PATH = "dev_path"  # in a training job: the dev split's Parquet


class RayTrainIO:
    """Inside a Ray Train worker: ``ray.train.report``, the run's latest checkpoint, DDP and the progress board.
    Where the rows come from is a subclass's: a student's Parquet (``ShardIO``) or a streamed dataset
    (``StreamedIO``)."""

    def __init__(self, progress_key: str | None = None):
        import ray.train

        self._train = ray.train
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.progress = ProgressPoster(progress_key if self.rank == 0 else None)

    def restore(self) -> ContextManager[Path | None]:
        checkpoint = self._train.get_checkpoint()
        return as_path(checkpoint.as_directory()) if checkpoint is not None else nullcontext(None)

    def report(self, metrics: dict, directory: Path | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(directory) if directory is not None else None
        self._train.report(metrics, checkpoint=checkpoint)

    def wrap(self, module, device):
        import ray.train.torch

        if self.world == 1:
            return module.to(device)
        # Phased methods freeze parts of the model (TinyBERT's intermediate phase leaves the classifier without
        # a gradient), which DistributedDataParallel refuses unless told to look for unused parameters.
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": True})

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()


class StreamedIO(RayTrainIO):
    """Rows streamed by Ray Data (``get_dataset_shard``): for a corpus that need not fit in a worker's memory (a
    general distillation's)."""

    def epoch_chunks(self, rows_per_chunk: int, seed: int) -> Iterable[Rows]:
        # The shard streams in file order (ordered_ingest) and is shuffled by the epoch's seed.
        return self._train.get_dataset_shard("train").iter_batches(
            batch_size=rows_per_chunk, batch_format="numpy", local_shuffle_buffer_size=rows_per_chunk,
            local_shuffle_seed=seed)


class ShardIO(FrameData, RayTrainIO):
    """A student's rows: its share of the train Parquet and the dev split, read once by the worker itself
    (``kd.worker.FrameData``). A student's corpus is small (the augmented corpus, the largest, is tens of thousands
    of rows), and reading it whole skips what a streamed dataset costs: a streaming split's coordinator and first
    execution, about 10 s a student, and an execution every epoch."""

    def __init__(self, train_path: str, dev_path: str, progress_key: str | None = None):
        RayTrainIO.__init__(self, progress_key)
        self.read(train_path, dev_path, self.rank, self.world)


def train_loop_per_worker(job: dict[str, Any]) -> None:
    train_student(job, ShardIO(job["train_path"], job[DEV_PATH], job.get(PROGRESS_KEY)))


class Config(RunPlace):
    """One student: its entry, and what of the teacher and task its training reads."""

    student: StudentSpec
    teacher: TeacherConfig
    task: TaskConfig


def scaling_config(cfg) -> ScalingConfig:
    return ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                         resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **cfg.ray.resources_per_worker})


def ordered_ingest():
    """Ray Train's ingest options with blocks kept in file order: the worker's shard is then the same rows in the same
    order from run to run, which its seeded shuffle needs (the default takes the driver's context, unordered)."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def trainer(cfg, job: dict[str, Any], train_path: Path, dev_path: Path, run_config: ray.train.RunConfig) -> TorchTrainer:
    """A student's trainer: its workers read ``train_path`` and ``dev_path`` themselves (``ShardIO``), so both must
    be readable from every node, as the workdir is on a cluster."""
    return TorchTrainer(train_loop_per_worker, train_loop_config={**job, "train_path": str(train_path),
                                                                  DEV_PATH: str(dev_path)},
                        scaling_config=scaling_config(cfg), run_config=run_config)


def fit(cfg, job: dict[str, Any], train_path: Path, dev_path: Path, run_name: str, out: Path,
        progress_key: str | None = None) -> dict:
    """Train on Ray and copy the finished student into ``out/student``; returns the epoch history.

    The run name is derived from the stage key, so rerunning after a crash restores the run from its last
    checkpoint instead of starting over. ``progress_key`` (the stage's key) is where rank 0 posts its progress
    lines (``stages.progress``).
    """
    job = {**job, PROGRESS_KEY: progress_key}
    run_config = ray.train.RunConfig(
        name=run_name, storage_path=str(cfg.storage),
        checkpoint_config=CheckpointConfig(num_to_keep=1),
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
    )
    result = trainer(cfg, job, train_path, dev_path, run_config).fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(kept_student(Path(directory)), out / STUDENT_DIR)
        history = json.loads((Path(directory) / HISTORY_FILE).read_text())
    return {"history": history, "final": result.metrics, "selected_epoch": selected_epoch(history)}


def train_corpus(inputs) -> tuple[Path, int]:
    """The Parquet a student trains on and its rows: the prepared corpus (``label``: soft labels, masked-LM top-k,
    the augmented corpus) when it has one, else the train split."""
    if "label" in inputs:
        return inputs["label"].path / "data", inputs["label"].result()["rows"]
    return inputs["data"].path / "train.parquet", inputs["data"].result()["rows"]["train"]


def student_params(spec, inputs) -> dict[str, Any]:
    """The method's params; given a masked-LM teacher, its folder is the ``mlm_head`` (DistilBERT's MLM term)."""
    params = spec.params.model_dump()
    if "mlm_teacher" in inputs:
        params["mlm_head"] = str(inputs["mlm_teacher"].path / MLM_DIR)
    return params


def check_prepared_for(spec, inputs) -> None:
    """The vocabulary and ensemble soft labels in ``inputs`` are those this entry asks for: a search that samples
    what they were built from (a vocabulary size, an ensemble student's temperature) would otherwise train every
    trial on the base entry's."""
    method = spec.method_object()
    if "vocabulary" in inputs:
        built, wanted = inputs["vocabulary"].result(), method.vocabulary_key()
        if any(built.get(key) != value for key, value in wanted.items()):
            raise StageError(f"{spec.name}: the prepared vocabulary was built for {built}, the student asks for "
                             f"{wanted}; a search cannot vary what the vocabulary is built from")
    temperature = ensemble_temperature(spec)
    averaged_at = inputs["label"].result().get("temperature") if temperature is not None else None
    if averaged_at != temperature:
        raise StageError(f"{spec.name}: the ensemble's soft labels were averaged at T={averaged_at}, the student "
                         f"learns at T={temperature}; a search cannot vary the temperature of an ensemble student")


def model_folder(artifact) -> Path:
    """The model in a teacher or student artifact: a C-MLM teacher (a generation task's) keeps its masked LM in
    ``model/``, every other one its model in ``student/``."""
    return artifact.path / (MLM_DIR if artifact.stage == "cmlm_teacher" else STUDENT_DIR)


def student_job(cfg, spec, inputs) -> tuple[dict[str, Any], Path]:
    """The training job of a student entry, and the Parquet it trains on (soft labels when the method uses them).

    The model the method starts from is the teacher's, or with a ``source`` input another student's (a FastBERT
    wrapping it; its own tokenizer comes along); a ``vocabulary`` input holds the student's own tokenizer."""
    check_prepared_for(spec, inputs)
    teacher_dir = str(model_folder(inputs["source" if "source" in inputs else "teacher"]))
    train_source, train_rows = train_corpus(inputs)
    job = train_job(
        method=spec.method, params=student_params(spec, inputs), shape=spec.student.model_dump(), settings=spec.train,
        teacher=teacher_dir, init_model=None, tokenizer=teacher_dir, max_length=cfg.teacher.max_length,
        num_labels=cfg.task.num_labels, regression=cfg.task.task_type == "regression", train_rows=train_rows,
        train_path=str(train_source), torch_threads=cfg.ray.threads_per_worker,
        vocabulary=str(inputs["vocabulary"].path / TOKENIZER_DIR) if "vocabulary" in inputs else None,
        layer_source=layer_source(cfg, spec, inputs),
    )
    return job, train_source


def layer_source(cfg, spec, inputs) -> str | None:
    """The checkpoint whose layers the student copies when it is not the fine-tuned teacher: the one the teacher
    was fine-tuned from, a general distillation of this experiment (the ``layers`` input), or any checkpoint."""
    init_from = spec.student.init_from
    if init_from == "teacher":
        return None
    if init_from == "pretrained":
        if inputs["teacher"].stage == "cmlm_teacher":  # fine-tuned from teacher.source, which it does not copy
            return resolve_model_source(cfg.teacher.source, field=f"{spec.name}: teacher.source")
        pretrained = inputs["teacher"].path / PRETRAINED_DIR
        if not pretrained.exists():
            raise StageError(f"{spec.name}: student.init_from: pretrained copies the checkpoint the teacher was "
                             f"fine-tuned from, and this teacher ({cfg.teacher.source}) was not fine-tuned by the "
                             "pipeline; use init_from: teacher, or teacher.finetune: always")
        return str(pretrained)
    if "layers" in inputs:
        return str(inputs["layers"].path / ENCODER_DIR)
    return resolve_model_source(init_from, field=f"{spec.name}: student.init_from")


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    """Distil one student."""
    spec = cfg.student
    method = get_method(spec.method)
    job, train_source = student_job(cfg, spec, inputs)
    outcome = fit(cfg, job, train_source, inputs["data"].path / "dev.parquet", f"{cfg.name}-{spec.name}-{ctx.key}", out,
                  progress_key=ctx.key)
    return {"method": method.name, "teacher_signals": method.teacher_signals(), **outcome}
