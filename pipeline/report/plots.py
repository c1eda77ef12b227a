"""The report's figures, each written as PNG and SVG (``reports/<name>.png`` / ``.svg``).

* ``accuracy_vs_macs`` / ``accuracy_vs_params``: the T2T-ViT paper's Figure 1 shape. This study's
  trained models on the left, the papers' published ImageNet points on the right (their own axes:
  demo-scale models cost a hundredth of ImageNet ones).
* ``dvt_vs_static``: DVT's accuracy against average MACs (the threshold sweep), its tuned settings
  and each exit alone, over this study's static models as points; an evaluated published DVT
  checkpoint adds its curves to it (:func:`pipeline.report.published.dvt_figure`).
* ``training_curves``: validation top-1 and training loss per epoch, one line per variant, from the
  MLflow metric history.
* ``dvt_exits``: the share of images answering at each stage under the thresholds both searches chose.

Output is deterministic for the same inputs (no dates in the files, fixed SVG ids).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.dvt.points import best_within
from pipeline.report.collect import DVTResult, Study
from pipeline.report.dvt import BUDGET_FRACTIONS, same_image_statics
from pipeline.report.paper import CNN_TO_VIT_ROWS, T2T_VS_VIT_ROWS, PaperRow, paper_row

log = logging.getLogger(__name__)

#: Marker and colour per model family, the same in every figure.
FAMILY_STYLE = {
    "T2T-ViT": {"marker": "o", "color": "C0"},
    "ViT": {"marker": "s", "color": "C1"},
    "DeiT": {"marker": "D", "color": "C4"},
    "DVT": {"marker": "^", "color": "C2"},
}


def family(model: str) -> str:
    """The family a registered model name belongs to (for markers and colours)."""
    if model.startswith("dvt_"):
        return "DVT"
    if model.startswith("t2t_vit"):
        return "T2T-ViT"
    if model.startswith("deit"):
        return "DeiT"
    return "ViT"


@dataclass(frozen=True)
class Figure:
    """One figure of the report: file stem, heading and caption (the HTML shows all three)."""

    name: str
    title: str
    caption: str
    draw: Callable[[Any, Study], None]
    """Draws onto a new matplotlib figure (passed in) from the study."""
    size: tuple[float, float] = (11.0, 4.6)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "t2t-vit-study-report", "font.size": 9})
    return plt


def _message(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def _paper_points(xkey: str) -> list[tuple[PaperRow, str]]:
    keys = dict.fromkeys([*T2T_VS_VIT_ROWS, *(k for _, k, _ in CNN_TO_VIT_ROWS)])
    points = []
    for key in keys:
        p = paper_row(key)
        if p.top1 is not None and getattr(p, xkey) is not None:
            points.append((p, family(key)))
    return points


#: Where a label may go relative to its point (points), tried in order: right, left, above, below.
_OFFSETS = [
    (5, 3, "left"),
    (5, -11, "left"),
    (-5, 3, "right"),
    (-5, -11, "right"),
    (5, 12, "left"),
    (5, -20, "left"),
    (-5, 12, "right"),
    (-5, -20, "right"),
    (0, 14, "center"),
    (0, -22, "center"),
]


def _place_labels(
    ax: Any, labels: list[tuple[float, float, str, dict[str, Any]]], fontsize: float = 8
) -> None:
    """Label points so that labels overlap neither each other nor the points (greedy, estimated sizes).

    Points at the same coordinates share one label (``A / B``).
    """
    merged: dict[tuple[float, float], tuple[list[str], dict[str, Any]]] = {}
    for x, y, text, kw in labels:
        names, style = merged.setdefault((round(x, 6), round(y, 6)), ([], {}))
        names.append(text)
        if kw.get("fontweight") == "bold":
            style.update(kw)
        else:
            style.setdefault("color", kw.get("color", "black"))
    ax.get_xlim(), ax.get_ylim()  # settle the autoscaled limits before using transData
    scale = ax.figure.dpi / 72.0
    points = [ax.transData.transform(xy) for xy in merged]
    taken = [(px - 4 * scale, py - 4 * scale, px + 4 * scale, py + 4 * scale) for px, py in points]
    for ((x, y), (names, style)), (px, py) in sorted(
        zip(merged.items(), points, strict=True), key=lambda item: -item[1][1]
    ):
        text = " / ".join(names)
        width, height = 0.56 * fontsize * len(text) * scale, 1.15 * fontsize * scale
        best, best_overlap = _OFFSETS[0], float("inf")
        for dx, dy, ha in _OFFSETS:
            left = px + dx * scale - {"left": 0, "right": width, "center": width / 2}[ha]
            box = (left, py + dy * scale, left + width, py + dy * scale + height)
            overlap = sum(
                max(0.0, min(box[2], t[2]) - max(box[0], t[0]))
                * max(0.0, min(box[3], t[3]) - max(box[1], t[1]))
                for t in taken
            )
            if overlap < best_overlap:
                best, best_overlap, best_box = (dx, dy, ha), overlap, box
            if overlap == 0:
                break
        taken.append(best_box)
        dx, dy, ha = best
        ax.annotate(
            text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=fontsize, **style
        )


def _log_x(ax: Any) -> None:
    """A log x axis ticked at 1, 2, 5 x 10^k with plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _log_if_spread(ax: Any, values: list[float], ratio: float = 8.0) -> None:
    """A log x axis where the values span more than ``ratio`` (demo-scale and full-size side by side)."""
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) > ratio:
        _log_x(ax)


