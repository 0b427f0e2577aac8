"""The MLflow model registry: a student as a pyfunc model that predicts labels from raw text, registered with
an alias (``candidate``) and tags; ``promote`` moves the ``champion`` alias."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

STUDENT_ARTIFACT = "student"
TASK_FILE = "task.json"
CANDIDATE, CHAMPION = "candidate", "champion"


class StudentClassifier(mlflow.pyfunc.PythonModel):
    """Raw text in, labels out. The tokenizer and the declared label set travel inside the model."""

    def load_context(self, context) -> None:
        import kd.methods  # noqa: F401  (registers custom architectures such as the BiLSTM with the Auto classes)
        from kd.batching import Collator
        from stages.models import load_classifier, load_tokenizer

        folder = context.artifacts[STUDENT_ARTIFACT]
        self.task = json.loads((Path(folder) / TASK_FILE).read_text())
        self.model = load_classifier(folder, self.task["num_labels"]).eval()
        self.collator = Collator(load_tokenizer(folder), self.task["max_length"], self.task["regression"])

    def predict(self, context, model_input, params=None):
        from kd.batching import TEXT_A, TEXT_B, iterate_frame
        from kd.evaluation import predict_frame

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({TEXT_A: list(model_input)})
        columns = self.task["text_columns"]
        rename = {source: target for source, target in zip(columns, (TEXT_A, TEXT_B)) if source in frame.columns}
        frame = frame.rename(columns=rename)
        if TEXT_A not in frame.columns:
            frame = frame.rename(columns={frame.columns[0]: TEXT_A})
        logits = predict_frame(self.model, self.collator, frame[[c for c in (TEXT_A, TEXT_B) if c in frame.columns]])
        if self.task["regression"]:
            return logits.reshape(-1)
        labels = np.asarray(self.task["labels"], dtype=object)
        return list(labels[logits.argmax(-1)])


def log_student(student_dir: Path, exp, name: str = "model") -> mlflow.models.model.ModelInfo:
    """Log a saved student as a pyfunc model in the active run."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as staged:
        folder = Path(staged) / STUDENT_ARTIFACT
        shutil.copytree(student_dir, folder)
        (folder / TASK_FILE).write_text(json.dumps({
            "labels": exp.task.labels, "text_columns": exp.task.text_columns, "max_length": exp.teacher.max_length,
            "num_labels": exp.task.num_labels, "regression": exp.task.task_type == "regression",
        }))
        return mlflow.pyfunc.log_model(
            name=name, python_model=StudentClassifier(), artifacts={STUDENT_ARTIFACT: str(folder)},
            # Explicit requirements: inferring them offline makes MLflow look for packages we do not use.
            pip_requirements=_requirements(),
        )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in ("torch", "transformers", "tokenizers", "mlflow", "pandas")]


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
