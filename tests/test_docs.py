"""The README and docs/ stay true: every page is reachable from the README, every relative link and anchor
resolves, every `python -m pipeline <command>` they mention exists, and the cheap commands they show run.
No Ray: `validate` reads the packaged teacher's config from disk, and hub teachers are not contacted."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kd.methods import METHODS
from pipeline.cli import app
from pipeline.config import load_experiment

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
PIPELINE_COMMAND = re.compile(r"python -m pipeline\s+([A-Za-z][\w-]*)")
CONFIG = re.compile(r"\bconfigs/[\w.-]+\.ya?ml\b")
EXTERNAL = ("http://", "https://", "mailto:")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """Text outside code blocks and code spans, where markdown links and headings live."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text()))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link and emphasis markup dropped, lower case, punctuation removed, spaces
    to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def test_there_are_docs_pages():
    assert DOCS, "docs/ has no pages"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README)
              if not target.startswith(EXTERNAL) and not target.startswith("#")}
    missing = [rel(page) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"docs pages the README does not link to: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_point_to_existing_files_and_headings(page):
    broken = []
    for target in links(page):
        if target.startswith(EXTERNAL):
            continue
        path_part, _, fragment = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{target}: no heading #{fragment} in {rel(destination)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


def test_every_pipeline_command_mentioned_exists():
    commands = set(typer.main.get_command(app).commands)
    unknown = {f"{rel(page)}: python -m pipeline {name}" for page in PAGES
               for name in PIPELINE_COMMAND.findall(page.read_text()) if name not in commands}
    assert not unknown, f"not a command of pipeline/cli.py ({sorted(commands)}): {sorted(unknown)}"


runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"python -m pipeline {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    return result.output


def test_help_lists_every_command():
    output = invoke("--help")
    for name in typer.main.get_command(app).commands:
        assert name in output


def test_methods_lists_every_registered_method_and_the_docs_table_has_each():
    output = invoke("methods")
    table = (ROOT / "docs" / "methods.md").read_text()
    for name in METHODS:
        assert name in output
        assert f"| `{name}`" in table, f"docs/methods.md's methods table has no row for {name!r}"


def test_quickstart_validates():
    assert "ok" in invoke("validate", str(ROOT / "configs" / "quickstart.yaml"))


def named_configs() -> list[str]:
    return sorted({name for page in PAGES for name in CONFIG.findall(page.read_text())})


def test_the_docs_name_the_shipped_configs():
    assert "configs/quickstart.yaml" in named_configs()


@pytest.mark.parametrize("config", named_configs())
def test_every_config_named_in_the_docs_validates(config):
    assert (ROOT / config).exists(), f"{config} is named in the docs but does not exist"
    exp = load_experiment(ROOT / config)
    sources = [exp.teacher.source, *(member.source for member in (exp.ensemble.teachers if exp.ensemble else []))]
    # A hub teacher's config needs network; the packaged teacher and local folders are read from disk.
    local = all(source.startswith("package:") or Path(source).expanduser().exists() for source in sources)
    args = ["validate", str(ROOT / config)] + ([] if local else ["--no-check-teacher"])
    assert "ok" in invoke(*args)