def _draw_accuracy(xkey: str, xlabel: str) -> Callable[[Any, Study], None]:
    metric = {"macs_g": "macs_g", "params_m": "params_m"}[xkey]

    def draw(fig: Any, study: Study) -> None:
        mine, paper = fig.subplots(1, 2)
        seen, labels = set(), []
        for variant, m in study.measured:
            x, y = m.metric(metric), m.metric("top1")
            if x is None or y is None:
                continue
            fam = family(m.model)
            style = FAMILY_STYLE[fam]
            label = f"{fam} (measured)" if fam not in seen else None
            seen.add(fam)
            mine.scatter(x, y, s=60, label=label, zorder=3, edgecolor="black", linewidth=0.6, **style)
            labels.append((x, y, variant + (" (all exits)" if m.num_exits > 1 else ""), {}))
        if not seen:
            _message(mine, "no trained variant yet")
        else:
            _log_if_spread(mine, [x for x, *_ in labels])
            mine.set_xlabel(f"{xlabel} (this study" + (", training resolution)" if xkey == "macs_g" else ")"))
            mine.set_ylabel("validation top-1 (%), this study's data")
            mine.margins(x=0.3, y=0.15)
            mine.grid(alpha=0.3, which="both")
            mine.legend(fontsize=8, loc="best")
            _place_labels(mine, labels)
        mine.set_title("Measured: this study's trained models")

        trained = {m.model for _, m in study.measured if m.paper_architecture}
        seen, labels = set(), []
        for p, fam in _paper_points(xkey):
            style = FAMILY_STYLE[fam]
            label = f"{fam} (published)" if fam not in seen else None
            seen.add(fam)
            x = getattr(p, xkey)
            paper.scatter(
                x,
                p.top1,
                s=50,
                marker=style["marker"],
                facecolors="none",
                edgecolors=style["color"],
                linewidths=1.4,
                label=label,
                zorder=3,
            )
            bold = p.key.split("@")[0] in trained
            labels.append((x, p.top1, p.name, {"fontweight": "bold"} if bold else {"color": "0.3"}))
        _log_x(paper)
        paper.set_xlabel(f"{xlabel} (as published)")
        paper.set_ylabel("ImageNet-1k top-1 (%)")
        paper.set_title("Published: T2T-ViT paper, ImageNet-1k")
        paper.margins(x=0.2, y=0.08)
        paper.grid(alpha=0.3, which="both")
        paper.legend(fontsize=8, loc="best")
        _place_labels(paper, labels)

    return draw


def _dvt_axes(fig: Any, study: Study) -> list[tuple[Any, Any]]:
    """One axis per tuned cascade (a message instead when none is), paired with its result."""
    if not study.tuned:
        notes = "; ".join(f"{d.variant}: {d.status} ({d.note})" for d in study.dvt) or "no dvt.variants"
        _message(fig.subplots(1, 1), f"No DVT results: {notes}")
        return []
    axes = fig.subplots(1, len(study.tuned), squeeze=False)[0]
    return list(zip(axes, study.tuned, strict=True))


