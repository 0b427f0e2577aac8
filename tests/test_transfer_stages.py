"""Transfer corpora without Ray: the masked-LM teacher, the augmentation actors, the TextSmooth top-k actor and
its collation, augmented rows in the losses, the BiLSTM's own vocabulary through training and saving, and the
config fields that choose all of these. The actors are plain classes, called here as Ray Data would call them."""

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import BertForSequenceClassification

from kd.augment import MASK_TOKEN, PosVocabulary
from kd.batching import LABEL, NO_LABEL, TEACHER_LOGITS, TEXT_A, TEXT_B, Collator
from kd.losses import hard_cross_entropy
from kd.methods import get_method
from kd.mlm import MlmSettings, WholeWordCandidates, adapt, head_parameters, masked_lm_from, masked_token_accuracy
from kd.students import StudentShape
from kd.textsmooth import MLM_TOPK_IDS, MLM_TOPK_PROBS, pad_topk
from kd.training import TrainSettings
from pipeline.artifacts import Artifact
from pipeline.config import ConfigError, validate
from pipeline.runner import PipelineRunner, student_corpus
from stages.augment import SENTENCES_PER_BLOCK, MlmAugmenter, TangAugmenter, sentences_per_block, with_copies
from stages.config import AugmentConfig
from stages.distill import student_params
from kd.layout import MLM_DIR
from stages.mlm_teacher import adapt_teacher
from stages.mlm_topk import TopKPredictor
from kd.layout import STUDENT_DIR
from kd.worker import LocalIO, train_job, train_student
from kd.checkpoints import load_classifier, load_tokenizer

from conftest import tiny_bert_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Repetitive text over the tiny tokenizer's words: a masked LM can learn it in a few dozen steps.
TEXTS = ["the movie was very good", "a film is not fun", "the plot was awful", "the actor is very dull"]


