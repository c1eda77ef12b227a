"""``reports/index.html``: the whole report in one self-contained file.

Figures are embedded as base64 SVG data URIs and the style sheet is inline, so the file opens
anywhere, offline, with no JavaScript. The only links out are to the MLflow UI: every measured
row links to its run (``<MLFLOW_UI_URL>/#/experiments/<id>/runs/<run id>``).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from pathlib import Path

from pipeline.report.collect import Study
from pipeline.report.plots import Figure
from pipeline.report.table import Column, Table, counting

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1240px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; }
h3 { margin-top: 24px; font-size: 16px; }
nav ul { columns: 2; padding-left: 18px; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 12.5px; }
caption { caption-side: bottom; text-align: left; color: #555; padding-top: 6px; max-width: 1100px; }
th, td { border: 1px solid #d6d6d6; padding: 3px 7px; vertical-align: top; }
th { background: #f2f4f7; text-align: left; }
td.text { min-width: 9em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.missing td, tr.paper td { color: #666; } tr.paper td { background: #fafafa; }
tr.missing td { font-style: italic; }
figure { margin: 16px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; max-width: 1100px; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; }
code { font-size: 12px; }
"""


def _cell(table: Table, row: dict, col: Column) -> str:
    plain = table.cell(row, col)
    text = escape(plain)
    url = row.get(col.link) if col.link else None
    if url and plain != "—":
        text = f'<a href="{escape(url, quote=True)}">{text}</a>'
    # Long text gets a minimum width, so narrow columns do not wrap it one word per line.
    cls = ' class="num"' if col.kind in ("float", "int") else ' class="text"' if len(plain) > 24 else ""
    return f"<td{cls}>{text}</td>"


def table_html(table: Table) -> str:
    """One ``<table>``: header, a row per dict (``data-<row_key>`` on each), caption below."""
    cols = table.shown
    out = [f'<div class="wide"><table id="table-{table.name}" data-table="{table.name}">']
    out.append(f"<caption>{escape(table.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{escape(c.header)}</th>" for c in cols) + "</tr></thead><tbody>")
    for row in table.rows:
        attrs = []
        kind = row.get("status") or row.get("source")
        if kind:
            attrs.append(f'class="{escape(str(kind))}"')
        if table.row_key and row.get(table.row_key) is not None:
            attrs.append(f'data-{table.row_key}="{escape(str(row[table.row_key]), quote=True)}"')
        tr = "<tr" + "".join(f" {a}" for a in attrs) + ">"
        out.append(tr + "".join(_cell(table, row, c) for c in cols) + "</tr>")
    if not table.rows:
        out.append(f'<tr class="missing"><td colspan="{len(cols)}">no rows</td></tr>')
    out.append("</tbody></table></div>")
    return "\n".join(out)


def figure_html(figure: Figure, out: Path) -> str:
    """An ``<img>`` holding the figure's SVG as a data URI, with its caption."""
    data = base64.b64encode((out / f"{figure.name}.svg").read_bytes()).decode("ascii")
    return (
        f'<figure id="figure-{figure.name}"><img src="data:image/svg+xml;base64,{data}" '
        f'alt="{escape(figure.title, quote=True)}">'
        f"<figcaption><b>{escape(figure.title)}.</b> {escape(figure.caption)} "
        f"(<code>{figure.name}.png</code>, <code>{figure.name}.svg</code>)</figcaption></figure>"
    )


def provenance_table(study: Study) -> Table:
    """Which results file, run, commit and params hash every row of the report comes from."""
    table = Table(
        "provenance",
        "Where every number comes from",
        "Each variant's results file (a DVC output of its train stage) names the MLflow run its numbers "
        "are read from; the run records the git commit and the hash of the resolved params and data "
        "manifest it trained with.",
        [
            Column("variant", "Variant"),
            Column("results_file", "Results file"),
            Column("status", "Status"),
            Column("run_id", "MLflow run", link="run_url"),
            Column("git_commit", "Git commit"),
            Column("params_hash", "Params hash"),
            Column("counting", "Counting"),
        ],
        row_key="variant",
    )
    for v in study.variants:
        m = v.measured
        row = {"variant": v.variant, "results_file": f"results/{v.results_file.name}", "status": "missing"}
        if m is not None:
            row.update(
                status=m.status,
                run_id=m.run_id,
                run_url=m.url,
                git_commit=m.tags.get("git_commit", "")[:12],
                params_hash=m.tags.get("params_hash"),
                counting=counting(m.img_size),
            )
        table.rows.append(row)
    for dvt in study.dvt:
        row = {
            "variant": f"DVT tuning ({dvt.variant})",
            "results_file": f"results/dvt/{dvt.variant}/best.yaml",
            "status": dvt.status,
        }
        if dvt.record is not None:
            row.update(run_id=dvt.run_id, run_url=dvt.url, counting=counting(dvt.record.img_size))
        table.rows.append(row)
    return table


