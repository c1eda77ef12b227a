"""The study's report: the current DVC outputs and their MLflow runs -> tables, figures and one HTML page.

Rows come only from ``results/<variant>.json`` of the variants in the current params, each naming
its MLflow run, and from ``results/dvt/<cascade>/`` (the tune_dvt stages); stale or unrelated runs
in the same store never appear (:mod:`pipeline.report.collect`). Numbers are read back from MLflow, the record
of truth, not from the results files.

Written under the output folder (``reports/``), all described in docs/report.md:

* tables (:mod:`~pipeline.report.tables`), each as ``.md``, ``.csv`` and ``.parquet``:
  ``comparison`` (T2T-ViT against ViT, one row per variant, the paper beside it),
  ``paper_t2t_vs_vit``, ``cnn_to_vit``, ``dvt_budgets``, ``dvt_speed``, ``dvt_reuse``;
* figures (:mod:`~pipeline.report.plots`), each as ``.png`` and ``.svg``: ``accuracy_vs_macs``,
  ``accuracy_vs_params``, ``dvt_vs_static`` (with the evaluated DVT checkpoints' curves,
  :mod:`~pipeline.report.published`), ``dvt_exits``, ``training_curves``;
* ``curves/<variant>.csv``: per-epoch metrics of each run (for ``dvc plots``);
* ``metrics.json`` (for ``dvc metrics`` / ``dvc exp show``);
* ``index.html`` (:mod:`~pipeline.report.html`): all of it in one self-contained page.

Counting conventions, stated on every measured row: parameters are all tensors (frozen ones
included); MACs are all matrix multiplications (linear layers and both attention products) at the
training resolution, counted by tracing the forward pass with torch's FlopCounterMode.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from pipeline.report.collect import Epoch, ReportError, Study, collect, ui_base
from pipeline.report.html import write_html
from pipeline.report.plots import FIGURES, write_figures
from pipeline.report.published import add_to_comparison, dvt_figure, published_table, read_published
from pipeline.report.table import Table, write_table
from pipeline.report.tables import build_tables, metrics_json

__all__ = ["FIGURES", "ReportError", "Study", "Table", "build_report", "collect", "ui_base"]

log = logging.getLogger(__name__)

#: Per-epoch columns of ``curves/<variant>.csv``.
CURVE_COLUMNS = ("val_top1", "val_top5", "val_loss", "train_loss")


def write_curves(study: Study, folder: Path) -> None:
    """``<variant>.csv`` per measured variant: epoch (1-based) and its per-epoch metrics."""
    shutil.rmtree(folder, ignore_errors=True)  # no file of a variant that left the params
    folder.mkdir(parents=True)
    for variant, m in study.measured:
        epochs = sorted({step for key in CURVE_COLUMNS for step, _ in m.history.get(key, [])})
        values = {key: dict(m.history.get(key, [])) for key in CURVE_COLUMNS}
        with open(folder / f"{variant}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["epoch", *CURVE_COLUMNS])
            for step in epochs:
                writer.writerow([step + 1, *(values[k].get(step, "") for k in CURVE_COLUMNS)])


def build_report(
    results_dir: Path,
    variants: Sequence[str],
    tracking_uri: str,
    out: Path,
    *,
    cascades: Sequence[str] = (),
    ui_url: str | None = None,
    epoch: Epoch = "last",
) -> Study:
    """Collect the current study and write every table, figure and the HTML page under ``out``.

    Args:
        results_dir: The ``results/`` folder (train stages' ``<variant>.json``, tune_dvt's ``dvt/``).
        variants: The variants of the current params, in order.
        cascades: The tuned cascades (``dvt.variants``), in order.
        tracking_uri: The MLflow store.
        out: Output folder (``reports/``), created if needed.
        ui_url: MLflow UI address for the run links (default: ``MLFLOW_UI_URL`` or
            ``http://127.0.0.1:5000``).
        epoch: ``report.epoch``: the tables show each training's last epoch (the default) or its
            best validation epoch (picked on the data it is reported on).

    Returns:
        What was read.

    Raises:
        ReportError: A results file names an MLflow run the store does not have.
    """
    study = collect(results_dir, variants, tracking_uri, cascades=cascades, base=ui_url, epoch=epoch)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(study)
    # The evaluate stages' checkpoints (results/pretrained/*.json): a column group of comparison,
    # their own table and, for DVT files, their curves in dvt_vs_static (pipeline/report/published.py).
    published = read_published(results_dir, tracking_uri, study.ui_base)
    for table in tables:
        add_to_comparison(table, study, published)
    if published:
        tables.append(published_table(published))
    for table in tables:
        write_table(table, out)
    (out / "metrics.json").write_text(json.dumps(metrics_json(study, tables), indent=2) + "\n")
    write_curves(study, out / "curves")
    figures = list(FIGURES)
    if (dvt := dvt_figure(published)) is not None:  # the DVT checkpoints' curves join dvt_vs_static
        figures = [dvt if f.name == dvt.name else f for f in figures]
    figures = write_figures(study, out, figures)
    page = write_html(study, tables, figures, out)
    log.info(
        "report: %d of %d variants measured, %d of %d DVT cascades tuned -> %s",
        len(study.measured),
        len(study.variants),
        len(study.tuned),
        len(study.dvt),
        page.resolve(),
    )
    return study
