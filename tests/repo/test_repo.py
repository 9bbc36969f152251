"""The repository stands on its own: a clone needs nothing beside it.

- No tracked file refers to the build machine's shared folder (beside the
  checkout, where the CI keeps what it cannot download), except `.ci/run`, which takes the sqld
  source package from there because that CI reaches no git host.
- No tracked file mentions issues (of a tracker no reader of the repository sees):
  the word "issue" or "issues" is not used at all, so "see the notes of the X
  issue" cannot come back. Verbatim copies of third-party files are exempt.
- Relative links in Markdown files lead to files inside the repository.
- The modules under `src/` depend on each other in one direction (no cycle,
  however long), and the shared vocabulary (`src/model`) imports nothing.

Run: python -m pytest tests/repo   (needs git: the tracked files are `git ls-files`)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# This file spells out what it forbids.
THIS_FILE = str(Path(__file__).resolve().relative_to(REPO))
# The one file that may reach beside the checkout.
MAY_REFER_OUTSIDE = {".ci/run"}
# Third-party files kept byte for byte (tests/deploy/schemas/README.md says whose).
VERBATIM_COPIES = {"tests/deploy/schemas/fly.json", "tests/deploy/schemas/helm-chart.json"}

# Spelled in parts, so that this file itself does not name the folder it forbids.
SHARED = "../" + "shared"
OUTSIDE = re.compile(
    re.escape(SHARED) + r"\b|(?<![\w.-])shared/(?:vendor|notes|schemas)\b|/work/shared\b|\bSTACK\.md\b"
)
TRACKER = re.compile(r"\bissues?\b", re.IGNORECASE)
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def tracked_files() -> list[str]:
    git = shutil.which("git")
    if git is None:
        pytest.fail("git is not installed: these checks read the tracked files with `git ls-files`")
    listed = subprocess.run([git, "ls-files", "-z"], cwd=REPO, capture_output=True, check=False)
    assert listed.returncode == 0, f"`git ls-files` failed in {REPO} (not a git checkout?): {listed.stderr.decode()}"
    files = [name for name in listed.stdout.decode().split("\0") if name]
    assert len(files) > 50, f"only {len(files)} tracked files: is {REPO} the repository?"
    return files


def lines_matching(pattern: re.Pattern, skip: set[str]) -> list[str]:
    found = []
    for name in tracked_files():
        path = REPO / name
        if name in skip or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if pattern.search(line):
                found.append(f"{name}:{number}: {line.strip()[:160]}")
    return found


def test_the_rules_catch_what_they_are_for():
    """Guards the patterns themselves: what they must find, and what they must not."""
    for text in (f"Design: [`{SHARED}/DESIGN.md`]({SHARED}/DESIGN.md)", f"builds it from {SHARED}/vendor/libsql-server",
                 f"(see {SHARED}/notes/STACK.md)", f"at {SHARED}/schemas/fly.json beside the repository"):
        assert OUTSIDE.search(text), text
    for text in ("see the notes of the sqld issue for figures", "Against the group-commit issue's targets",
                 "fixed in Issue #16", "known issues"):
        assert TRACKER.search(text), text
    for text in ("the `iss` must match STATEHOUSE_JWT_ISSUER", "a cursor this server issued", "shared by every pod",
                 "the replicas share one database"):
        assert not TRACKER.search(text) and not OUTSIDE.search(text), text


def test_nothing_refers_outside_the_repository():
    found = lines_matching(OUTSIDE, MAY_REFER_OUTSIDE | {THIS_FILE})
    assert not found, "files that reach outside the repository:\n" + "\n".join(found)
    for name in MAY_REFER_OUTSIDE:
        assert OUTSIDE.search((REPO / name).read_text()), f"{name} no longer refers outside: drop it from MAY_REFER_OUTSIDE"


def test_no_file_mentions_issues():
    found = lines_matching(TRACKER, VERBATIM_COPIES | {THIS_FILE})
    assert not found, "files that mention issues (say what they mean, or put the figures in the docs):\n" + "\n".join(found)


def test_relative_markdown_links_stay_inside_and_resolve():
    broken = []
    for name in tracked_files():
        if not name.endswith(".md"):
            continue
        source = REPO / name
        for target in MARKDOWN_LINK.findall(source.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            resolved = (source.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(REPO) or not resolved.exists():
                broken.append(f"{name}: ({target})")
    assert not broken, "relative links that leave the repository or lead nowhere:\n" + "\n".join(broken)


CRATE_PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
LINE_COMMENT = re.compile(r"//[^\n]*")


def module_of(path: Path) -> str:
    """`src/objects/write.rs` -> `objects`, `src/writer.rs` -> `writer`."""
    first = path.relative_to(REPO / "src").parts[0]
    return first.removesuffix(".rs")


def module_dependencies(files: list[Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in files:
        module = module_of(path)
        code = LINE_COMMENT.sub("", path.read_text())
        edges.setdefault(module, set()).update(m for m in CRATE_PATH.findall(code) if m != module)
    return edges


def module_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(edges.get(module, ())):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def test_module_cycles_are_found():
    assert module_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert module_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_source_modules_depend_on_each_other_in_one_direction():
    """`src/<module>` (a folder or a file) names other modules as `crate::<module>`:
    no two of them may reach each other, so a change to one never needs the other."""
    files = [REPO / name for name in tracked_files() if name.startswith("src/") and name.endswith(".rs")]
    edges = module_dependencies(files)
    assert "model" in edges and "writer" in edges, sorted(edges)
    assert not edges["model"], f"src/model imports {sorted(edges['model'])}: the shared vocabulary must import nothing"
    cycles = module_cycles(edges)
    assert not cycles, "modules that import each other (directly or around a loop): " + "; ".join(
        " <-> ".join(group) for group in cycles
    )