def render(study: Study, tables: Sequence[Table], figures: Sequence[Figure], out: Path) -> str:
    """The report page (figures read from ``out``)."""
    t = {table.name: table for table in tables}
    f = {figure.name: figure for figure in figures}
    measured = len(study.measured)
    missing = [v.variant for v in study.variants if v.measured is None]
    ui = escape(study.ui_base, quote=True)
    sections = [
        (
            "t2t-vs-vit",
            "T2T-ViT against ViT",
            [
                t["comparison"],
                *([t["published"]] if "published" in t else []),  # evaluated published checkpoints
                t["paper_t2t_vs_vit"],
                f["accuracy_vs_macs"],
                f["accuracy_vs_params"],
            ],
        ),
        ("cnn-to-vit", "From CNN to ViT", [t["cnn_to_vit"]]),
        (
            "dvt",
            "DVT: dynamic tokens under a budget",
            [
                t["dvt_budgets"],
                f["dvt_vs_static"],
                t["dvt_speed"],
                f["dvt_exits"],
                t["dvt_reuse"],
            ],
        ),
        ("training", "Training curves", [f["training_curves"]]),
        ("provenance", "Provenance and counting", [provenance_table(study)]),
    ]
    body = [
        "<header><h1>T2T-ViT vs ViT vs DVT: the study's report</h1>",
        f"<p>{measured} of {len(study.variants)} variants of the current params measured"
        + (f"; missing (train stage not run): {escape(', '.join(missing))}" if missing else "")
        + f". MLflow experiment <code>{escape(study.experiment or '—')}</code>; run links open the MLflow UI "
        f'at <a href="{ui}">{ui}</a> (<code>./run ui</code>; set <code>MLFLOW_UI_URL</code> for another '
        "server).</p>",
        "<p>Each training's final model is in MLflow's model registry under its variant's name, the best "
        "run's version aliased <code>@best</code>: <code>mlflow.pytorch.load_model(\"models:/&lt;variant&gt;"
        '@best")</code> loads it. '
        + ", ".join(
            f'<a href="{ui}/#/models/{escape(v.variant, quote=True)}">{escape(v.variant)}</a>'
            for v in study.variants
            if v.measured is not None
        )
        + ".</p>",
        "<p>Counting conventions, on every measured row: parameters are all tensors (frozen position tables "
        "and Performer features included); MACs are all matrix multiplications (every linear layer, both "
        "attention products) at the training resolution. The papers' numbers are ImageNet-1k at 224 px "
        "unless noted.</p>",
    ]
    for dvt in study.dvt:
        if dvt.status != "ok":
            note = f"DVT {dvt.variant} {dvt.status}: {dvt.note}"
            body.append(f'<p class="note">{escape(note)}</p>')
    body.append("</header><nav><ul>")
    body += [f'<li><a href="#{sid}">{escape(title)}</a></li>' for sid, title, _ in sections]
    body.append("</ul></nav>")
    for sid, title, items in sections:
        body.append(f'<section id="{sid}"><h2>{escape(title)}</h2>')
        for item in items:
            if isinstance(item, Table):
                body.append(f"<h3>{escape(item.title)}</h3>")
                body.append(table_html(item))
            else:
                body.append(figure_html(item, out))
        body.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>T2T-ViT vs ViT vs DVT: study report</title>"
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_html(study: Study, tables: Sequence[Table], figures: Sequence[Figure], out: Path) -> Path:
    path = out / "index.html"
    path.write_text(render(study, tables, figures, out), encoding="utf-8")
    return path
