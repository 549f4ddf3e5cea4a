"""Text for a terminal: every line the commands print fits TEXT_WIDTH columns (tables too wide for it
continue in blocks below, long lines wrap, indented). No heavy imports: `rs5m report` and `rs5m status`
answer in about a second."""

from __future__ import annotations

import textwrap

TEXT_WIDTH = 100


def wrapped(text: str, width: int = TEXT_WIDTH) -> list[str]:
    """`text` as lines of at most `width` characters; continuation lines indented 4 more than the first."""
    if len(text) <= width:
        return [text]
    indent = " " * (len(text) - len(text.lstrip(" ")) + 4)
    return textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False) or [text[:width]]


def table(rows: list[list[str]], width: int = TEXT_WIDTH, indent: str = "", left: int = 1) -> list[str]:
    """Rows (the header first) aligned: the first `left` columns to the left, the others (numbers) to the
    right. The columns that do not fit `width` continue in further blocks below, each repeating the first
    column."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    blocks: list[list[int]] = [[]]
    used = len(indent) + widths[0]
    for column in range(1, len(widths)):
        if blocks[-1] and used + 2 + widths[column] > width:
            blocks.append([])
            used = len(indent) + widths[0]
        blocks[-1].append(column)
        used += 2 + widths[column]
    lines: list[str] = []
    for number, block in enumerate(blocks):
        if number:
            lines.append("")
        for row in rows:
            cells = [row[0].ljust(widths[0]) if block else row[0]]
            cells += [row[i].ljust(widths[i]) if i < left else row[i].rjust(widths[i]) for i in block]
            lines.append((indent + "  ".join(cells)).rstrip())
    return lines
