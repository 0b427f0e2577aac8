"""Search-space files: parsing, and validation against the method's schema before Tune starts."""

import pytest
import yaml

from conftest import SMOKE_CONFIG
from pipeline.config import ConfigError, load_experiment
from pipeline.search_space import SPACES_DIR, apply_sample, load_space
from kd.errors import StageError
from pipeline.tune_trials import check_nested_fits

BASE = {"name": "s", "method": "kd", "student": {"layers": 2}, "params": {"temperature": 4.0}}


def write(tmp_path, document):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_fit_their_methods(path):
    base = {"name": "s", "method": path.stem, "student": {"layers": 2}}
    space = load_space(path.stem, base, path)
    assert space.space and space.mode in ("max", "min")


def test_distributions_parse_and_convert(tmp_path):
    space = load_space("kd", BASE, write(tmp_path, {"space": {
        "params.temperature": {"loguniform": [1, 10]}, "params.alpha": {"uniform": [0.1, 0.9]},
        "student.layers": {"randint": [1, 3]}, "student.init": {"choice": ["uniform", "top"]},
        "train.learning_rate": {"grid": [1e-4, 2e-4]}}}))
    tune_space = space.param_space()
    assert tune_space["train.learning_rate"] == {"grid_search": [1e-4, 2e-4]}
    assert tune_space["student.init"].categories == ["uniform", "top"]
    assert tune_space["params.temperature"].lower == 1


def test_sample_is_written_into_the_student_entry():
    sampled = apply_sample(BASE, {"params.alpha": 0.3, "train.learning_rate": 1e-4})
    assert sampled["params"] == {"temperature": 4.0, "alpha": 0.3} and sampled["train"] == {"learning_rate": 1e-4}
    assert "alpha" not in BASE["params"]


@pytest.mark.parametrize("space, message", [
    ({"params.temprature": {"uniform": [1, 2]}}, "space.params.temprature = 1 does not fit the 'kd' student: "
                                                 "params.temprature: unknown field"),
    ({"params.alpha": {"uniform": [0.5, 2.0]}}, "space.params.alpha = 2.0 does not fit"),
    ({"student.init": {"choice": ["uniform", "sideways"]}}, "space.student.init = 'sideways'"),
    ({"params.alpha": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
    ({"params.alpha": {"uniform": [0.9, 0.1]}}, "needs low < high"),
    ({"params.alpha": {"loguniform": [0, 1]}}, "loguniform needs low > 0"),
    ({"alpha": {"uniform": [0.1, 0.2]}}, "keys start with one of params, student, train"),
])
def test_errors_name_the_file_and_field(tmp_path, space, message):
    path = write(tmp_path, {"space": space})
    with pytest.raises(ConfigError) as caught:
        load_space("kd", BASE, path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_missing_space_file_says_where_to_put_it(tmp_path):
    with pytest.raises(ConfigError, match="no search space for method 'kd'"):
        load_space("kd", BASE, tmp_path / "absent.yaml")


def test_unknown_top_level_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown field"):
        load_space("kd", BASE, write(tmp_path, {"metrc": "x", "space": {"params.alpha": {"uniform": [0.1, 0.2]}}}))


def test_every_registered_method_has_a_search_space():
    from kd.methods import METHODS

    assert set(METHODS) == {path.stem for path in SPACES_DIR.glob("*.yaml")}


def test_nested_trials_refuse_a_cluster_without_a_cpu_for_their_reads():
    exp = load_experiment(SMOKE_CONFIG, ["tune.trial_mode=nested", "ray.num_workers=1", "ray.cpus_per_worker=1"])
    with pytest.raises(StageError, match="needs at least 2.1 CPUs.*has 2"):
        check_nested_fits(exp, 2.0)
    check_nested_fits(exp, 3.0)
