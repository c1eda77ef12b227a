"""The published checkpoints in the report: evaluated here, beside the paper and beside our trainings.

Reads ``results/pretrained/<name>.json`` (the ``evaluate`` stages, docs/models.md) and their MLflow
runs, and adds:

* to ``comparison``, a column group "published checkpoint, evaluated here" between the trained-here
  and the paper columns: the checkpoint's top-1 on this study's images and its difference to the
  paper in points, linked to its MLflow run (a row joins an entry of the same model and input size);
* the table ``published``: every entry, its top-1/top-5, the paper's top-1 and the difference, its
  file's sha256 and its run;
* to the figure ``dvt_vs_static``, for each DVT checkpoint: the accuracy-versus-cost curve this study's
  threshold code traces on the evaluated images, the curve the authors stored in the file
  (``budgeted_batch_classification``) and their exits' top-1 (``anytime_classification``), on the
  panel of the tuned cascade of the same model and input size or on a panel of its own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.report.collect import DVTResult, Study, run_url
from pipeline.report.plots import FIGURES, Figure, dvt_panel
from pipeline.report.table import Column, Table

log = logging.getLogger(__name__)

#: The comparison table's column group, inserted before its paper columns.
COMPARISON_COLUMNS = [
    Column("published_top1", "Published checkpoint, evaluated here: top-1 (%)", "float", 2),
    Column("published_vs_paper", "Published checkpoint: Δ to paper (points)", "float", 2),
    Column("published_run_id", "Published checkpoint: MLflow run", link="published_run_url", width=8),
    Column("published_run_url", "Published checkpoint: MLflow run URL", show=False),
    Column("published_entry", "Published checkpoint: pretrained entry", show=False),
]


@dataclass(frozen=True)
class Published:
    """One ``results/pretrained/<name>.json`` with its MLflow run's page."""

    name: str
    record: dict[str, Any]
    url: str
    paper_top1: float | None

    @property
    def vs_paper(self) -> float | None:
        return None if self.paper_top1 is None else self.record["top1"] - self.paper_top1


def _paper_top1(model: str, img_size: int) -> float | None:
    from pipeline.models.paper import PAPER
    from pipeline.report.paper import paper_key_for

    key = paper_key_for(model, img_size)
    if key is None or key not in PAPER or PAPER[key]["img_size"] != img_size:
        return None  # a DVT cascade (a curve, no single number) or no row at this input size
    return PAPER[key]["top1"]


def read_published(
    results_dir: Path, tracking_uri: str, base: str, names: list[str] | None = None
) -> list[Published]:
    """The evaluated checkpoints under ``results_dir/pretrained`` (only ``names`` when given)."""
    from mlflow.tracking import MlflowClient

    folder = results_dir / "pretrained"
    files = sorted(folder.glob("*.json")) if names is None else [folder / f"{n}.json" for n in names]
    client = MlflowClient(tracking_uri)
    out = []
    for path in files:
        if not path.is_file():
            log.warning("report: %s is missing (run its evaluate stage)", path)
            continue
        record = json.loads(path.read_text())
        experiment = client.get_run(record["run_id"]).info.experiment_id
        out.append(
            Published(
                record["name"],
                record,
                run_url(base, experiment, record["run_id"]),
                _paper_top1(record["model"], int(record["img_size"])),
            )
        )
    return out


def add_to_comparison(table: Table, study: Study, published: list[Published]) -> None:
    """Insert the published-checkpoint columns before the paper columns; fill the rows they match."""
    if not published or table.name != "comparison":
        return
    at = next((i for i, c in enumerate(table.columns) if c.key.startswith("paper_")), len(table.columns))
    table.columns[at:at] = COMPARISON_COLUMNS
    by_key = {(p.record["model"], int(p.record["img_size"])): p for p in published}
    for row in table.rows:
        p = by_key.get((row.get("model"), row.get("img_size")))
        if p is None:
            continue
        row.update(
            published_top1=p.record["top1"],
            published_vs_paper=p.vs_paper,
            published_run_id=p.record["run_id"],
            published_run_url=p.url,
            published_entry=p.name,
        )
        if row.get("_display"):
            row["_display"] = {k: v for k, v in row["_display"].items() if not k.startswith("published_")}


def published_table(published: list[Published]) -> Table:
    """Every evaluated checkpoint: what it scores here, what the paper prints, the file it was."""
    cols = [
        Column("name", "Entry"),
        Column("model", "Model"),
        Column("img_size", "Input (px)", "int"),
        Column("crop_pct", "Crop", "float", 3),
        Column("images", "Images", "int"),
        Column("top1", "Top-1 here (%)", "float", 2),
        Column("top5", "Top-5 here (%)", "float", 2),
        Column("paper_top1", "Paper top-1 (%)", "float", 1),
        Column("vs_paper", "Δ to paper (points)", "float", 2),
        Column("exits_top1", "Exits' top-1 (%)"),
        Column("images_per_s", "Eval images/s", "float", 1),
        Column("checkpoint_sha256", "File sha256", width=12),
        Column("run_id", "MLflow run", link="run_url", width=8),
        Column("run_url", "MLflow run URL", show=False),
    ]
    table = Table(
        "published",
        "Published checkpoints, evaluated here",
        "The authors' released weights (docs/models.md) through this study's shards, loader and "
        "evaluation, with the model's own data config. Δ: top-1 here minus the paper's, in points. The "
        "sha256 is the evaluated file's; later evaluations compare against it.",
        cols,
        row_key="name",
    )
    for p in published:
        r = p.record
        table.rows.append(
            {
                **{c.key: r.get(c.key) for c in cols},
                "exits_top1": " / ".join(f"{v:.2f}" for v in r.get("exits_top1") or []),
                "paper_top1": p.paper_top1,
                "vs_paper": p.vs_paper,
                "run_url": p.url,
            }
        )
    return table


