"""A checkpoint under another head: which weights are new, no load-report table, an error for a missing encoder."""

import json

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertForSequenceClassification, BertModel

from kd.checkpoints import load_with_new_head
from kd.mlm import masked_lm_from
from kd.errors import StageError
from stages.teacher import load_candidate
from tests.conftest import tiny_bert_config


@pytest.fixture
def classifier_dir(tmp_path):
    folder = tmp_path / "classifier"
    BertForSequenceClassification(tiny_bert_config(num_labels=2)).save_pretrained(folder)
    return folder


def test_a_classifier_loads_as_a_masked_lm_with_only_the_head_new_and_no_report(classifier_dir, capfd):
    classifier = BertForSequenceClassification.from_pretrained(classifier_dir)
    capfd.readouterr()
    model, new_weights = load_with_new_head(AutoModelForMaskedLM, str(classifier_dir))
    assert new_weights and all(name.startswith("cls.") for name in new_weights)
    assert "LOAD REPORT" not in capfd.readouterr().err
    encoder = classifier.bert.encoder.layer[1].output.dense.weight
    assert torch.equal(model.bert.encoder.layer[1].output.dense.weight, encoder)
    assert masked_lm_from(str(classifier_dir)).config.model_type == "bert"


def test_a_classifier_of_another_size_gets_a_new_head(classifier_dir):
    model, new_weights = load_with_new_head(AutoModelForSequenceClassification, str(classifier_dir), num_labels=3)
    assert new_weights == ["classifier.bias", "classifier.weight"]
    assert model.classifier.out_features == 3


def test_the_teacher_stage_fine_tunes_a_bare_encoder_and_keeps_a_fitting_classifier(classifier_dir, tmp_path):
    BertModel(tiny_bert_config()).save_pretrained(tmp_path / "encoder")
    assert load_candidate(str(tmp_path / "encoder"), 2)[1] is False
    assert load_candidate(str(classifier_dir), 2)[1] is True
    assert load_candidate(str(classifier_dir), 3)[1] is False


def test_a_checkpoint_missing_encoder_layers_is_an_error_not_a_random_encoder(classifier_dir):
    config_file = classifier_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["num_hidden_layers"] += 1
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no encoder weights for \d+ tensors .*bert\.encoder\.layer\.4"):
        load_with_new_head(AutoModelForMaskedLM, str(classifier_dir))
    with pytest.raises(StageError, match="cannot load teacher"):
        load_candidate(str(classifier_dir), 2)
