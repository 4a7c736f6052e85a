"""How the CLI's tables look: readable in an 80-column terminal, the usual width of one."""

from __future__ import annotations

import re
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from model.wording import MISSING, figure

__all__ = ["MISSING", "FoldedCode", "compact_table", "figure", "folded_header", "print_note", "print_titled"]

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


def fold_at_separators(text: str, width: int, separators: str = "_@-") -> list[str]:
    """``text`` on lines of at most ``width`` characters, broken only after one of ``separators`` (a piece longer
    than that keeps its own line)."""
    lines: list[str] = []
    marks = re.escape(separators)
    for piece in re.findall(rf"[^{marks}]+[{marks}]?|[{marks}]", text):
        if lines and len(lines[-1]) + len(piece) <= width:
            lines[-1] += piece
        else:
            lines.append(piece)
    return lines


def folded_header(name: str, width: int = 10) -> Text:
    """``name`` as a column header on lines of at most ``width`` characters where it can be broken after ``_``,
    ``-`` or ``@`` (a piece longer than that keeps its own line), so a long name narrows its column instead of
    the numbers under it being broken."""
    return Text("\n".join(fold_at_separators(name, width)))


#: Where an error code (``connector/code``) may be broken over lines.
_CODE_SEPARATORS = "/_-.:"


class FoldedCode:
    """A ``connector/code`` cell that a narrow column breaks after ``/``, ``_``, ``-``, ``.`` or ``:``
    ("razorpay/payment_" over "failed"), not wherever its width falls ("razorpay/payment_faile" over "d"); only a
    piece wider than the column itself is cut within."""

    def __init__(self, code: str, style: str = "") -> None:
        self.code = code
        self.style = style

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        pieces = fold_at_separators(self.code, 1, _CODE_SEPARATORS)
        return Measurement(max(map(cell_len, pieces)), cell_len(self.code)).clamp(max_width=options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = fold_at_separators(self.code, options.max_width, _CODE_SEPARATORS)
        yield Text("\n".join(lines), style=self.style, overflow="fold")


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