@pytest.fixture
def teacher_dir(tmp_path, tiny_tokenizer):
    """A tiny classification teacher saved as the teacher stage saves one (model and tokenizer)."""
    torch.manual_seed(0)
    folder = tmp_path / "teacher"
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def mlm_dir(teacher_dir, tiny_tokenizer, tmp_path):
    """The teacher as a masked LM, saved as the mlm_teacher stage saves it: its fresh head fixed once."""
    folder = tmp_path / "mlm"
    masked_lm_from(str(teacher_dir)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split, repeat in (("train", 16), ("dev", 4)):
        texts = TEXTS * repeat
        pd.DataFrame({TEXT_A: texts, LABEL: [i % 2 for i in range(len(texts))]}).to_parquet(folder / f"{split}.parquet")
    return folder


# --- the masked-LM teacher ----------------------------------------------------------------------------------


def test_adaptation_raises_held_out_masked_token_accuracy_and_saves_a_masked_lm(teacher_dir, data_dir, tmp_path):
    settings = MlmSettings(steps=40, learning_rate=5e-3, batch_size=16, train="all")
    result = adapt_teacher(str(teacher_dir), str(data_dir), str(tmp_path / "mlm"), settings.model_dump(),
                           max_length=16, seed=0, threads=1)
    accuracy = result["masked_accuracy"]
    assert accuracy["after"] > accuracy["before"] + 0.2 and result["masked_tokens"] > 0
    assert [record["step"] for record in result["history"]] == [40]
    model, tokenizer = masked_lm_from(str(tmp_path / "mlm")), load_tokenizer(str(tmp_path / "mlm"))
    dev = pd.read_parquet(data_dir / "dev.parquet")[TEXT_A].tolist()
    assert masked_token_accuracy(model, tokenizer, dev, max_length=16)["accuracy"] == pytest.approx(accuracy["after"])


def test_head_mode_trains_the_head_and_leaves_the_encoder_as_the_teacher_has_it(teacher_dir, tiny_tokenizer):
    model = masked_lm_from(str(teacher_dir))
    encoder = {name: p.detach().clone() for name, p in model.base_model.named_parameters()}
    head = [p.detach().clone() for p in head_parameters(model)]
    before = masked_token_accuracy(model, tiny_tokenizer, TEXTS * 8, max_length=16)["accuracy"]
    adapt(model, tiny_tokenizer, TEXTS * 16, None, MlmSettings(steps=40, learning_rate=1e-2, batch_size=16, train="head"), 16)
    assert all(torch.equal(p, encoder[name]) for name, p in model.base_model.named_parameters())
    assert all(not torch.equal(p, old) for p, old in zip(head_parameters(model), head))
    assert masked_token_accuracy(model, tiny_tokenizer, TEXTS * 8, max_length=16)["accuracy"] > before


# --- TextSmooth: the top-k actor and its collation -------------------------------------------------------------


def test_topk_stage_output_schema_and_collation(mlm_dir, tiny_tokenizer, tmp_path):
    k = 3
    rows = pa.table({TEXT_A: ["the movie was good", "bad", "a very very dull plot"], LABEL: [1, 0, 0],
                     TEACHER_LOGITS: pa.array([[0.5, -0.5], [1.0, 0.0], [0.0, 1.0]], type=pa.list_(pa.float32()))})
    out = TopKPredictor(str(mlm_dir), max_length=16, k=k, threads=1)(rows)
    assert out.column_names == [TEXT_A, LABEL, TEACHER_LOGITS, MLM_TOPK_IDS, MLM_TOPK_PROBS]
    pq.write_table(out, tmp_path / "topk.parquet")
    schema = pq.read_schema(tmp_path / "topk.parquet")
    assert schema.field(MLM_TOPK_IDS).type.value_type.value_type == pa.int32()
    assert schema.field(MLM_TOPK_PROBS).type.value_type.value_type == pa.float16()

    frame = pd.read_parquet(tmp_path / "topk.parquet")
    tokens = [len(tiny_tokenizer(text)["input_ids"]) for text in frame[TEXT_A]]
    assert [len(cell) for cell in frame[MLM_TOPK_IDS]] == tokens  # one k-vector per token, [CLS] and [SEP] included
    probs = np.stack(frame[MLM_TOPK_PROBS][0]).astype(np.float32)
    assert probs.shape == (tokens[0], k) and (np.diff(probs, axis=1) <= 0).all() and (probs.sum(1) <= 1.001).all()

    batch = Collator(tiny_tokenizer, 16)({column: frame[column].to_numpy() for column in frame.columns})
    length = batch["input_ids"].shape[1]
    assert batch[MLM_TOPK_IDS].shape == batch[MLM_TOPK_PROBS].shape == (3, length, k)
    assert batch[MLM_TOPK_IDS].dtype == torch.int32 and batch[MLM_TOPK_PROBS].dtype == torch.float16
    short = tokens[1]
    assert torch.equal(batch[MLM_TOPK_IDS][1, :short], torch.from_numpy(np.stack(frame[MLM_TOPK_IDS][1])))
    assert not batch[MLM_TOPK_PROBS][1, short:].any()  # padding carries no distribution: the student keeps one-hot


def test_topk_padding_refuses_rows_stored_for_another_tokenisation():
    cells = [np.ones((4, 2), dtype=np.int32), np.ones((2, 2), dtype=np.int32)]
    padded = pad_topk(cells, [4, 2], 5)
    assert padded.shape == (2, 5, 2) and padded[1, 2:].sum() == 0 and padded[0, :4].sum() == 8
    with pytest.raises(ValueError, match="covers 2 tokens but the row has 3"):
        pad_topk(cells, [4, 3], 5)


# --- augmentation actors ---------------------------------------------------------------------------------------


def test_augmented_rows_follow_their_original_with_no_gold_label():
    rows = {TEXT_A: np.array(["a", "b"], dtype=object), TEXT_B: np.array(["x", "y"], dtype=object),
            LABEL: np.array([1, 0])}
    out = with_copies(rows, [[("a1", "x1"), ("a2", "x2")], []])
    assert out[TEXT_A].tolist() == ["a", "a1", "a2", "b"] and out[TEXT_B].tolist() == ["x", "x1", "x2", "y"]
    assert out[LABEL].dtype == np.int64 and out[LABEL].tolist() == [1, NO_LABEL, NO_LABEL, 0]


def test_tang_actor_tags_with_spacy_and_writes_distinct_copies():
    vocabulary = PosVocabulary([("movie", "NN"), ("film", "NN"), ("plot", "NN"), ("good", "JJ"), ("bad", "JJ")])
    actor = TangAugmenter(vocabulary, {"copies": 4, "p_mask": 0.3, "p_pos": 0.4, "p_ng": 0.0}, MASK_TOKEN)
    texts = ["The movie was good.", "A bad plot."]
    out = actor({TEXT_A: np.array(texts, dtype=object), LABEL: np.array([1, 0])})
    labels = out[LABEL].tolist()
    firsts = [i for i, label in enumerate(labels) if label != NO_LABEL]
    assert [out[TEXT_A][i] for i in firsts] == texts  # originals kept verbatim, each followed by its copies
    copies = out[TEXT_A][firsts[0] + 1:firsts[1]].tolist()
    assert 1 <= len(copies) <= 4 and len(set(copies)) == len(copies)
    assert all(len(copy.split()) == 5 for copy in copies)  # spaCy words: The movie was good .
    assert all(word in {"movie", "film", "plot", MASK_TOKEN} for copy in copies for word in [copy.split()[1]])
    again = actor({TEXT_A: np.array(texts, dtype=object), LABEL: np.array([1, 0])})
    assert again[TEXT_A].tolist() == out[TEXT_A].tolist()  # seeded by the sentence: any actor, the same copies


def test_tinybert_actor_replaces_words_with_masked_lm_candidates(mlm_dir, tiny_tokenizer):
    actor = MlmAugmenter(str(mlm_dir), {"copies": 3, "mlm_p": 0.5, "mlm_k": 4}, max_length=16, threads=1)
    out = actor({TEXT_A: np.array(["the movie was good"], dtype=object), TEXT_B: np.array(["a dull plot"], dtype=object),
                 LABEL: np.array([1])})
    assert out[LABEL].tolist()[0] == 1 and set(out[LABEL].tolist()[1:]) == {NO_LABEL}
    candidates = WholeWordCandidates(masked_lm_from(str(mlm_dir)), tiny_tokenizer, 4, 16)
    table = candidates.for_sentences([["the", "movie", "was", "good"]])[0]
    assert all(len(words) == 4 and not any(w.startswith("[") for w in words) for words in table)
    for copy in out[TEXT_A][1:]:
        words = copy.split()
        assert len(words) == 4 and words != ["the", "movie", "was", "good"]
        assert all(new == old or new in table[i] for i, (new, old) in enumerate(zip(words, ["the", "movie", "was", "good"])))
    assert len(out[TEXT_B]) == len(out[TEXT_A])  # pairs: each copy augments both sides (each side may stay)


# --- augmented rows in training ---------------------------------------------------------------------------------


def test_cross_entropy_skips_rows_without_a_gold_label():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    labelled = torch.nn.functional.cross_entropy(logits[:2], torch.tensor([0, 1]))
    assert hard_cross_entropy(logits, torch.tensor([0, 1, NO_LABEL])).item() == pytest.approx(labelled.item())
    assert hard_cross_entropy(logits, torch.full((3,), NO_LABEL)).item() == 0.0


def test_bilstm_own_vocabulary_is_what_training_uses_and_saves(teacher_dir, tmp_path, tiny_tokenizer):
    texts = ["the movie was good", "a dull plot", "the film was awful [MASK]"]
    train = pd.DataFrame({TEXT_A: texts * 4, LABEL: [1, 0, NO_LABEL] * 4,
                          TEACHER_LOGITS: [np.array([-1.0, 1.0]), np.array([1.0, -1.0]), np.array([0.5, 0.5])] * 4})
    train.to_parquet(tmp_path / "train.parquet")
    train.drop(columns=[TEACHER_LOGITS]).head(2).to_parquet(tmp_path / "dev.parquet")
    params = {"vocabulary": "corpus", "embeddings": "random", "embedding_dim": 8, "mlp_hidden": 8, "alpha": 0.5}
    job = train_job(method="bilstm", params=params, shape={"layers": 1, "hidden_size": 8},
                    settings=TrainSettings(epochs=1, batch_size=4, learning_rate=1e-2),
                    teacher=str(teacher_dir), init_model=None, tokenizer=str(teacher_dir), max_length=16, num_labels=2,
                    regression=False, train_rows=len(train), train_path=str(tmp_path / "train.parquet"), torch_threads=1)
    folder = tmp_path / "student"

    def keep_student(metrics, directory):  # the epoch's checkpoint, as Ray Train would persist it
        shutil.copytree(directory / STUDENT_DIR, folder)

    distiller = train_student(job, LocalIO(tmp_path / "train.parquet", tmp_path / "dev.parquet", keep_student),
                              verbose=False)
    assert np.isfinite(distiller.progress.history[-1]["loss/total"])
    tokenizer, student = load_tokenizer(str(folder)), load_classifier(str(folder), 2).eval()
    assert tokenizer.get_vocab() == distiller.method.vocabulary.get_vocab() != tiny_tokenizer.get_vocab()
    assert student.config.vocab_size == len(tokenizer) == len(distiller.method.vocabulary)
    assert tokenizer.convert_ids_to_tokens(tokenizer("the film [MASK]")["input_ids"]) == [
        "[CLS]", "the", "film", "[MASK]", "[SEP]"]
    encoded = Collator(tokenizer, 16).encode({TEXT_A: np.array(texts)})
    distiller.student.eval()
    assert torch.allclose(student(**encoded).logits, distiller.student(**encoded).logits, atol=1e-6)


def test_bilstm_tokenizer_hook_defaults_to_the_teacher_and_builds_a_stable_vocabulary(tiny_tokenizer, tiny_teacher):
    untouched = iter(())  # a default hook never reads the corpus
    assert get_method("bilstm")().student_tokenizer(tiny_tokenizer, untouched) is tiny_tokenizer
    assert get_method("kd")().student_tokenizer(tiny_tokenizer, untouched) is tiny_tokenizer
    texts = [f"word{i % 7} other{i % 3} shared" for i in range(50)]
    own = {"vocabulary": "corpus", "embeddings": "random", "embedding_dim": 4}
    first, second = (get_method("bilstm")(own).student_tokenizer(tiny_tokenizer, iter(texts)) for _ in range(2))
    assert first.get_vocab() == second.get_vocab()  # every data-parallel worker builds the same ids
    with pytest.raises(ValueError, match="student_tokenizer"):
        get_method("bilstm")(own).build_student(tiny_teacher, StudentShape(layers=1))
    with pytest.raises(ValueError, match="use embeddings: random"):
        get_method("bilstm")({"vocabulary": "corpus"})


# --- configuration -------------------------------------------------------------------------------------------


def experiment(**fields) -> dict:
    return {"name": "t", "students": [{"name": "s", "method": "kd", "student": {"layers": 2}}], **fields}


def test_students_choose_their_corpus_and_methods_supply_the_default():
    exp = validate(experiment(teacher={"mlm": {"steps": 5}}, students=[
        {"name": "lstm", "method": "bilstm", "student": {"layers": 1}},
        {"name": "lstm_task", "method": "bilstm", "student": {"layers": 1}, "data": "task"},
        {"name": "smooth", "method": "textsmooth", "student": {"layers": 2}},
        {"name": "tiny_aug", "method": "tinybert", "student": {"layers": 2}, "data": "augmented"},
        {"name": "plain", "method": "finetune", "student": {"layers": 2}},
    ]))
    assert [spec.data for spec in exp.students] == ["augmented", "task", "task", "augmented", "task"]
    assert [student_corpus(spec) for spec in exp.students] == [
        "label:augmented", "label", "mlm_topk", "label:augmented", None]
    assert exp.teacher.mlm.train == "all" and exp.augment.rule == "tang" and exp.label.mlm_top_k == 16


@pytest.mark.parametrize("fields, message", [
    ({"students": [{"name": "s", "method": "textsmooth", "student": {"layers": 2}}]},
     "textsmooth reads the teacher's masked-LM distribution; set teacher.mlm"),
    ({"students": [{"name": "s", "method": "finetune", "student": {"layers": 2}, "data": "augmented"}]},
     "finetune learns from gold labels only"),
    ({"augment": {"rule": "tinybert"}, "students": [{"name": "s", "method": "bilstm", "student": {"layers": 1}}]},
     "augment.rule: tinybert draws replacements from the masked-LM teacher"),
    ({"augment": {"rule": "tang", "copies": -1}}, "augment.copies"),
    ({"teacher": {"mlm": {"train": "encoder"}}}, "teacher.mlm.train"),
    ({"students": [{"name": "s", "method": "distilbert", "student": {"layers": 2}}]},
     "distilbert: params.alpha_mlm > 0 turns on the masked-LM term, which reads the masked-LM teacher's head; "
     "set teacher.mlm, or params.mlm_head, or params.alpha_mlm: 0"),
])
def test_transfer_fields_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(experiment(**fields))


# --- the runner's choice of inputs ------------------------------------------------------------------------------


def stage_graph(tmp_path, mlm_steps: int) -> tuple[list[str], dict, dict, list]:
    """The stages a runner plans for three DistilBERT students (MLM term on with no head, off, on with a head of
    its own): the stages in order, the shared nodes by input name, every student's distill config slice, inputs
    (as artifacts under ``tmp_path``) and key, and the students."""
    exp = validate(experiment(workdir=str(tmp_path), teacher={"mlm": {"steps": mlm_steps}}, students=[
        {"name": "auto", "method": "distilbert", "student": {"layers": 2}},
        {"name": "off", "method": "distilbert", "student": {"layers": 2}, "params": {"alpha_mlm": 0}},
        {"name": "own", "method": "distilbert", "student": {"layers": 2}, "params": {"mlm_head": "/heads/own"}},
    ]))
    runner = PipelineRunner(exp)
    refs, (students,) = runner.plan()
    distills = {}
    for name, (_, distill_node, _) in students.items():
        node = runner.nodes[distill_node]
        inputs = {input_name: Artifact(input_name, runner.planned(ref).key, tmp_path / ref)
                  for input_name, ref in node.inputs.items()}
        distills[name] = (node.config, inputs, runner.planned(distill_node).key)
    shared = {name: Artifact(name, runner.planned(ref).key, tmp_path / ref) for name, ref in refs.items()}
    return [node.stage for node in runner.nodes.values()], shared, distills, exp.students


def test_distilbert_mlm_term_reads_the_masked_lm_teacher_and_is_keyed_by_it(tmp_path):
    ran, prepared, distills, (auto, off, own) = stage_graph(tmp_path / "a", mlm_steps=5)
    assert ran[:4] == ["data", "teacher", "mlm_teacher", "evaluate"]
    assert [name for name, (_, inputs, _) in distills.items() if "mlm_teacher" in inputs] == ["auto"]
    config_slice, inputs, _ = distills["auto"]
    assert inputs["mlm_teacher"] == prepared["mlm_teacher"]
    # The slice keeps the head unset: the key follows the masked-LM teacher's key, not where the workdir is.
    assert config_slice.student.params.mlm_head is None
    assert student_params(auto, inputs)["mlm_head"] == str(prepared["mlm_teacher"].path / MLM_DIR)
    assert student_params(off, distills["off"][1])["mlm_head"] is None
    assert student_params(own, distills["own"][1])["mlm_head"] == "/heads/own"

    _, _, adapted_longer, _ = stage_graph(tmp_path / "b", mlm_steps=6)
    assert [name for name in distills if distills[name][2] != adapted_longer[name][2]] == ["auto"]


def test_no_masked_lm_teacher_without_a_student_that_reads_it():
    exp = validate(experiment(teacher={"mlm": {"steps": 5}}, students=[
        {"name": "off", "method": "distilbert", "student": {"layers": 2}, "params": {"alpha_mlm": 0}}]))
    runner = PipelineRunner(exp)
    runner.plan_prepare(exp.students)
    assert [node.stage for node in runner.nodes.values()] == ["data", "teacher", "evaluate"]


def test_the_masked_lm_rule_reads_blocks_of_one_actor_call():
    # Ray Data fails an execution that shows no output for 30 min, and a block's output shows only when it is done:
    # the masked-LM rule's blocks must stay small on a slow CPU.
    assert sentences_per_block(AugmentConfig(rule="tinybert", batch_size=48)) == 48
    assert sentences_per_block(AugmentConfig(rule="tang")) == SENTENCES_PER_BLOCK
