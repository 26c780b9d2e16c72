"""The README and docs/: short, linked, true to the code, and the man pages made from them.

No root, no network: these read files, run tools/manpages.py's renderer and,
where groff is installed, groff itself.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from netwatch import cli

from .test_real_systemd import readme_service_commands

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 350


def _manpages() -> ModuleType:
    spec = importlib.util.spec_from_file_location("manpages", ROOT / "tools" / "manpages.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["manpages"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


manpages = _manpages()


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _without_code(text: str) -> str:
    """The text with fenced blocks and code spans blanked: a link in an example is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "``", text)


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _without_code(text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    for line in _without_code(page.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.*)", line):
            slug = _slug(match.group(1))
            candidate, n = slug, 0
            while candidate in anchors:  # GitHub numbers a repeated heading's anchor
                n += 1
                candidate = f"{slug}-{n}"
            anchors.add(candidate)
    return anchors


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section {heading!r}"
    return match.group(1)


def _table(section: str) -> list[list[str]]:
    """The rows (header and separator left out) of the first pipe table in a section."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert len(lines) > 2, f"no table in:\n{section[:300]}"
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))] for line in lines[2:]]


# -- the README ---------------------------------------------------------------


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_readme_keeps_the_two_set_up_commands() -> None:
    # Verbatim: .ci/run runs the second, and a newcomer copies both.
    text = README.read_text()
    setup = _section(text, "## Set up (Debian 12, as root)")
    for command in ("bash tools/bootstrap.sh demo", "bash tools/bootstrap.sh test"):
        assert f"\n    {command}\n" in setup, f"README's set-up section lost `{command}`"
    assert "exec bash tools/bootstrap.sh test" in (ROOT / ".ci" / "run").read_text()


def test_readme_links_every_docs_page_and_only_pages_that_exist() -> None:
    linked = {target.split("#")[0] for target in _links(README.read_text()) if target.startswith("docs/")}
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    missing = sorted(target for target in linked if not (ROOT / target).exists())
    assert not missing, f"README links docs pages that do not exist: {missing}"
    unlisted = sorted(pages - linked)
    assert not unlisted, f"docs pages the README's index does not link: {unlisted}"


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in _pages():
        for target in _links(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
            elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
                broken.append(f"{where}: no heading with anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_no_reference_to_readme_sections_that_moved() -> None:
    # Code, tests and benches once said "see README, With libvirt" and the like: those sections are
    # docs pages now, and a pointer to a heading that is gone sends an admin nowhere.
    headings = {_slug(h) for h in re.findall(r"^#+ (.*)", README.read_text(), re.M)}
    stale = []
    for folder in ("netwatch", "tests", "bench", "conf", "units", "tools"):
        for path in sorted((ROOT / folder).rglob("*")):
            if not path.is_file() or path.suffix in (".pyc",) or path.name == "test_docs.py":
                continue
            text = path.read_text(errors="replace")
            for match in re.finditer(r"README[,:]? *(?:\"([^\"\n]+)\"|([A-Z][A-Za-z :]+?)[),.])", text):
                if _slug(match.group(1) or match.group(2)) not in headings:
                    stale.append(f"{path.relative_to(ROOT)}: {match.group(0)!r}")
    assert not stale, "references to README sections that are no longer there:\n" + "\n".join(stale)


# -- docs against the code ------------------------------------------------------


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_commands_page_has_every_command_and_option() -> None:
    rows = _table(_section((DOCS / "commands.md").read_text(), "## Commands"))
    documented = {}
    for usage, does in rows:
        match = re.fullmatch(r"`netwatch ([a-z-]+)(.*)`", usage)
        assert match, f"docs/commands.md: a command row must start `netwatch COMMAND ...`: {usage}"
        documented[match.group(1)] = (match.group(2), does)
    commands = _subcommands()
    assert sorted(documented) == sorted(commands), "docs/commands.md's table and netwatch's parser differ"
    problems = []
    for name, parser in commands.items():
        usage, does = documented[name]
        known: set[str] = set()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            known.update(action.option_strings)
            if action.option_strings:
                if not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", usage + " " + does)
                           for o in action.option_strings):
                    problems.append(f"netwatch {name}: {'/'.join(action.option_strings)} is not in its row")
            elif action.dest.upper() not in usage.split():
                problems.append(f"netwatch {name}: its argument {action.dest.upper()} is not in its usage")
        for option in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage):
            if option not in known:
                problems.append(f"netwatch {name}: the row names {option}, which the parser does not know")
    assert not problems, "\n".join(problems)


def _accepted_keys() -> dict[str, set[str]]:
    """The keys netwatch/config.py accepts, per table: the tuples it gives ``unknown_keys``."""
    tree = ast.parse((ROOT / "netwatch" / "config.py").read_text())
    keys: dict[str, set[str]] = {}
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef):
            continue
        for call in ast.walk(func):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "unknown_keys" and isinstance(call.args[1], ast.Tuple)):
                keys[func.name] = {elt.value for elt in call.args[1].elts
                                   if isinstance(elt, ast.Constant) and isinstance(elt.value, str)}
    return keys


def test_configuration_page_has_every_key_and_no_other() -> None:
    accepted = _accepted_keys()
    assert {"settings", "vm", "nic", "lower"} <= set(accepted), f"config.py changed shape: {sorted(accepted)}"
    page = (DOCS / "configuration.md").read_text()
    tables = {"settings": "## The [netwatch] table", "vm": "## The [[vm]] tables", "nic": "## The [[vm.nic]] tables"}
    problems = []
    for func, heading in tables.items():
        rows = _table(_section(page, heading))
        documented = {row[0].strip("`") for row in rows}
        code = accepted[func] - {"nic"}  # [[vm.nic]] has its own table
        problems += [f"{heading}: `{key}` is accepted by netwatch but has no row" for key in sorted(code - documented)]
        problems += [f"{heading}: `{key}` has a row but netwatch refuses it" for key in sorted(documented - code)]
    lower = next(row for row in _table(_section(page, tables["nic"])) if row[0] == "`lower`")
    problems += [f"`lower`'s row does not name its key {key}" for key in sorted(accepted["lower"])
                 if not re.search(rf"\b{key} =", lower[2])]
    assert not problems, "\n".join(problems)


# -- the man pages ----------------------------------------------------------------


def test_man_pages_are_generated_from_the_docs() -> None:
    stale = [output for output, text in manpages.rendered().items()
             if not (ROOT / output).exists() or (ROOT / output).read_text() != text]
    assert not stale, f"{stale} differ from what docs/ gives: run python3 tools/manpages.py and commit them"


def test_a_changed_doc_changes_its_man_page() -> None:
    # The check above is worth something only if the pages follow the docs: an edit must show.
    page = manpages.PAGES[0]
    text = (ROOT / page.source).read_text()
    edited = text.replace("move a running NIC to another lower now", "move a running NIC elsewhere")
    assert edited != text
    assert manpages.render(page, edited, "0") != manpages.render(page, text, "0")
    assert "move a running NIC elsewhere" in manpages.render(page, edited, "0")


def test_markdown_the_renderer_does_not_know_is_refused() -> None:
    page = manpages.PAGES[0]
    with pytest.raises(manpages.MarkdownError, match="numbered lists"):
        manpages.render(page, "# T\n\n1. one\n2. two\n", "0")


# The requests the renderer writes; anything else in a page would be a leak of Markdown or text that
# roff takes for a request.
ROFF_REQUESTS = {"TH", "SH", "SS", "PP", "TP", "IP", "RS", "RE", "nf", "fi", "br", "nh"}


@pytest.mark.parametrize("page", manpages.PAGES, ids=lambda page: page.output)
def test_man_page_structure(page: object) -> None:
    assert isinstance(page, manpages.Page)
    text = (ROOT / page.output).read_text()
    lines = text.splitlines()
    assert lines[0].startswith('.\\"'), "the first line says the page is generated"
    assert lines[1].startswith(f".TH {page.name.upper()} {page.section} "), lines[1]
    assert f".SH NAME\n{page.name.replace('-', chr(92) + '-')} \\- " in text
    sections = re.findall(r"^\.SH (.*)", text, re.M)
    assert sections[:3] == ["NAME", "SYNOPSIS", "DESCRIPTION"], sections
    bad = [line for line in lines[1:]
           if (line.startswith(".") and line[1:].split(" ")[0] not in ROFF_REQUESTS) or line.startswith("'")]
    assert not bad, f"lines roff would misread: {bad[:5]}"
    leaks = [line for line in lines if re.search(r"`|\*\*|\]\(", line) and not line.startswith(".")]
    code = re.findall(r"^\.nf\n(.*?)^\.fi", text, re.M | re.S)
    leaks = [line for line in leaks if not any(line in block for block in code)]
    assert not leaks, f"Markdown left in the page: {leaks[:5]}"
    assert text.count(".nf\n") == text.count(".fi\n") and text.count(".RS") == text.count(".RE")


@pytest.mark.allowed_skip("groff is not in a minimal Debian; the roff structure is checked without it above")
@pytest.mark.parametrize("page", manpages.PAGES, ids=lambda page: page.output)
def test_man_page_renders_without_warnings(page: object) -> None:
    assert isinstance(page, manpages.Page)
    if not shutil.which("groff"):
        pytest.skip("groff is not installed (apt-get install groff-base)")
    path = ROOT / page.output
    done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(path)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0 and not done.stderr, f"groff on {page.output}: {done.stderr}"
    if shutil.which("man"):
        shown = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True, timeout=30, check=False,
                               env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "LANG": "C.UTF-8"})
        assert shown.returncode == 0, shown.stderr
        assert re.search(rf"^{re.escape(page.name.upper())}\({page.section}\)", shown.stdout, re.M), shown.stdout[:300]
        assert "SYNOPSIS" in shown.stdout and "DESCRIPTION" in shown.stdout


# -- the service page's install steps -------------------------------------------------


def test_service_install_steps_install_the_man_pages() -> None:
    # tests/test_real_systemd.py runs these same lines in a Debian container: here only what they say.
    commands = readme_service_commands((DOCS / "service.md").read_text())
    assert any(re.search(r"systemctl\b.*\benable --now\b", line) for line in commands), commands
    for page in manpages.PAGES:
        line = f"install -Dm644 {page.output} /usr/local/share/man/man{page.section}/{Path(page.output).name}"
        assert line in commands, f"docs/service.md's install steps do not install {page.output}"
        assert commands.index(line) < len(commands) - 1, "the man pages go in before the unit starts"
