"""The project's documents stand on their own.

* No project file (the README, ``docs/``, ``deploy/``, ``examples/``, ``protos/``, the benchmarks,
  the Python packages, the tests) refers to a file outside the repository: the team's own notes
  are not shipped, and a reader of the repository cannot follow such a reference.
* Every relative link of the Markdown documents leads to a file of the repository, and a link
  to a heading (``#anchor``) to a heading that exists.
* The README links the architecture document and describes workloads by what they are.

Only files are read: the test takes well under a second.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Text that only a reference to the team's notes outside the repository would contain (spelt in
# pieces so that this file does not match itself).
OUTSIDE_MARKERS = ("../" + "shared", "shared/" + "DESIGN", "DESIGN" + ".md", "/work/" + "shared")

_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis", "artifacts", "node_modules"}


def _files_under(folder: Path, pattern: str = "*") -> Iterator[Path]:
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob(pattern)):
        if path.is_file() and not _SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            yield path


def project_files() -> list[Path]:
    """The files that make up the project, tests excluded."""
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for folder in ("docs", "deploy", "examples", "protos", "qscale", "coordinator", "node", ".ci"):
        files += _files_under(ROOT / folder)
    files += sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.md"))
    return [f for f in files if f.is_file()]


def suite_files() -> list[Path]:
    """The test modules."""
    return sorted((ROOT / "tests").glob("*.py"))


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (an image)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _inside(path: Path) -> bool:
    try:
        path.resolve().relative_to(ROOT)
    except ValueError:
        return False
    return True


def test_no_project_file_refers_to_the_notes_outside_the_repository() -> None:
    found = []
    for path in project_files() + suite_files():
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for marker in OUTSIDE_MARKERS:
                if marker in line:
                    found.append(f"{_rel(path)}:{number}: {line.strip()[:120]}")
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


# A relative path that climbs: ../x, ../../x/y.md (not part of a longer path or word).
_CLIMBING_PATH = re.compile(r"(?<![\w./-])((?:\.\./)+[\w.-][\w./-]*)")


def test_no_relative_path_in_a_project_file_leaves_the_repository() -> None:
    found = []
    for path in project_files():
        text = _text(path)
        if text is None:
            continue
        for match in _CLIMBING_PATH.finditer(text):
            if not _inside(path.parent / match.group(1)):
                number = text.count("\n", 0, match.start()) + 1
                found.append(f"{_rel(path)}:{number}: {match.group(1)}")
    assert not found, "relative paths that leave the repository:\n" + "\n".join(found)


# ---- Markdown links

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
_HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.I)
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")


def markdown_documents() -> list[Path]:
    docs = [ROOT / "README.md"]
    for folder in ("docs", "deploy", "benchmarks"):
        docs += _files_under(ROOT / folder, "*.md")
    return docs


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (their brackets are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Every link target of a Markdown text: inline links and images, reference definitions,
    HTML ``href``/``src``."""
    prose = _prose(text)
    return [m.group(1) for pattern in (_INLINE_LINK, _REFERENCE, _HTML_LINK) for m in pattern.finditer(prose)]


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown text."""
    seen: dict[str, int] = {}
    out = set()
    for match in _HEADING.finditer(_FENCE.sub("", text)):
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))  # a link: its text
        title = re.sub(r"<[^>]+>", "", title).replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


@pytest.mark.parametrize("document", markdown_documents(), ids=_rel)
def test_relative_markdown_links_lead_to_files_of_the_repository(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    broken = []
    for target in links(text):
        if _SCHEME.match(target):
            continue  # a web address (http:, https:, mailto:)
        path_part, _, fragment = target.partition("#")
        path = (document.parent / path_part) if path_part else document
        if not _inside(path):
            broken.append(f"{target}: outside the repository")
        elif not path.exists():
            broken.append(f"{target}: no such file")
        elif fragment and path.suffix == ".md" and fragment.lower() not in anchors(path.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading #{fragment} in {_rel(path)}")
    assert not broken, f"{_rel(document)}: broken links:\n" + "\n".join(broken)


def test_readme_links_the_architecture_document() -> None:
    targets = links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "docs/architecture.md" in [t.partition("#")[0] for t in targets]
    assert (ROOT / "docs" / "architecture.md").is_file()


def test_workloads_are_described_by_what_they_are() -> None:
    """"The seed workload" and "the seed's approach" assumed documents the reader does not have
    (and "seed" is the random seed here): name the circuits, qubits and shots instead."""
    found = []
    files = [ROOT / "README.md", *markdown_documents(), *sorted((ROOT / "benchmarks").glob("*.py")),
             *_files_under(ROOT / "examples")]
    for path in dict.fromkeys(files):
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if re.search(r"seed workload|seed's approach", line, re.I):
                found.append(f"{_rel(path)}:{number}: {line.strip()[:120]}")
    assert not found, "\n".join(found)


def test_the_link_checks_catch_what_they_should() -> None:
    """The helpers themselves: code is not a link, headings get GitHub's anchors."""
    text = "# Quick start\n\n## Wide circuits and `exact` values\n\n[a](docs/x.md#y) `[b](c)`\n\n" \
           "```python\nprint(x[0](1))\n```\n\n[ref]: deploy/README.md\n"
    assert links(text) == ["docs/x.md#y", "deploy/README.md"]
    assert anchors(text) == {"quick-start", "wide-circuits-and-exact-values"}
    assert _CLIMBING_PATH.search("see ../../elsewhere/notes.md")
    assert not _inside(ROOT / ".." / "shared")


# ------------------------------------------------------------------ flags the documents name

# Flags of other tools that the documents show (docker compose, kubectl, systemctl, useradd) and
# of the benchmark scripts.
OTHER_TOOLS_FLAGS = {"--build", "--dry-run", "--from-file", "--home-dir", "--now", "--replicas", "--scale",
                     "--shell", "--system", "--only", "--quick"}


def _cli_options() -> dict[str, set[str]]:
    """Every option of ``qscale-coordinator`` (all subcommands), ``qscale-node`` and
    ``qscale-healthcheck``, by tool."""
    import argparse

    from qscale.coordinator.cli import _parser
    from qscale.healthcheck import _parser as healthcheck_parser
    from qscale.node.cli import build_parser

    def walk(parser: argparse.ArgumentParser, into: set[str]) -> set[str]:
        for action in parser._actions:
            into.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub, into)
        return into

    return {"coordinator": walk(_parser(), set()), "node": walk(build_parser(), set()),
            "healthcheck": walk(healthcheck_parser(), set())}


@pytest.mark.parametrize("doc", ["README.md", "deploy/README.md", "docs/architecture.md"])
def test_every_flag_a_document_names_exists(doc: str) -> None:
    known = set().union(*_cli_options().values()) | OTHER_TOOLS_FLAGS
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", (ROOT / doc).read_text(encoding="utf-8")))
    assert not named - known, f"{doc} names flags no qscale tool has: {sorted(named - known)}"


def test_the_deployment_guide_lists_every_port_a_tool_can_open() -> None:
    """Every ``--*-port`` of the coordinator and the node has its place in deploy/README.md,
    and the guide does not say that the tools lack them."""
    options = _cli_options()
    guide = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    ports = {flag for tool in ("coordinator", "node") for flag in options[tool] if flag.endswith("-port")}
    assert ports >= {"--metrics-port", "--dashboard-port", "--health-port"}, ports
    table = [line for line in guide.splitlines() if line.startswith("|")]
    for flag in ports:
        assert any(f"`{flag}`" in row for row in table), f"deploy/README.md's port table lacks {flag}"
    assert "do not have them" not in guide and "no health endpoint" not in guide
