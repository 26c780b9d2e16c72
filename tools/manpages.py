#!/usr/bin/env python3
"""Render netwatch's man pages from its docs, so the two cannot drift.

    python3 tools/manpages.py          # write man/netwatch.8 and man/netwatch.toml.5
    python3 tools/manpages.py --check  # exit 1 if the committed pages differ from what the docs give

The single source of truth is the Markdown an admin reads: docs/commands.md
for netwatch(8) and docs/configuration.md for netwatch.toml(5). The prose
(what a rebind does, what each key means, its default) exists only there;
rendering it from argparse's help strings or a table in the code would
leave the docs a second copy to drift. What the code knows is checked
against those pages instead (tests/test_docs.py): every subcommand and
option of netwatch/cli.py's parser has its row in docs/commands.md, and
every key netwatch/config.py accepts has its row in docs/configuration.md,
and no row names a key the code refuses.

Only the Markdown these two pages use is understood: headings (## and ###),
paragraphs, ``*`` bullet lists, pipe tables, fenced and indented code
blocks, `code`, **bold**, *emphasis*, [links](target) (their text is kept)
and one-line HTML comments (left out). Anything else (a numbered list, a
quote) is an error, so a page cannot grow a construct that would render
wrongly. The output is plain man(7) roff, with no preprocessor (tables
become .TP lists): ``man -l man/netwatch.8`` reads it.
"""

from __future__ import annotations

import re
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 78


@dataclass(frozen=True)
class Page:
    source: str  # relative to ROOT
    output: str
    name: str
    section: int
    summary: str
    manual: str
    synopsis_table: str | None  # the section whose table's first column is the synopsis
    synopsis: tuple[str, ...] = ()


PAGES = (
    Page("docs/commands.md", "man/netwatch.8", "netwatch", 8,
         "keep running QEMU VMs' NICs attached to their host links", "System Administration", "Commands"),
    Page("docs/configuration.md", "man/netwatch.toml.5", "netwatch.toml", 5,
         "netwatch's configuration file", "File Formats", None, ("/etc/netwatch/netwatch.toml",)),
)


class MarkdownError(Exception):
    """The page uses Markdown this renderer does not know."""


@dataclass(frozen=True)
class Block:
    kind: str  # heading2, heading3, para, bullets, table, code
    lines: tuple[str, ...]


