"""The student's own vocabulary, for methods that train one on the task corpus (DualTrain's WordPiece): trained
once here, on the task's train split, and loaded by every training worker, since WordPiece training is not
reproducible from process to process (kd.models.dualtrain.train_wordpiece)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from kd.methods import get_method
from kd.checkpoints import load_tokenizer
from stages.config import StageConfig, StudentSpec, UNKEYED
from kd.layout import STUDENT_DIR, TOKENIZER_DIR
from kd.worker import corpus_texts

class Config(StageConfig):
    """The vocabulary follows the method's ``vocabulary_key`` alone, so students that agree on it share one: the
    entry itself reaches the stage, but only the key reaches its cache key."""

    student: StudentSpec = Field(json_schema_extra=UNKEYED)
    method: str
    vocabulary: dict


def run(cfg: Config, inputs, ctx, out: Path) -> dict:
    spec = cfg.student
    method = get_method(spec.method)(spec.params)
    teacher_tokenizer = load_tokenizer(str(inputs["teacher"].path / STUDENT_DIR))
    tokenizer = method.student_tokenizer(teacher_tokenizer, corpus_texts(str(inputs["data"].path / "train.parquet")))
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    return {"method": spec.method, **method.vocabulary_key(), "size": len(tokenizer),
            "teacher_size": len(teacher_tokenizer)}
