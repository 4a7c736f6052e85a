"""How the CLI's tables look: readable in an 80-column terminal, the usual width of one."""

from __future__ import annotations

import re
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from model.wording import MISSING, figure

__all__ = ["MISSING", "compact_table", "figure", "folded_header", "print_note", "print_titled"]

#: A rule under the header, two spaces between columns, none at the edges: at 80 columns every space counts.
_COMPACT: dict[str, Any] = {
    "box": box.SIMPLE_HEAD,
    "show_edge": False,
    "pad_edge": False,
    "padding": (0, 0, 0, 1),
    "title_justify": "left",
}


def compact_table(title: str, **options: Any) -> Table:
    """A rich table in the compact style; ``options`` as ``rich.table.Table`` takes them."""
    return Table(title=title, **(_COMPACT | options))


def folded_header(name: str, width: int = 10) -> Text:
    """``name`` as a column header on lines of at most ``width`` characters where it can be broken after ``_``,
    ``-`` or ``@`` (a piece longer than that keeps its own line), so a long name narrows its column instead of
    the numbers under it being broken."""
    lines: list[str] = []
    for piece in re.findall(r"[^_@-]+[_@-]?|[_@-]", name):
        if lines and len(lines[-1]) + len(piece) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    return Text("\n".join(lines))


def print_titled(console: Console, title: str, table: Table) -> None:
    """``table`` (made without a title) under ``title`` on a line of its own: as a table's title it was wrapped to
    the table's width, so a path in it ("all of it in evaluation/evaluation.md") broke over lines at any width."""
    console.print(Text(title, style="table.title"), soft_wrap=True)
    console.print(table)


def print_note(console: Console, text: str, label: str | None = None, style: str = "") -> None:
    """A paragraph of prose (a note, a warning, a verdict) in ``style``, after ``label`` in yellow, wrapped at words
    to the console's width. Printed as one line (``soft_wrap``), an 80-column terminal broke it in the middle of
    words. ``text`` is shown as it is, never read as markup."""
    console.print(Text.assemble((f"{label} " if label else "", "yellow"), (text, style)), highlight=False)
