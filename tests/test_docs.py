"""The project's pages point only at what exists: every relative link of README.md, toy/README.md, tests/README.md,
examples/README.md and bench/*.md names a file or folder of the repository (and, for `page.md#anchor`, a heading
of that page), and every `python script.py` or `python -m package.module` they show names a script or module
that exists.

Fast: the pages are read as text, nothing is imported or run."""
import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "toy/README.md", "tests/README.md", "examples/README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "bench", "*.md")))

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(\S+)", re.M)
HTML_LINK = re.compile(r"\b(?:href|src)=\"([^\"]+)\"")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
PYTHON = re.compile(r"(?<![\w./-])python3?\s+(?:-[uOBIS]+\s+)*(?:-m\s+([\w.]+)|([\w./-]+\.py)\b)")


def blank(text, pattern, group=0):
    """`text` with every match of `pattern` (or one group of it) turned into spaces, newlines kept: offsets, and so
    line numbers, stay those of the page."""
    def spaces(m):
        whole, part = m.group(0), m.group(group)
        start = m.start(group) - m.start(0)
        return whole[:start] + re.sub(r"[^\n]", " ", part) + whole[start + len(part):]
    return pattern.sub(spaces, text)


def code_texts(text):
    """(offset, code) of every fenced block's body and every inline code span."""
    out = []
    for m in FENCE.finditer(text):
        body_start = text.index("\n", m.start()) + 1 if "\n" in m.group(0) else m.end()
        out.append((body_start, text[body_start:m.end()]))
    for m in INLINE_CODE.finditer(blank(text, FENCE)):
        out.append((m.start(2), m.group(2)))
    return out


def slug(heading):
    """GitHub's anchor of a heading: its text (link targets and markup dropped), lowercased, punctuation other
    than '-' and '_' removed, every space turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    """Every anchor of a page: its headings' slugs (a repeated one gets -1, -2, ... as on GitHub)."""
    with open(path, encoding="utf-8") as f:
        text = blank(f.read(), FENCE)
    seen, out = {}, set()
    for m in HEADING.finditer(text):
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def line_of(text, offset):
    return text.count("\n", 0, offset) + 1


def check_links(page, root=ROOT):
    """Problems with the relative links of one page, as 'page:line: message'."""
    path = os.path.join(root, page)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    prose = blank(blank(text, FENCE), INLINE_CODE, 2)
    found = [(m.start(1), m.group(1).strip("<>")) for rx in (LINK, REF_LINK, HTML_LINK) for m in rx.finditer(prose)]
    problems = []
    for offset, target in sorted(found):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):   # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        file_part = file_part.split("?")[0].replace("%20", " ")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        where = f"{page}:{line_of(text, offset)}"
        if not os.path.exists(dest):
            problems.append(f"{where}: link target {target!r} does not exist")
        elif anchor and dest.endswith(".md") and anchor.lower() not in anchors(dest):
            problems.append(f"{where}: link {target!r}: no heading of {os.path.relpath(dest, root)} has the "
                            f"anchor #{anchor}")
    return problems


def module_exists(name, root=ROOT):
    """A module of the repository (its file or package folder), or else an installed one (found, not imported)."""
    parts = name.split(".")
    if os.path.exists(os.path.join(root, parts[0] + ".py")) or os.path.isdir(os.path.join(root, parts[0])):
        base = os.path.join(root, *parts)
        return os.path.exists(base + ".py") or os.path.exists(os.path.join(base, "__init__.py"))
    return importlib.util.find_spec(parts[0]) is not None


def check_commands(page, root=ROOT):
    """Problems with the `python ...` commands in one page's code, as 'page:line: message'."""
    with open(os.path.join(root, page), encoding="utf-8") as f:
        text = f.read()
    problems = []
    for start, code in code_texts(text):
        for m in PYTHON.finditer(code):
            module, script = m.groups()
            where = f"{page}:{line_of(text, start + m.start())}"
            if module and not module_exists(module, root):
                problems.append(f"{where}: `python -m {module}`: no such module")
            if script and not os.path.isfile(os.path.join(root, script)):
                problems.append(f"{where}: `python {script}`: no such script")
    return problems


def test_the_pages_are_there():
    for page in ["README.md", "toy/README.md", "tests/README.md", "examples/README.md"]:
        assert os.path.isfile(os.path.join(ROOT, page)), page
    assert len(PAGES) > 3


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    problems = check_links(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES)
def test_every_python_command_names_a_script_or_module_that_exists(page):
    problems = check_commands(page)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_are_for(tmp_path):
    (tmp_path / "tool.py").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text("")
    (tmp_path / "other.md").write_text("# Other page\n\n## 20,000 steps: the fifth (shipped)\n\n## Notes\n\n## Notes\n")
    (tmp_path / "page.md").write_text(
        "# Page\n\n[ok](other.md) [ok](other.md#20000-steps-the-fifth-shipped) [ok](other.md#notes-1) "
        "[ok](#page) ![ok](tool.py) [web](https://example.org/x.md)\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere) [bad here](#nowhere)\n"
        "`[not a link](missing.md)` and `python tool.py`, `python -m pkg.mod`, `python -m pytest`\n\n"
        "```bash\nOMP_NUM_THREADS=2 python -m pkg.gone --x && time python bench/gone.py\n"
        "[not a link either](missing.md)\n```\n")
    links = check_links("page.md", str(tmp_path))
    assert len(links) == 3 and all(p.startswith("page.md:4: ") for p in links), links
    assert "missing.md" in links[0] and "#nowhere" in links[1] and "#nowhere" in links[2]
    commands = check_commands("page.md", str(tmp_path))
    assert commands == ["page.md:8: `python -m pkg.gone`: no such module",
                        "page.md:8: `python bench/gone.py`: no such script"], commands
