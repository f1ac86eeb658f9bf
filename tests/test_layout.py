"""The file as a map: orchestra.py's sections, read from its banners and its AST.

A section starts at a banner in one style:

    # ======...
    # Title
    # ------...
    # A paragraph that teaches the section's rule.
    # ======...

and runs to the next banner. The rules kept here (STYLE.md, "Layout"):
- calls run down the file: a top-level definition names only definitions of its own section or
  of sections above it, so a newcomer can read from the top without jumping ahead;
- a section tells one story in at most SECTION_MAX_LINES lines;
- the module docstring's map lists every banner, in file order;
- `# fmt: skip` is kept for a few aligned tables only.
When a check fails, move the code to where it belongs rather than bending the check.
"""

import ast
import re
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "orchestra.py"
SECTION_MAX_LINES = 900
FMT_SKIP_MAX = 19
BANNER_RULE = "# " + "=" * 86
BANNER_UNDERLINE = "# " + "-" * 86
SUB_BANNER = re.compile(r"^# --- [a-z].* -+$")


class Section:
    """One banner's section: its title, first line (1-based) and line count."""

    def __init__(self, title, start, end):
        self.title, self.start, self.end = title, start, end

    @property
    def size(self):
        """Lines from the banner up to the next banner."""
        return self.end - self.start


def sections_of(text):
    """The sections of a module's source, in file order (an empty list when it has no banner)."""
    lines = text.splitlines()
    starts = [
        (n + 1, lines[n + 1][2:].strip())
        for n in range(len(lines) - 2)
        if lines[n] == BANNER_RULE
        and lines[n + 2] == BANNER_UNDERLINE
        and lines[n + 1].startswith("# ")
    ]
    ends = [start for start, _ in starts[1:]] + [len(lines) + 1]
    return [Section(title, start, end) for (start, title), end in zip(starts, ends)]


def bound_names(node):
    """The module-level names a top-level statement defines."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign):
        targets = [node.target]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def local_names(node):
    """Names a function or class binds for itself (arguments and assignments), which shadow globals."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return set()
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
    return names


def forward_references(text):
    """(definition, name, its section, the later section defining name) for each reference down."""
    sections = sections_of(text)

    def section_at(line):
        return next((s for s in reversed(sections) if s.start <= line), None)

    tree = ast.parse(text)
    defined = {}
    for node in tree.body:
        for name in bound_names(node):
            defined[name] = section_at(node.lineno)
    found = []
    for node in tree.body:
        names = bound_names(node)
        here = section_at(node.lineno)
        if not names or here is None:
            continue
        shadowed = local_names(node)
        seen = set()
        for n in ast.walk(node):
            if not (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)):
                continue
            there = defined.get(n.id)
            if n.id in shadowed or there is None or there.start <= here.start or n.id in seen:
                continue
            seen.add(n.id)
            found.append((names[0], n.id, here.title, there.title))
    return found


def docstring_map(text):
    """The lines of the module docstring's map: from 'Map of this file' to the end."""
    doc = ast.get_docstring(ast.parse(text)) or ""
    _, _, after = doc.partition("Map of this file")
    return after.splitlines()


def missing_from_map(text):
    """Banner titles the docstring's map does not list, each at the start of a line."""
    listed = [line.strip() for line in docstring_map(text)]
    return [
        s.title
        for s in sections_of(text)
        if not any(line.startswith(s.title + " ") for line in listed)
    ]


# --- the checks, on orchestra.py -----------------------------------------------------------------


@pytest.fixture(scope="module")
def source():
    return SOURCE.read_text(encoding="utf-8")


def test_calls_run_down_the_file(source):
    problems = [
        f"{definition} (section {here!r}) names {name}, defined below in section {there!r}"
        for definition, name, here, there in forward_references(source)
    ]
    assert not problems, "move each to the section where it belongs:\n" + "\n".join(problems)


def test_every_section_tells_one_story_in_at_most_900_lines(source):
    too_long = [
        f"{s.title!r}: {s.size} lines (from line {s.start})"
        for s in sections_of(source)
        if s.size > SECTION_MAX_LINES
    ]
    assert not too_long, "split these by concern:\n" + "\n".join(too_long)


def test_the_docstring_maps_every_section_in_file_order(source):
    assert not missing_from_map(source), f"add to the docstring's map: {missing_from_map(source)}"
    listed = [line.strip() for line in docstring_map(source)]
    titles = [s.title for s in sections_of(source)]
    firsts = [next(i for i, line in enumerate(listed) if line.startswith(t + " ")) for t in titles]
    assert firsts == sorted(firsts), "the docstring's map lists the sections out of file order"


def test_every_banner_has_its_teaching_paragraph(source):
    lines = source.splitlines()
    bare = [s.title for s in sections_of(source) if not lines[s.start + 1].startswith("# ")]
    assert len(sections_of(source)) >= 20
    assert not bare, f"these banners lack a paragraph saying what belongs there: {bare}"


def test_one_banner_style_and_one_sub_banner_style(source):
    odd = [
        f"line {n}: {line}"
        for n, line in enumerate(source.splitlines(), 1)
        if (line.startswith("# ---") and line != BANNER_UNDERLINE and not SUB_BANNER.match(line))
        or (line.startswith("# ===") and line != BANNER_RULE)
    ]
    assert not odd, "banners are '# ===' blocks; sub-banners '# --- title ---':\n" + "\n".join(odd)


def test_fmt_skip_is_kept_for_a_few_tables(source):
    assert source.count("# fmt: skip") <= FMT_SKIP_MAX


# --- the checker itself: each rule can fail ---------------------------------------------------------


def module(*sections, doc_map=()):
    """A made-up module: ("Title", "code") sections under banners, and a docstring map."""
    doc = (
        '"""A module.\n\nMap of this file.\n' + "".join(f"  {t}  what\n" for t in doc_map) + '"""\n'
    )
    body = "".join(
        f"{BANNER_RULE}\n# {title}\n{BANNER_UNDERLINE}\n# What belongs here.\n{BANNER_RULE}\n\n{code}\n"
        for title, code in sections
    )
    return doc + body


def test_a_definition_naming_a_later_section_is_reported_with_both_sections():
    text = module(
        ("Low", "def low():\n    return high()\n"), ("High", "def high():\n    return 1\n")
    )
    assert forward_references(text) == [("low", "high", "Low", "High")]


def test_names_from_above_and_shadowing_locals_are_fine():
    text = module(
        ("Low", "LIMIT = 3\n\ndef low(high=None):\n    return high or LIMIT\n"),
        ("High", "def high():\n    return low()\n"),
    )
    assert forward_references(text) == []


def test_a_section_over_the_limit_is_measured():
    code = "X = 1\n" * (SECTION_MAX_LINES + 1)
    sizes = {s.title: s.size for s in sections_of(module(("Big", code), ("Small", "Y = 2\n")))}
    assert sizes["Big"] > SECTION_MAX_LINES >= sizes["Small"]


def test_a_banner_missing_from_the_map_is_named():
    text = module(("Listed", "A = 1\n"), ("Forgotten", "B = 2\n"), doc_map=["Listed"])
    assert missing_from_map(text) == ["Forgotten"]
