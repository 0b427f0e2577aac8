"""What code a stage runs, as file digests: the part of a stage's key that follows the source, not the config.

A stage's code is its module plus every project module it imports, directly or not, found by reading the
imports in the source (``import`` statements anywhere in a module, function-level ones included). A registry
package whose ``__init__`` imports all its plug-ins (``kd.methods``) is read, but not followed into those
plug-ins: a stage depends on the plug-ins it names (a student's method, added by the runner) and not on every
other one, so editing one method's loss reruns that method's students and nothing else.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

PROJECT_PACKAGES = ("kd", "stages")
REGISTRY_PACKAGES = frozenset({"kd.methods"})


def in_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT_PACKAGES


@lru_cache(maxsize=None)
def module_file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def parents(module: str) -> list[str]:
    """A module's packages, whose ``__init__`` runs when it is imported: a.b.c → a, a.b."""
    parts = module.split(".")
    return [".".join(parts[:depth]) for depth in range(1, len(parts))]


@lru_cache(maxsize=None)
def direct_imports(module: str) -> frozenset[str]:
    """The project modules ``module``'s source imports (a ``from package import name`` that names a submodule
    counts as that submodule)."""
    path = module_file(module)
    if path is None:
        return frozenset()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
    return frozenset(name for name in found if name and in_project(name) and module_file(name))


def closure(roots: tuple[str, ...]) -> list[str]:
    """``roots`` and every project module they import, with the packages those live in."""
    seen: set[str] = set()
    pending = [name for root in roots for name in (*parents(root), root)]
    while pending:
        module = pending.pop()
        if module in seen or not in_project(module) or module_file(module) is None:
            continue
        seen.add(module)
        if module in REGISTRY_PACKAGES:
            continue
        for imported in direct_imports(module):
            pending.extend((*parents(imported), imported))
    return sorted(seen)


@lru_cache(maxsize=None)
def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def code_digests(roots: tuple[str, ...]) -> dict[str, str]:
    """Each source file the modules ``roots`` run, by its path relative to the project, with a digest of its text."""
    digests = {}
    for module in closure(roots):
        path = module_file(module)
        top = Path(module_file(module.split(".")[0])).parent.parent
        digests[path.relative_to(top).as_posix()] = file_digest(path)
    return digests
