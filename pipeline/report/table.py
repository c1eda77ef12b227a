"""A report table: typed columns, one dict per row, written as Markdown, CSV and parquet.

CSV and parquet carry every column as plain values (empty / null where there is none); Markdown and
HTML show the readable subset, with a row's ``_display`` overrides (such as ``n/a (demo-scale)``)
in place of a missing number.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


def counting(img_size: int | None) -> str:
    """The counting convention of a measured row, stated on the row itself."""
    at = f"{img_size} px" if img_size else "the training resolution"
    return f"params: all tensors; MACs: all-matmul at {at}"


@dataclass(frozen=True)
class Column:
    """One column: its key in the row dicts, header, type and how Markdown/HTML show it."""

    key: str
    header: str
    kind: Literal["str", "float", "int", "bool"] = "str"
    digits: int = 2
    show: bool = True
    """Shown in Markdown and HTML (CSV and parquet always hold every column)."""
    link: str | None = None
    """Key of a URL column the cell links to."""
    width: int | None = None
    """Show only the first ``width`` characters (run ids); files keep the whole value."""


@dataclass
class Table:
    """A titled table; ``rows`` are dicts keyed by column key (plus optional ``_display``)."""

    name: str
    """File stem under reports/ (``<name>.md``, ``.csv``, ``.parquet``)."""
    title: str
    caption: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    row_key: str | None = None
    """Column whose value marks each HTML row (``data-<row_key>``), so a row can be found."""

    def cell(self, row: dict[str, Any], col: Column) -> str:
        """The text of one cell as Markdown and HTML show it."""
        shown = row.get("_display", {}).get(col.key)
        if shown is not None:
            return shown
        text = format_value(row.get(col.key), col)
        return text[: col.width] if col.width else text

    @property
    def shown(self) -> list[Column]:
        return [c for c in self.columns if c.show]


def format_value(value: Any, col: Column) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if col.kind == "float":
        return f"{value:.{col.digits}f}" if math.isfinite(value) else str(value)
    if col.kind == "bool":
        return "yes" if value else "no"
    return str(value)


def _plain(value: Any) -> Any:
    return "" if value is None else value


def write_csv(table: Table, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([c.key for c in table.columns])
        for row in table.rows:
            writer.writerow([_plain(row.get(c.key)) for c in table.columns])


def write_parquet(table: Table, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"str": pa.string(), "float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}
    schema = pa.schema(
        [pa.field(c.key, types[c.kind], metadata={"header": c.header}) for c in table.columns],
        metadata={"title": table.title, "caption": table.caption},
    )
    data = pa.Table.from_pylist(
        [{c.key: row.get(c.key) for c in table.columns} for row in table.rows], schema
    )
    pq.write_table(data, path)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(table: Table, level: int = 2) -> str:
    """The table as a Markdown section: heading, caption, then a pipe table (links kept)."""
    cols = table.shown
    lines = [f"{'#' * level} {table.title}", "", table.caption, ""]
    lines.append("| " + " | ".join(c.header for c in cols) + " |")
    lines.append("|" + "|".join("---:" if c.kind in ("float", "int") else "---" for c in cols) + "|")
    for row in table.rows:
        cells = []
        for c in cols:
            text = _md_escape(table.cell(row, c))
            url = row.get(c.link) if c.link else None
            cells.append(f"[{text}]({url})" if url and text != "—" else text)
        lines.append("| " + " | ".join(cells) + " |")
    if not table.rows:
        lines.append("| " + " | ".join("—" for _ in cols) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: Table, out: Path) -> None:
    """``<name>.md``, ``<name>.csv`` and ``<name>.parquet`` under ``out``."""
    (out / f"{table.name}.md").write_text(markdown(table, level=1))
    write_csv(table, out / f"{table.name}.csv")
    write_parquet(table, out / f"{table.name}.parquet")
