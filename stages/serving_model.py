"""A registered student as MLflow loads and serves it: raw text in, a label and the class probabilities out (a
score for regression); or a registered encoder (a general distillation's, task.json ``kind: encoder``): raw text in,
its sentence embedding out (the last hidden states, mean-pooled over the real tokens); or a generation task's
seq2seq student (``kind: generator``): source text in, generated text out, decoded as its evaluation decoded it.

MLflow logs this file with the model ("models from code") and runs it wherever the model is loaded, so it imports
only what the model's requirements list (torch, transformers, pandas, numpy, mlflow), never this repository. A
student of a custom architecture (model type ``kd-*``) travels with the one module that defines it, logged as a
code path and named in task.json: importing that module registers the architecture with transformers' Auto classes.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema
from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

STUDENT_ARTIFACT = "student"
TASK_FILE = "task.json"
TEXT, TEXT_PAIR = "text", "text_pair"
LABEL, PROBABILITIES, SCORE, EMBEDDING, GENERATED = "label", "probabilities", "score", "embedding", "generated"
ENCODER = "encoder"  # task.json's kind of a base encoder; a classifier's is "classifier"
GENERATOR = "generator"  # a seq2seq student's
# The inputs the pipeline's training and evaluation feed every student (kd.methods.base.MODEL_INPUTS).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BATCH_SIZE = 64


def signature(task: dict) -> ModelSignature:
    """``text`` (and ``text_pair`` for a pair task) in; ``label`` and ``probabilities``, or ``score``, out."""
    inputs = [ColSpec("string", TEXT)] + ([ColSpec("string", TEXT_PAIR)] if task["pair"] else [])
    if task.get("kind") == ENCODER:
        outputs = [ColSpec(Array("double"), EMBEDDING)]
    elif task.get("kind") == GENERATOR:
        outputs = [ColSpec("string", GENERATED)]
    elif task["regression"]:
        outputs = [ColSpec("double", SCORE)]
    else:
        label_type = "string" if any(isinstance(label, str) for label in task["labels"]) else "long"
        outputs = [ColSpec(label_type, LABEL), ColSpec(Array("double"), PROBABILITIES)]
    return ModelSignature(Schema(inputs), Schema(outputs))


def input_example(task: dict) -> pd.DataFrame:
    example = {TEXT: ["film : a gripping, beautifully acted film" if task.get("kind") == GENERATOR
                      else "a gripping, beautifully acted film"]}
    if task["pair"]:
        example[TEXT_PAIR] = ["the film is worth seeing"]
    return pd.DataFrame(example)


class ServedModel(mlflow.pyfunc.PythonModel):
    """The tokenizer and the declared label set travel inside the model, in the student artifact."""

    def load_context(self, context) -> None:
        folder = Path(context.artifacts[STUDENT_ARTIFACT])
        self.task = json.loads((folder / TASK_FILE).read_text())
        model_type = json.loads((folder / "config.json").read_text())["model_type"]
        if model_type not in CONFIG_MAPPING:  # already there when the pipeline's own kd package is loaded
            importlib.import_module(self.task["architecture_module"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.task.get("kind") == ENCODER:
            self.model = AutoModel.from_pretrained(folder).eval()
        elif self.task.get("kind") == GENERATOR:
            self.model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=self.task["num_labels"]).eval()

    def outputs(self, encoded) -> torch.Tensor:
        """A batch's logits, or an encoder's mean-pooled last hidden states."""
        inputs = {k: encoded[k] for k in MODEL_INPUTS if k in encoded}
        if self.task.get("kind") != ENCODER:
            return self.model(**inputs).logits.float()
        hidden = self.model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    def logits(self, texts: list[str], pairs: list[str] | None) -> np.ndarray:
        """Batches cut in order of text length, as the pipeline's evaluation cuts them: less padding, and the same
        batches give the same numbers."""
        lengths = np.array([len(text) for text in texts])
        if pairs is not None:
            lengths += np.array([len(pair) for pair in pairs])
        order = np.argsort(lengths, kind="stable")
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(order), BATCH_SIZE):
                rows = order[start:start + BATCH_SIZE]
                second = [pairs[i] for i in rows] if pairs is not None else None
                encoded = self.tokenizer([texts[i] for i in rows], second, truncation=True,
                                         max_length=self.task["max_length"], padding=True, return_tensors="pt")
                outputs.append(self.outputs(encoded))
        width = self.model.config.hidden_size if self.task.get("kind") == ENCODER else self.task["num_labels"]
        logits = torch.cat(outputs).numpy() if outputs else np.zeros((0, width), np.float32)
        restored = np.empty_like(logits)
        restored[order] = logits
        return restored

    def generated(self, sources: list[str]) -> list[str]:
        """Each source's output, decoded as the evaluation decodes (``kd.generation.generate``): ``[CLS] source
        [SEP]`` cut to ``max_source_length`` word pieces, beams from task.json, in length-sorted batches."""
        encoded = self.tokenizer(sources, truncation=True, max_length=self.task["max_length"] + 2)["input_ids"]
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        outputs = [""] * len(sources)
        with torch.inference_mode():
            for start in range(0, len(order), BATCH_SIZE):
                rows = order[start:start + BATCH_SIZE]
                batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
                ids = self.model.generate(**batch, max_new_tokens=self.task["max_new_tokens"],
                                          num_beams=self.task["num_beams"], do_sample=False)
                texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
                for row, text in zip(rows, texts):
                    outputs[row] = text.strip()
        return outputs

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        texts = model_input[TEXT].astype(str).tolist()
        if self.task.get("kind") == GENERATOR:
            return pd.DataFrame({GENERATED: self.generated(texts)})
        pairs = model_input[TEXT_PAIR].astype(str).tolist() if self.task["pair"] else None
        logits = self.logits(texts, pairs)
        if self.task.get("kind") == ENCODER:
            return pd.DataFrame({EMBEDDING: list(logits.astype(np.float64))})
        if self.task["regression"]:
            return pd.DataFrame({SCORE: logits.reshape(-1).astype(np.float64)})
        probabilities = torch.from_numpy(logits).softmax(-1).double().numpy()
        return pd.DataFrame({LABEL: [self.task["labels"][i] for i in logits.argmax(-1)],
                             PROBABILITIES: list(probabilities)})


mlflow.models.set_model(ServedModel())