def dvt_panel(ax: Any, study: Study, dvt: DVTResult, more: Callable[[Any], None] | None = None) -> None:
    """One tuned cascade's panel of ``dvt_vs_static``; ``more(ax)`` draws further series on it (a
    published checkpoint's curves, :mod:`~pipeline.report.published`) before the axes are finished."""
    r = dvt.record
    sweep = sorted(r.curve, key=lambda p: p.avg_gmacs)
    ax.plot(
        [p.avg_gmacs for p in sweep],
        [p.accuracy for p in sweep],
        "-",
        color="C2",
        lw=1.2,
        marker=".",
        ms=4,
        label="DVT, MSDNet threshold sweep",
    )
    tuned = [(r.msdnet, "D", "MSDNet rule for the budget"), (r.optuna, "*", "Optuna for the budget")]
    if r.match_static is not None:
        tuned.append((r.match_static, "P", "matching the backbone (calibration)"))
    for point, marker, label in tuned:
        ax.scatter(
            point.avg_gmacs,
            point.accuracy,
            marker=marker,
            s=120 if marker == "*" else 50,
            edgecolor="black",
            linewidth=0.6,
            zorder=4,
            label=label,
        )
    labels, cumulative = [], 0.0
    for k, (stage, top1) in enumerate(zip(r.stage_gmacs, r.exit_top1, strict=True), start=1):
        cumulative += stage
        ax.scatter(
            cumulative,
            top1,
            marker="^",
            s=45,
            facecolors="none",
            edgecolors="C2",
            linewidths=1.3,
            zorder=3,
            label="each exit alone" if k == 1 else None,
        )
        labels.append((cumulative, top1, f"exit {k}", {"color": "C2"}))
    # Static models far costlier than the whole cascade would squash its curve: named, not drawn.
    reach, seen, off_axis = 2.0 * r.full_gmacs, set(), []
    for variant, top1, gmacs in same_image_statics(study, dvt):
        if gmacs > reach:
            off_axis.append(f"{variant} ({gmacs:.3g} G, {top1:.1f} %)")
            continue
        found = study.find(variant)
        fam = family(found.measured.model) if found and found.measured else "T2T-ViT"
        ax.scatter(
            gmacs,
            top1,
            s=60,
            edgecolor="black",
            linewidth=0.6,
            zorder=4,
            label=f"{fam} static" if fam not in seen else None,
            **FAMILY_STYLE[fam],
        )
        seen.add(fam)
        labels.append((gmacs, top1, variant, {}))
    for fraction in BUDGET_FRACTIONS:
        x = fraction * r.full_gmacs
        ax.axvline(x, color="0.6", ls=":", lw=0.8)
        best = best_within(r.curve, x)
        if best is not None:
            ax.scatter(
                best.avg_gmacs,
                best.accuracy,
                s=130,
                facecolors="none",
                edgecolors="0.3",
                zorder=2,
                label="best within 25/50/75/100 % (calibration)" if fraction == 0.25 else None,
            )
    if more is not None:
        more(ax)
    ax.set_xlabel("average MACs per image (G, all matmuls)")
    ax.set_ylabel(f"top-1 (%) on {r.reported_images} reported val images")
    ax.set_title(f"{dvt.variant} ({r.calibration} calibration)", fontsize=9)
    if off_axis:
        ax.text(
            0.01,
            0.01,
            "beyond the x range: " + "; ".join(off_axis),
            transform=ax.transAxes,
            fontsize=7,
            color="0.35",
            va="bottom",
        )
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    _place_labels(ax, labels)
    ax.legend(fontsize=7, loc="lower right")


def _draw_dvt(fig: Any, study: Study) -> None:
    for ax, dvt in _dvt_axes(fig, study):
        dvt_panel(ax, study, dvt)


