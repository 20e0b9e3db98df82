"""Plain-text tables for the command line."""

from __future__ import annotations


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """Columns sized to their widest cell; the first column left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in col) for col in zip(head, *rows)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
