"""README.md stays a short front page whose commands are true, and every relative link in it and in
docs/*.md leads somewhere: the file exists and, for a `#anchor` into a Markdown page, that page has the
heading (GitHub's slugs)."""
from __future__ import annotations

import re
from pathlib import Path

from main import parse_args

ROOT = Path(__file__).resolve().parent.parent
README_MAX_BYTES = 15_000
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _outside_code(text: str) -> str:
    """The text without fenced code blocks (a `[x](y)` in a shell example is no link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", _outside_code(page.read_text()), re.M)}


def broken_links(pages: list[Path]) -> list[str]:
    bad = []
    for page in pages:
        for target in LINK.findall(_outside_code(page.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{page.name}: {target} (no such heading in {dest.name})")
    return bad


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _command_after(text: str, marker: str) -> str:
    """The first line of the first ```bash block after the paragraph that starts with `marker`."""
    rest = text[text.index(marker):]
    return re.search(r"```bash\n(.+?)\n", rest).group(1).strip()


def test_every_relative_link_resolves():
    pages = doc_pages()
    assert len(pages) >= 8, "the reference pages under docs/ are missing"
    assert broken_links(pages) == []


def test_readme_stays_short_and_links_the_reference():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= README_MAX_BYTES
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme) if t.startswith("docs/")}
    assert {p.name for p in (ROOT / "docs").glob("*.md")} <= linked, "a docs/ page the README does not link"


def test_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = _command_after(readme, "Run the tests")
    ci_command = ci[ci.index("# --- the README's test command, verbatim:") + 1].strip()
    assert test_command == ci_command
    demo_command = _command_after(readme, "Run the server on the built-in demo models")
    make_venv, install, run = demo_command.split(" && ")
    assert ci_command.startswith(make_venv + " && ")  # the venv CI makes
    assert install.split() == [".venv/bin/pip", "install", "-r", "requirements.txt"]
    program, script, *flags = run.split()
    assert (program, script) == (".venv/bin/python", "main.py")
    assert parse_args(flags).demo is True  # main.py takes the README's flags


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some heading: `x`\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md#some-heading-x) [gone](docs/b.md) [no heading](docs/a.md#other) [web](https://x.org)\n"
        "```\n[not a link](nowhere.md)\n```\n")
    assert broken_links([tmp_path / "README.md"]) == ["README.md: docs/b.md (no such file)",
                                                     "README.md: docs/a.md#other (no such heading in a.md)"]