def _draw_curves(fig: Any, study: Study) -> None:
    from matplotlib.ticker import MaxNLocator

    acc, loss = fig.subplots(1, 2)
    drawn = 0
    for i, (variant, m) in enumerate(study.measured):
        color = f"C{i % 10}"
        for ax, key in ((acc, "val_top1"), (loss, "train_loss")):
            points = m.history.get(key, [])
            if points:
                ax.plot(
                    [s + 1 for s, _ in points], [v for _, v in points], "-o", ms=3, color=color, label=variant
                )
                drawn += 1
    if not drawn:
        _message(acc, "no metric history")
        _message(loss, "no metric history")
        return
    acc.set_title("Validation top-1 per epoch")
    acc.set_ylabel("top-1 (%)")
    loss.set_title("Training loss per epoch")
    loss.set_ylabel("training loss (summed over the exits for DVT)")
    for ax in (acc, loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def _draw_exits(fig: Any, study: Study) -> None:
    for ax, dvt in _dvt_axes(fig, study):
        r = dvt.record
        searches = [(r.msdnet, "MSDNet rule"), (r.optuna, "Optuna search")]
        width = 0.8 / len(searches)
        stages = range(len(r.stage_gmacs))
        for i, (point, label) in enumerate(searches):
            eta = ", ".join(f"{e:.3f}" for e in point.thresholds[:-1])
            xs = [k + (i - (len(searches) - 1) / 2) * width for k in stages]
            bars = ax.bar(
                xs,
                [100 * f for f in point.exit_fractions],
                width,
                color=f"C{2 + i}",
                label=f"{label}: η = ({eta}), {point.avg_gmacs:.3f} G, {point.accuracy:.1f} %",
            )
            ax.bar_label(bars, fmt="%.0f%%", fontsize=8)
        ax.set_xticks(
            list(stages), [f"stage {k + 1}\n({g:.3f} G alone)" for k, g in enumerate(r.stage_gmacs)]
        )
        ax.set_ylabel("reported images answering here (%)")
        ax.set_ylim(0, 120)
        ax.set_title(f"{dvt.variant}: exits at the thresholds chosen for {r.budget_gmacs:g} G", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper left")


FIGURES = [
    Figure(
        "accuracy_vs_macs",
        "Accuracy against MACs",
        "Left: this study's trained models, validation top-1 against MACs at the training resolution "
        "(a DVT cascade at its full cost, every stage run). Right: the published ImageNet-1k points "
        "(hollow markers, the T2T-ViT paper's Figure 1 shape), names in bold where this study trains "
        "the same model at the paper's size.",
        _draw_accuracy("macs_g", "MACs (G, all matmuls)"),
    ),
    Figure(
        "accuracy_vs_params",
        "Accuracy against parameters",
        "As above with parameters (all tensors, in millions) on the x axis.",
        _draw_accuracy("params_m", "parameters (M, all tensors)"),
    ),
    Figure(
        "dvt_vs_static",
        "DVT against the static models",
        "One panel per cascade: accuracy against average MACs per image as the exit thresholds vary "
        "(MSDNet rule's sweep), the tuned settings and each exit alone, all on the reported images; the "
        "static models scored on those same images (its backbone always; with train calibration every "
        "trained static model) as points at their own cost. Dotted lines: 25, 50, 75 and 100 % of the "
        "full cascade's cost; circled: the point chosen within each on the calibration images.",
        _draw_dvt,
        (12.0, 5.2),
    ),
    Figure(
        "dvt_exits",
        "DVT: where images exit",
        "Share of the reported images answered by each stage under the thresholds each search chose "
        "(on the calibration images) for the cascade's budget.",
        _draw_exits,
        (8.0, 4.4),
    ),
    Figure(
        "training_curves",
        "Training curves",
        "Per-epoch validation top-1 and training loss of every variant, from its MLflow run's metric "
        "history (last exit for DVT).",
        _draw_curves,
    ),
]


def write_figures(study: Study, out: Path, figures: list[Figure] | None = None) -> list[Figure]:
    """Draw every figure (``FIGURES`` unless given) as ``<name>.png`` and ``<name>.svg`` under ``out``."""
    figures = FIGURES if figures is None else figures
    plt = _pyplot()
    for spec in figures:
        fig = plt.figure(figsize=spec.size, dpi=110, layout="constrained")
        try:
            spec.draw(fig, study)
            fig.savefig(out / f"{spec.name}.png", metadata={"Software": None})
            fig.savefig(out / f"{spec.name}.svg", metadata={"Date": None})
        finally:
            plt.close(fig)
    return figures
