"""Named layer strategies expand to the papers' exact layer indices, and bad mappings are refused."""

import pytest
from pydantic import ValidationError

from kd.layer_maps import LayerMatch, expand_strategy, teacher_layers, validate_matches
from kd.methods import get_method
from kd.students import StudentShape, copied_layers


def pairs(matches, feature):
    return [(m.student_layer, m.teacher_layer) for m in matches if m.feature == feature]


def test_tinybert_uniform_12_to_4_takes_every_third_layer():
    matches = get_method("tinybert")().layer_matches(12, 4)
    assert pairs(matches, "hidden") == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert pairs(matches, "attention") == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert pairs(matches, "embedding") == [(0, 0)]


@pytest.mark.parametrize("strategy, teacher", [("top", [9, 10, 11, 12]), ("bottom", [1, 2, 3, 4])])
def test_tinybert_top_and_bottom(strategy, teacher):
    matches = get_method("tinybert")({"strategy": strategy}).layer_matches(12, 4)
    assert pairs(matches, "hidden") == list(zip([1, 2, 3, 4], teacher))


def test_pkd_skip_12_to_6_maps_every_second_layer_but_the_top():
    matches = get_method("pkd")().layer_matches(12, 6)
    assert pairs(matches, "cls") == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]
    assert {m.loss for m in matches} == {"normalized_mse"}


def test_pkd_last_12_to_6_maps_the_last_layers_but_the_top():
    matches = get_method("pkd")({"strategy": "last"}).layer_matches(12, 6)
    assert pairs(matches, "cls") == [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]


def test_pkd_one_layer_student_has_no_patient_pairs():
    assert get_method("pkd")().layer_matches(12, 1) == []


def test_every_other_6_to_3_and_distilbert_starts_there():
    assert teacher_layers("every_other", 6, 3) == [1, 3, 5]
    method = get_method("distilbert")({"alpha_mlm": 0})
    assert copied_layers(StudentShape(layers=3, init=method.default_init), 6) == [1, 3, 5]


def test_distilbert_aligns_the_last_layers_by_cosine():
    matches = get_method("distilbert")({"alpha_mlm": 0}).layer_matches(6, 3)
    assert [(m.student_layer, m.teacher_layer, m.feature, m.loss) for m in matches] == [(3, 6, "hidden", "cos")]


def test_pkd_starts_from_the_first_teacher_layers():
    method = get_method("pkd")()
    assert copied_layers(StudentShape(layers=3, init=method.default_init), 12) == [1, 2, 3]


@pytest.mark.parametrize("name, params", [("tinybert", {}), ("pkd", {}), ("pkd", {"strategy": "last"}),
                                          ("distilbert", {"alpha_mlm": 0})])
def test_method_maps_validate_against_their_depths(name, params):
    matches = get_method(name)(params).layer_matches(12, 4)
    validate_matches(matches, 12, 4)
    with pytest.raises(ValueError, match="past the teacher's depth"):
        validate_matches(matches, 6, 4)


def test_student_layer_past_its_depth_is_refused():
    with pytest.raises(ValueError, match="student layer 5 is past the student's depth 4"):
        validate_matches([LayerMatch(student_layer=5, teacher_layer=5)], 12, 4)


def test_a_match_must_name_a_registered_loss():
    with pytest.raises(ValidationError, match="unknown loss 'msee'; known: .*cos.*mse.*normalized_mse"):
        LayerMatch(student_layer=1, teacher_layer=1, loss="msee")


def test_attention_on_the_embedding_layer_is_refused():
    with pytest.raises(ValueError, match="no attention"):
        validate_matches([LayerMatch(student_layer=0, teacher_layer=0, feature="attention")], 12, 4)


@pytest.mark.parametrize("strategy, n_teacher, n_student", [
    ("skip", 12, 5),          # 12 is not a multiple of 5
    ("every_other", 4, 3),    # needs 5 teacher layers
    ("uniform", 4, 6),        # a student deeper than its teacher
])
def test_impossible_strategies_raise(strategy, n_teacher, n_student):
    with pytest.raises(ValueError):
        expand_strategy(strategy, n_teacher, n_student)


def test_method_params_refuse_strategies_of_other_papers():
    with pytest.raises(ValidationError):
        get_method("pkd")({"strategy": "uniform"})
    with pytest.raises(ValidationError):
        get_method("tinybert")({"strategy": "skip"})
