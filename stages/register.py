"""The MLflow model registry: a student logged as a self-contained pyfunc model that predicts from raw text
(``stages.serving_model``), registered with an alias (``candidate``) and tags; ``promote`` moves the ``champion``
alias. A search registers its best trial (``log_student``); ``register_run_student`` registers a student of a
finished pipeline run."""

from __future__ import annotations

import ast
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from stages import serving_model
from kd.errors import StageError

CANDIDATE, CHAMPION = "candidate", "champion"
BEST = "best"
REPO_PACKAGES = {"kd", "stages", "pipeline"}


@dataclass(frozen=True)
class ServedTask:
    """What the served model needs of the experiment."""

    labels: list | None
    pair: bool
    max_length: int
    regression: bool
    num_labels: int
    kind: str = "classifier"  # or serving_model.ENCODER (text in, embedding out), GENERATOR (text in, text out)
    # A generator's decoding: ``max_length`` is then the source word pieces kept, as in training.
    max_new_tokens: int | None = None
    num_beams: int | None = None

    @classmethod
    def encoder(cls, max_length: int) -> ServedTask:
        return cls(labels=None, pair=False, max_length=max_length, regression=False, num_labels=0,
                   kind=serving_model.ENCODER)

    @classmethod
    def generator(cls, max_source_length: int, max_new_tokens: int, num_beams: int) -> ServedTask:
        return cls(labels=None, pair=False, max_length=max_source_length, regression=False, num_labels=0,
                   kind=serving_model.GENERATOR, max_new_tokens=max_new_tokens, num_beams=num_beams)

    @classmethod
    def of(cls, exp) -> ServedTask:
        if exp.task.task_type == "seq2seq":
            return cls.generator(exp.cmlm.max_source_length, exp.evaluate.max_new_tokens, exp.evaluate.num_beams)
        regression = exp.task.task_type == "regression"
        return cls(_labels(exp.task.labels), exp.task.is_pair, exp.teacher.max_length, regression, exp.task.num_labels)

    @classmethod
    def from_params(cls, params: dict[str, str]) -> ServedTask:
        """From the params a pipeline run logs: its experiment flattened, each value as its ``str``."""
        try:
            if params["task.task_type"] == "seq2seq":
                return cls.generator(int(params["cmlm.max_source_length"]), int(params["evaluate.max_new_tokens"]),
                                     int(params["evaluate.num_beams"]))
            labels = ast.literal_eval(params["task.labels"])
            regression = params["task.task_type"] == "regression"
            return cls(_labels(labels), len(ast.literal_eval(params["task.text_columns"])) == 2,
                       int(params["teacher.max_length"]), regression, 1 if regression else len(labels))
        except (KeyError, ValueError, SyntaxError) as error:
            raise StageError(f"the run's MLflow params do not describe its task ({error!r} in task.labels, "
                             "task.text_columns, task.task_type, teacher.max_length; for seq2seq "
                             "cmlm.max_source_length, evaluate.max_new_tokens, evaluate.num_beams)") from None


def _labels(labels: list | None) -> list | None:
    # One type per output column: a label set mixing numbers and names is served as names.
    return [str(label) for label in labels] if labels and any(isinstance(label, str) for label in labels) else labels


def architecture_module(student_dir: Path) -> Path | None:
    """The module defining the student's architecture when it is not one of transformers' own: the served model
    needs it as code, and it must not import this repository."""
    import kd.methods  # noqa: F401  (registers the custom architectures with the Auto classes)

    config = AutoConfig.from_pretrained(student_dir)
    if config.model_type in CONFIG_MAPPING_NAMES:
        return None
    module = Path(sys.modules[type(config).__module__].__file__)
    imported = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." if node.level else node.module.split(".")[0])  # "." a relative import
    repository = sorted(imported & (REPO_PACKAGES | {"."}))
    if repository:
        raise StageError(f"{module} defines model type {config.model_type!r} but imports {repository}: a served "
                         "model carries this one module only")
    return module


def log_student(student_dir: Path, exp, name: str = "model") -> mlflow.models.model.ModelInfo:
    """Log a saved student as a pyfunc model in the active run."""
    return log_served(student_dir, ServedTask.of(exp), name)


def log_served(student_dir: Path, task: ServedTask, name: str = "model") -> mlflow.models.model.ModelInfo:
    """Log a saved student as a pyfunc model in the active run: the student folder with task.json, and the code
    that serves it (``stages.serving_model`` and, for a custom architecture, its module)."""
    module = architecture_module(student_dir)
    document = {**asdict(task), "architecture_module": module.stem if module else None}
    with tempfile.TemporaryDirectory() as staged:
        folder = Path(staged) / serving_model.STUDENT_ARTIFACT
        shutil.copytree(student_dir, folder)
        (folder / serving_model.TASK_FILE).write_text(json.dumps(document))
        return mlflow.pyfunc.log_model(
            name=name, python_model=serving_model.__file__, artifacts={serving_model.STUDENT_ARTIFACT: str(folder)},
            code_paths=[str(module)] if module else None, signature=serving_model.signature(document),
            input_example=serving_model.input_example(document),
            # Explicit requirements: inferring them offline makes MLflow look for packages we do not use.
            pip_requirements=_requirements(),
        )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{package}=={version(package)}"
            for package in ("torch", "transformers", "tokenizers", "mlflow", "pandas", "numpy")]


def register(model_uri: str, name: str, tags: dict[str, str]) -> int:
    """Register a logged model, tag the version, and point the ``candidate`` alias at it."""
    version = mlflow.register_model(model_uri, name)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return int(version.version)


def promote(name: str, version: int, alias: str = CHAMPION) -> None:
    client = MlflowClient()
    client.get_model_version(name, str(version))  # raises a clear RestException when it does not exist
    client.set_registered_model_alias(name, alias, str(version))