def dvt_checkpoints(published: list[Published]) -> list[Published]:
    """The evaluated DVT checkpoints: those with a curve traced by this study's threshold code."""
    return [p for p in published if p.record.get("curve")]


def _costs(p: Published) -> list[float]:
    authors = p.record.get("published") or {}
    stored = authors.get("budgeted_batch_classification") or [[]]
    return [c["avg_gmacs"] for c in p.record["curve"]] + list(stored[0]) + list(authors.get("flops") or [])


def panel_of(study: Study, p: Published) -> DVTResult | None:
    """The tuned cascade whose panel a checkpoint joins: the same model at the same input size, the
    checkpoint's costs within the panel's reach (twice the full cascade's); None: a panel of its own."""
    key, reach = (p.record["model"], int(p.record["img_size"])), max(_costs(p))
    for dvt in study.tuned:
        if (dvt.record.model, dvt.record.img_size) == key and reach <= 2.0 * dvt.record.full_gmacs:
            return dvt
    return None


def draw_checkpoint(ax: Any, p: Published, color: str = "C3") -> None:
    """A checkpoint's curve evaluated here, the authors' stored curve and the authors' exits."""
    curve = sorted(p.record["curve"], key=lambda c: c["avg_gmacs"])
    ax.plot(
        [c["avg_gmacs"] for c in curve],
        [c["top1"] for c in curve],
        "-",
        marker="x",
        ms=4,
        lw=1.2,
        color=color,
        zorder=3,
        label=f"{p.name} (published checkpoint, evaluated here)",
    )
    authors = p.record.get("published") or {}
    stored = authors.get("budgeted_batch_classification")
    if stored and len(stored) == 2:
        ax.plot(stored[0], stored[1], "--", lw=1.1, color=color, alpha=0.7,
                label=f"{p.name} (authors' stored curve)")  # fmt: skip
    flops, top1 = authors.get("flops") or [], authors.get("anytime_classification") or []
    if flops and top1:
        n = min(len(flops), len(top1))
        ax.scatter(flops[:n], top1[:n], marker="v", s=40, facecolors="none", edgecolors=color,
                   linewidths=1.1, zorder=3, label=f"{p.name} (authors' exits)")  # fmt: skip


#: Colours of the checkpoints sharing a panel (the cascade's own curve is C2).
_COLORS = ("C3", "C5", "C6", "C9")


def _draw_all(checkpoints: list[Published], ax: Any) -> None:
    for k, p in enumerate(checkpoints):
        draw_checkpoint(ax, p, _COLORS[k % len(_COLORS)])


def dvt_figure(published: list[Published]) -> Figure | None:
    """``dvt_vs_static`` with the evaluated DVT checkpoints' curves in it (None without any checkpoint:
    the figure of :mod:`~pipeline.report.plots`, unchanged, is drawn)."""
    checkpoints = dvt_checkpoints(published)
    if not checkpoints:
        return None
    base = next(f for f in FIGURES if f.name == "dvt_vs_static")

    def draw(fig: Any, study: Study) -> None:
        joined: dict[str, list[Published]] = {d.variant: [] for d in study.tuned}
        alone = []
        for p in checkpoints:
            dvt = panel_of(study, p)
            (joined[dvt.variant] if dvt is not None else alone).append(p)
        panels = len(study.tuned) + len(alone)
        if panels > 3:
            fig.set_size_inches(4.0 * panels, base.size[1])
        axes = fig.subplots(1, panels, squeeze=False)[0]
        for ax, dvt in zip(axes[: len(study.tuned)], study.tuned, strict=True):
            dvt_panel(ax, study, dvt, partial(_draw_all, joined[dvt.variant]))
        for ax, p in zip(axes[len(study.tuned) :], alone, strict=True):
            r = p.record
            draw_checkpoint(ax, p)
            ax.set_title(f"{p.name} ({r['model']}, {r['img_size']} px, {r['images']} images)", fontsize=9)
            ax.set_xlabel("average G per image (here: all-matmul MACs; authors: their GFLOPs)")
            ax.set_ylabel("top-1 (%)")
            ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        if not study.tuned and study.dvt:
            notes = "; ".join(f"{d.variant}: {d.status} ({d.note})" for d in study.dvt)
            fig.suptitle(f"No DVT results: {notes}", fontsize=8, color="0.35", wrap=True)

    return Figure(
        base.name,
        base.title,
        base.caption
        + " Each published DVT checkpoint evaluated here adds its curves: the accuracy-versus-cost curve "
        "of this study's threshold code on the evaluated images (thresholds calibrated on a seeded half, "
        "the curve measured on the other half), and the budgeted-batch curve and per-exit top-1 the "
        "authors stored in the file (their ImageNet validation run; their GFLOPs on the x axis). It joins "
        "the panel of the tuned cascade of the same model and input size when its costs fit there, "
        "otherwise it has a panel of its own.",
        draw,
        base.size,
    )
