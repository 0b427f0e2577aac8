"""The student's own vocabulary, for methods that train one on the task corpus (DualTrain's WordPiece): trained
once here, on the task's train split, and loaded by every training worker, since WordPiece training is not
reproducible from process to process (kd.dualtrain.train_wordpiece)."""

from __future__ import annotations

from pathlib import Path

from kd.methods import get_method
from stages.models import load_tokenizer
from stages.student_training import STUDENT_DIR, corpus_texts

TOKENIZER_DIR = "tokenizer"


def run(cfg, spec, inputs, ctx, out: Path) -> dict:
    """``spec``: a student entry whose method has a ``vocabulary_key``; the stage is keyed by that key."""
    method = get_method(spec.method)(spec.params)
    teacher_tokenizer = load_tokenizer(str(inputs["teacher"].path / STUDENT_DIR))
    tokenizer = method.student_tokenizer(teacher_tokenizer, corpus_texts(str(inputs["data"].path / "train.parquet")))
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    return {"method": spec.method, **method.vocabulary_key(), "size": len(tokenizer),
            "teacher_size": len(teacher_tokenizer)}
