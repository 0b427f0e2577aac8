"""Content-keyed stage outputs, written atomically.

A stage's key hashes its config slice and its inputs' keys. Its output goes to a temporary folder that is
renamed into place only after a completion marker is written, so a killed run never leaves an output that a
later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

COMPLETE_MARKER = "_COMPLETE"
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Artifact:
    stage: str
    key: str
    path: Path

    def result(self) -> dict:
        """The metrics and facts the stage recorded next to its output."""
        result_path = self.path / RESULT_FILE
        return json.loads(result_path.read_text()) if result_path.exists() else {}


def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def content_key(stage: str, config_slice: Any, inputs: dict[str, Artifact | str] | None = None,
                code: dict[str, str] | None = None) -> str:
    """Hash of what determines a stage's output: its config slice, its inputs' keys and the digests of the source
    files it runs (``pipeline.code_keys``)."""
    payload = {
        "stage": stage,
        "config": _canonical(config_slice),
        "inputs": {name: getattr(value, "key", value) for name, value in sorted((inputs or {}).items())},
        "code": dict(sorted((code or {}).items())),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Artifact | None:
        path = self.path(stage, key)
        return Artifact(stage, key, path) if (path / COMPLETE_MARKER).exists() else None

    @contextmanager
    def writing(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a scratch folder; on success it becomes the artifact, on failure it is removed."""
        final = self.path(stage, key)
        scratch = final.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        scratch.mkdir(parents=True)
        try:
            yield scratch
            (scratch / COMPLETE_MARKER).write_text("")
            publish(scratch, final)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)


def publish(scratch: Path, final: Path) -> None:
    """Rename a finished scratch folder into place, never deleting a finished artifact: another stage may be
    reading it. When a concurrent writer of the same key got there first, its artifact (same key, same content)
    stays and this one is dropped."""
    if final.exists() and not (final / COMPLETE_MARKER).exists():
        stale = final.parent / f".{final.name}.stale-{uuid.uuid4().hex[:8]}"
        try:  # moved aside first: the rename is atomic, the removal is not
            os.rename(final, stale)
        except FileNotFoundError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(scratch, final)
    except OSError:
        if not (final / COMPLETE_MARKER).exists():
            raise


def write_result(directory: Path, result: dict) -> None:
    (directory / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
