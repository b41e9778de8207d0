"""Every code example of the README and the docs site works as written.

- ```python blocks run, a page's blocks in order in one namespace, from the repository root, with the real
  packaged models on the committed fixtures;
- every `multiretrieval ...` line of a ```bash block is parsed by the command line's own parser (a renamed or
  removed option fails here), and the blocks marked `<!-- docs-test: run -->` run for real, in a scratch folder
  that sees the repository's tests/, data/ and configs/;
- every `python scripts/...` or `python benchmarks/...` script a block names exists, with the options it is given;
- every relative link of the README points at a file that exists.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?:<!-- docs-test: (?P<flag>[a-z]+) -->\n)?```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$",
                   re.M | re.S)
RUN_FOR_REAL = {"index", "search", "cache"}  # sub-commands a marked block may run (not serve, demo, train, evaluate)


@dataclass
class Block:
    page: Path
    line: int  # of the block's first line of code, 1-based
    lang: str
    body: str
    run: bool

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path, lang: str) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        if m["lang"] == lang:
            line = text.count("\n", 0, m.start("body")) + 1
            found.append(Block(page, line, lang, m["body"], m["flag"] == "run"))
    return found


def commands(block: Block) -> list[tuple[int, list[str]]]:
    """(line, argv after the program name) of each `multiretrieval` command in a bash block."""
    out, lines = [], block.body.splitlines()
    n = 0
    while n < len(lines):
        start, line = n, lines[n]
        while line.endswith("\\") and n + 1 < len(lines):  # continued lines
            n += 1
            line = line[:-1] + lines[n]
        n += 1
        for part in re.split(r"\s&&\s", line):
            words = shlex.split(part, comments=True)
            if words and words[0] == "multiretrieval":
                out.append((block.line + start, words[1:]))
    return out


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_pages_have_examples():
    python = {page_id(p) for p in PAGES if blocks(p, "python")}
    assert {"README.md", "docs/getting-started.md", "docs/queries.md"} <= python, python
    assert sum(len(commands(b)) for p in PAGES for b in blocks(p, "bash")) >= 20


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=page_id)
def test_python_examples_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for block in blocks(page, "python"):
        code = compile("\n" * (block.line - 1) + block.body, str(page), "exec")  # tracebacks name the page's own lines
        try:
            exec(code, namespace)  # noqa: S102 - the docs' own examples
        except Exception as exc:
            raise AssertionError(f"the example at {block} fails: {type(exc).__name__}: {exc}") from exc


def test_every_command_line_parses():
    """`multiretrieval ...` in a bash block, or in an inline code span with options, is accepted by the CLI's parser."""
    from multiretrieval.cli import build_parser

    parser = build_parser()
    failures = []
    for page in PAGES:
        spans = re.findall(r"`([^`]+)`", FENCE.sub("", page.read_text()))
        inline = [(0, shlex.split(span.replace("\n", " "))[1:]) for span in spans
                  if span.startswith("multiretrieval ") and " --" in span]  # `multiretrieval train` alone names a command
        for line, argv in [cmd for block in blocks(page, "bash") for cmd in commands(block)] + inline:
            where = f"{page_id(page)}:{line or 'inline'}: multiretrieval {shlex.join(argv)}"
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                failures.append(where)
                continue
            if getattr(args, "prune", False) and not args.update:
                failures.append(f"{where}: --prune without --update")
    assert not failures, "command lines the CLI refuses:\n" + "\n".join(failures)


def test_scripts_the_pages_name_exist_with_their_options():
    """`python scripts/X.py ... --flag` in a bash block or an inline code span: the script exists and declares --flag."""
    wrong = []
    for page in PAGES:
        spans = re.findall(r"`([^`]+)`", FENCE.sub("", page.read_text()))
        code = [b.body for b in blocks(page, "bash")] + [span.replace("\n", " ") for span in spans]
        for snippet in code:
            for script, args in re.findall(r"\bpython3? ((?:scripts|benchmarks)/[\w./-]+\.py)([^#;&\n]*)", snippet):
                if not (ROOT / script).is_file():
                    wrong.append(f"{page_id(page)}: {script} does not exist")
                    continue
                source = (ROOT / script).read_text()
                wrong += [f"{page_id(page)}: {script} has no option {flag}" for flag in re.findall(r"(?<!\S)(--[\w-]+)", args)
                          if f'"{flag}"' not in source]
    assert not wrong, wrong


def test_marked_command_lines_run(tmp_path, monkeypatch, capsys):
    from multiretrieval.cli import main

    for name in ("tests", "data", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    ran = []
    for page in PAGES:
        for block in blocks(page, "bash"):
            if not block.run:
                continue
            for line, argv in commands(block):
                if argv[0] not in RUN_FOR_REAL:
                    continue
                status = main(argv + (["--no-progress"] if argv[0] == "index" else []))
                out = capsys.readouterr()
                assert status == 0, f"{page_id(page)}:{line}: multiretrieval {shlex.join(argv)} exited {status}:\n{out.err}"
                ran.append(argv)
    assert len(ran) >= 3, ran


def anchors(page: Path) -> set[str]:
    """The ids Python-Markdown's toc extension gives a page's headings (mkdocs.yml checks the docs' own links)."""
    text = FENCE.sub("", page.read_text())
    ids = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        heading = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
        ids.add(re.sub(r"[-\s]+", "-", heading))
    return ids


def test_readme_links_point_at_files_and_headings():
    text = (ROOT / "README.md").read_text()
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s]+)(?:#([^)]*))?\)", text):
        if "://" in target:
            continue
        if not (ROOT / target).exists():
            broken.append(target)
        elif anchor and anchor not in anchors(ROOT / target):
            broken.append(f"{target}#{anchor}")
    assert not broken, broken