def parse(text: str, source: str) -> tuple[str, list[Block]]:
    """The page's title and its blocks."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise MarkdownError(f"{source}: the first line must be the page's '# title'")
    title = lines[0][2:].strip()
    blocks: list[Block] = []
    i = 1
    while i < len(lines):
        line = lines[i]
        where = f"{source}:{i + 1}"
        if not line.strip():
            i += 1
        elif line.startswith("<!--"):
            if not line.rstrip().endswith("-->"):
                raise MarkdownError(f"{where}: an HTML comment must end on its own line")
            i += 1
        elif line.startswith("### "):
            blocks.append(Block("heading3", (line[4:].strip(),)))
            i += 1
        elif line.startswith("## "):
            blocks.append(Block("heading2", (line[3:].strip(),)))
            i += 1
        elif line.startswith("#"):
            raise MarkdownError(f"{where}: only '##' and '###' headings below the title")
        elif line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                raise MarkdownError(f"{where}: a code block that never ends")
            blocks.append(Block("code", tuple(lines[i + 1:end])))
            i = end + 1
        elif line.startswith("    "):
            j = i
            code: list[str] = []
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                code.append(lines[j][4:])
                j += 1
            while code and not code[-1].strip():
                code.pop()
            blocks.append(Block("code", tuple(code)))
            i = j
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            blocks.append(Block("table", tuple(lines[i:j])))
            i = j
        elif line.startswith("* "):
            items: list[str] = []
            j = i
            while j < len(lines) and lines[j].strip():
                if lines[j].startswith("* "):
                    items.append(lines[j][2:])
                elif lines[j].startswith("  ") and items:
                    items[-1] += " " + lines[j].strip()
                else:
                    raise MarkdownError(f"{source}:{j + 1}: a list item's lines go on indented by two spaces")
                j += 1
            blocks.append(Block("bullets", tuple(items)))
            i = j
        elif re.match(r"\d+\. |> |<", line):
            raise MarkdownError(f"{where}: numbered lists, quotes and HTML are not rendered; use '*' or prose")
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not re.match(r"#|```|\||\* |    |<!--", lines[j]):
                j += 1
            blocks.append(Block("para", tuple(line.strip() for line in lines[i:j])))
            i = j
    return title, blocks


def _escape(text: str, literal: bool) -> str:
    text = text.replace("\\", "\\e")
    # In a literal, '-' is the ASCII minus a reader types; man(7) wants it as \-.
    return text.replace("-", "\\-") if literal else text


_LINK = re.compile(r"\[((?:[^\]`]|`[^`]*`)*)\]\([^)\s]*\)")
_EMPHASIS = re.compile(r"\*\*(.+?)\*\*|\*([^*\s](?:[^*]*[^*\s])?)\*")


def inline(text: str) -> str:
    """Markdown inline markup as roff font escapes; a link keeps only its text."""
    text = _LINK.sub(r"\1", text)
    out: list[str] = []
    for k, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if k % 2:
            out.append("\\fB" + _escape(part[1:-1].replace("\\|", "|"), literal=True) + "\\fR")
            continue
        if "`" in part:
            raise MarkdownError(f"an unclosed ` in: {text}")
        part = _escape(part, literal=False)
        out.append(_EMPHASIS.sub(lambda m: ("\\fB" + m.group(1) if m.group(1) else "\\fI" + m.group(2)) + "\\fR",
                                 part))
    return "".join(out)


def _text_lines(text: str) -> list[str]:
    """Filled text as roff input lines: wrapped for a reader of the source, none starting like a request."""
    wrapped = textwrap.wrap(text, WIDTH, break_long_words=False, break_on_hyphens=False)
    return ["\\&" + line if line[:1] in (".", "'") else line for line in wrapped]


def _cells(row: str) -> list[str]:
    # Split at '|' not escaped as '\|' (which a cell such as "[--json \| --libvirt]" holds).
    inner = row.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", inner)]


def table_rows(block: Block) -> tuple[list[str], list[list[str]]]:
    header = _cells(block.lines[0])
    if len(block.lines) < 2 or not re.fullmatch(r"\|?(\s*:?-+:?\s*\|)*\s*:?-+:?\s*\|?", block.lines[1].strip()):
        raise MarkdownError(f"a table needs a header and a separator row: {block.lines[0]}")
    rows = [_cells(line) for line in block.lines[2:]]
    for row in rows:
        if len(row) != len(header):
            raise MarkdownError(f"a table row has {len(row)} cells, its header {len(header)}: {row}")
    return header, rows


def _code_lines(lines: tuple[str, ...]) -> list[str]:
    out = []
    for line in lines:
        line = _escape(line, literal=True)
        out.append("\\&" + line if line[:1] in (".", "'") else line)
    return out


def render(page: Page, text: str, version: str) -> str:
    _title, blocks = parse(text, page.source)
    out = [
        f'.\\" Generated by tools/manpages.py from {page.source}: edit that, then run python3 tools/manpages.py.',
        f'.TH {page.name.upper()} {page.section} "" "netwatch {version}" "{page.manual}"',
        ".nh",  # no hyphenation: names and options must not be cut
        ".SH NAME",
        f"{_escape(page.name, literal=True)} \\- {_escape(page.summary, literal=False)}",
        ".SH SYNOPSIS",
    ]
    synopsis = list(page.synopsis)
    if page.synopsis_table is not None:
        synopsis += [re.sub(r"^`|`$", "", row[0]).replace("\\|", "|") for row in _synopsis_rows(page, blocks)]
    for k, line in enumerate(synopsis):
        if k:
            out.append(".br")
        words = line.split(" ", 2)
        command = " ".join(words[:2]) if page.synopsis_table is not None else line
        rest = line[len(command):]
        out.append(f"\\fB{_escape(command, literal=True)}\\fR{_escape(rest, literal=True)}")
    # The page's opening paragraphs are the description.
    out.append(".SH DESCRIPTION")
    for block in blocks:
        if block.kind == "heading2":
            out.append(".SH " + _heading(block.lines[0]).upper())
        elif block.kind == "heading3":
            out.append(".SS " + _heading(block.lines[0]))
        elif block.kind == "para":
            out.append(".PP")
            out += _text_lines(inline(" ".join(block.lines)))
        elif block.kind == "bullets":
            for item in block.lines:
                out.append(".IP \\(bu 2")
                out += _text_lines(inline(item))
        elif block.kind == "code":
            out += [".PP", ".RS 4", ".nf", *_code_lines(block.lines), ".fi", ".RE"]
        elif block.kind == "table":
            header, rows = table_rows(block)
            for row in rows:
                out += [".TP", *_text_lines(inline(row[0]))]
                body = [inline(row[-1])]
                # Columns between the first and the last (a key's default, who reads a variable) go
                # after the description, named by their header.
                body += [f"{inline(name).capitalize()}: {inline(cell)}." for name, cell in zip(header[1:-1], row[1:-1],
                                                                                            strict=True)]
                for k, part in enumerate(body):
                    if k:
                        out.append(".br")
                    out += _text_lines(part)
    return "\n".join(out) + "\n"


def _heading(text: str) -> str:
    # Headings go as they are (a roff request takes its line whole), without Markdown's code marks.
    return _escape(_LINK.sub(r"\1", text).replace("`", ""), literal=False)


def _synopsis_rows(page: Page, blocks: list[Block]) -> list[list[str]]:
    inside = False
    for block in blocks:
        if block.kind == "heading2":
            inside = block.lines[0] == page.synopsis_table
        elif inside and block.kind == "table":
            return table_rows(block)[1]
    raise MarkdownError(f"{page.source}: no table under '## {page.synopsis_table}' to take the synopsis from")


def version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def rendered() -> dict[str, str]:
    """Each man page (path relative to ROOT) as the docs give it now."""
    ver = version()
    return {page.output: render(page, (ROOT / page.source).read_text(), ver) for page in PAGES}


def main(argv: list[str]) -> int:
    check = argv[1:] == ["--check"]
    if argv[1:] and not check:
        print(f"usage: {argv[0]} [--check]", file=sys.stderr)
        return 2
    try:
        pages = rendered()
    except MarkdownError as exc:
        print(f"manpages: {exc}", file=sys.stderr)
        return 2
    stale = []
    for output, text in pages.items():
        path = ROOT / output
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(output)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if check and stale:
        print(f"manpages: {', '.join(stale)} differ from the docs: run python3 tools/manpages.py", file=sys.stderr)
        return 1
    for output in stale:
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
