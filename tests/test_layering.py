"""The layering holds: ``pipeline`` (orchestration) over ``stages`` (thin Ray wrappers) over ``kd`` (pure PyTorch).
The contracts live in pyproject.toml under ``[tool.importlinter]``; this runs ``lint-imports`` on them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_follow_the_layers():
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.fail(f"{lint} not found: install the test extra (pip install -e '.[test]')")
    # Run from the repository root: lint-imports reads ./pyproject.toml and imports the root packages from there.
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"lint-imports exited {done.returncode}: the layering is broken\n{done.stdout}\n{done.stderr}",
                    pytrace=False)
