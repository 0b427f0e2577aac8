"""Cache keys and atomic stage outputs."""

import pytest

from pipeline.artifacts import Artifact, ArtifactStore, content_key
from pipeline.config import TaskConfig


def test_key_is_stable_and_order_independent():
    assert content_key("s", {"a": 1, "b": [1, 2]}) == content_key("s", {"b": [1, 2], "a": 1})


def test_key_changes_with_config_inputs_stage_and_version():
    base = content_key("s", {"a": 1}, {"x": Artifact("x", "k1", None)})
    assert content_key("s", {"a": 2}, {"x": Artifact("x", "k1", None)}) != base
    assert content_key("s", {"a": 1}, {"x": Artifact("x", "k2", None)}) != base
    assert content_key("t", {"a": 1}, {"x": Artifact("x", "k1", None)}) != base
    assert content_key("s", {"a": 1}, {"x": Artifact("x", "k1", None)}, code={"kd/losses.py": "1"}) != base
    assert content_key("s", {"a": 1}, {"x": "k1"}) == base


def test_key_accepts_pydantic_models():
    assert content_key("data", TaskConfig()) == content_key("data", TaskConfig().model_dump(mode="json"))
    assert content_key("data", TaskConfig(max_rows=20)) != content_key("data", TaskConfig())


def test_output_appears_only_when_complete(tmp_path):
    store = ArtifactStore(tmp_path)
    assert store.lookup("s", "k") is None
    with store.writing("s", "k") as scratch:
        (scratch / "out.txt").write_text("x")
        assert store.lookup("s", "k") is None
    artifact = store.lookup("s", "k")
    assert artifact is not None and (artifact.path / "out.txt").read_text() == "x"


def test_failed_stage_leaves_nothing_trusted(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writing("s", "k") as scratch:
            (scratch / "half.parquet").write_text("partial")
            raise RuntimeError("killed")
    assert store.lookup("s", "k") is None
    assert not list((tmp_path / "s").iterdir())


def test_leftover_without_marker_is_replaced(tmp_path):
    store = ArtifactStore(tmp_path)
    leftover = store.path("s", "k")
    leftover.mkdir(parents=True)
    (leftover / "stale").write_text("old")
    assert store.lookup("s", "k") is None
    with store.writing("s", "k") as scratch:
        (scratch / "fresh").write_text("new")
    assert not (leftover / "stale").exists() and (leftover / "fresh").exists()
