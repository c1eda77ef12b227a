"""The static models' tables in the T2T-ViT paper's shape, measured beside published, and metrics.json.

* ``comparison``: T2T-ViT against ViT, one row per variant of the current params;
* ``paper_t2t_vs_vit``: the paper's own ImageNet table, with the variants training each model;
* ``cnn_to_vit``: "From CNN to ViT", the paper's rows each followed by this study's variants of it.

DVT's tables are in :mod:`pipeline.report.dvt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.report.collect import Measured, Study
from pipeline.report.dvt import dvt_budget_table, dvt_reuse_table, dvt_speed_table
from pipeline.report.paper import (
    CNN_TO_VIT_ROWS,
    DEMO_SCALE,
    README_ONLY_ROWS,
    T2T_VS_VIT_ROWS,
    paper_beside,
    paper_row,
)
from pipeline.report.table import Column, Table, counting
from pipeline.stats import noise_neighbours

NOT_TRAINED = "not trained in this profile"


RUN_COLUMNS = [
    Column("run_id", "MLflow run", link="run_url", width=8),
    Column("run_url", "MLflow run URL", show=False),
]


def figure_note(study: Study) -> str:
    """What the measured top-1/top-5 of the tables are: which epoch, which weights, over how many seeds."""
    figures = sorted({m.figure for _, m in study.measured if m.figure}) or ["last epoch, raw weights"]
    text = (
        f"Measured top-1/top-5: validation accuracy at the {'; '.join(figures)} (EMA weights where the "
        "recipe keeps an EMA, as the authors evaluate them)"
    )
    if study.epoch == "best":
        text += (
            "; the best epoch is picked on the same validation images it is measured on, so it "
            "overstates what the model would score on new data (report.epoch: last shows the last epoch)"
        )
    if any(m.n > 1 for _, m in study.measured):
        text += (
            ". Where a variant was trained over several seeds (train.seeds) every figure is the mean "
            "± sample standard deviation over them, with n; 'Within seed noise of' names the variants "
            "whose top-1 differs from this one by less than the larger of the two standard deviations: "
            "such a difference is not a finding"
        )
    return text + "."


def _noise_text(study: Study) -> dict[str, str]:
    """Per variant, the variants whose top-1 is within the between-seed spread of its own."""
    figures = {v: m.spread["top1"] for v, m in study.measured if "top1" in m.spread}
    return {
        v: ", ".join(f"{o} (Δ {d:.2f} < {noise:.2f})" for o, d, noise in near)
        for v, near in noise_neighbours(figures).items()
    }


def comparison_table(study: Study) -> Table:
    """T2T-ViT against ViT: one row per variant of the current params, the paper's row beside it."""
    seeded = any(m.n > 1 for _, m in study.measured)
    noise = _noise_text(study)
    cols = [
        Column("variant", "Variant"),
        Column("status", "Status", show=False),
        Column("model", "Model"),
        Column("model_kwargs", "Overrides"),
        Column("img_size", "Input (px)", "int"),
        Column("epochs", "Epochs", "int", show=False),
        Column("top1", "Top-1 (%)", "float", 2),
        Column("top5", "Top-5 (%)", "float", 2),
        Column("top1_std", "Top-1 std over seeds", "float", 2, show=False),
        Column("seeds", "Seeds (n)", "int", show=seeded),
        Column("within_noise", "Within seed noise of", show=seeded),
        Column("figure", "Figure", show=False),
        Column("params_m", "Params (M)", "float", 2),
        Column("macs_g", "MACs (G)", "float", 3),
        Column("images_per_s", "Train images/s", "float", 1),
        Column("paper_model", "Paper row", show=False),
        Column("paper_img_size", "Paper input (px)", "int", show=False),
        Column("paper_top1", "Paper top-1 (%)", "float", 1),
        Column("paper_params_m", "Paper params (M)", "float", 1),
        Column("paper_macs_g", "Paper MACs (G)", "float", 1),
        Column("paper_note", "Paper note", show=False),
        Column("counting", "Counting"),
        *RUN_COLUMNS,
    ]
    table = Table(
        "comparison",
        "T2T-ViT against ViT: measured beside published",
        "One row per variant of the current params. Measured (this study's data): parameters (all "
        "tensors, frozen ones included) and MACs (all matrix multiplications, at the training "
        "resolution) of the trained model, training images/s of the last epoch over all workers. "
        "Paper: ImageNet-1k numbers of the same model, shown only where the variant is the paper's "
        f"model at the paper's size. {figure_note(study)}",
        cols,
        row_key="variant",
    )
    for result in study.variants:
        m = result.measured
        if m is None:
            table.rows.append(
                {
                    "variant": result.variant,
                    "status": "missing",
                    "_display": {c.key: "missing" for c in cols if c.key not in ("variant", "status")},
                }
            )
            continue
        paper, display = paper_beside(m)
        for key in ("top1", "top5", "images_per_s"):
            if (text := m.spread_text(key, 1 if key == "images_per_s" else 2)) is not None:
                display = {**display, key: text}
        top1_spread = m.spread.get("top1")
        table.rows.append(
            {
                "variant": result.variant,
                "status": "measured",
                "model": m.model,
                "model_kwargs": m.kwargs_text,
                "img_size": m.img_size,
                "epochs": m.epochs,
                "top1": m.metric("top1"),
                "top5": m.metric("top5"),
                "top1_std": top1_spread.std if top1_spread is not None else None,
                "seeds": m.n,
                "within_noise": noise.get(result.variant, ""),
                "figure": m.figure,
                "params_m": m.metric("params_m"),
                "macs_g": m.metric("macs_g"),
                "images_per_s": m.metric("images_per_s"),
                **paper,
                "counting": counting(m.img_size),
                "run_id": m.run_id,
                "run_url": m.url,
                "_display": display,
            }
        )
    return table


def _trained_as(study: Study, key: str) -> list[tuple[str, Measured]]:
    """Measured variants of the model of paper row ``key`` (any size)."""
    from pipeline.models.paper import PAPER

    model = PAPER[key]["model"] if key in PAPER else key
    return [(v, m) for v, m in study.measured if m.model == model]


def paper_t2t_vs_vit_table(study: Study) -> Table:
    """The paper's ImageNet table of T2T-ViT against ViT/DeiT, with the variants that train each model."""
    table = Table(
        "paper_t2t_vs_vit",
        "Published: T2T-ViT against ViT and DeiT on ImageNet",
        "The T2T-ViT paper's (arXiv:2101.11986) comparison, from scratch on ImageNet-1k, then the other "
        "T2T-ViT models of the authors' README (github.com/yitu-opensource/T2T-ViT), which prints a top-1 "
        "for every released model. MACs as the final paper and README print them (all matrix "
        "multiplications). 'Trained here as' lists the variants of this study built on the same model "
        "(demo-scale ones marked).",
        [
            Column("paper_model", "Paper row", show=False),
            Column("model", "Model"),
            Column("img_size", "Input (px)", "int"),
            Column("top1", "Top-1 (%)", "float", 1),
            Column("params_m", "Params (M)", "float", 1),
            Column("macs_g", "MACs (G)", "float", 1),
            Column("top1_source", "Top-1 from"),
            Column("trained_as", "Trained here as"),
        ],
    )
    for key in T2T_VS_VIT_ROWS + README_ONLY_ROWS:
        p = paper_row(key)
        trained = [
            v
            + (
                " (demo-scale)"
                if not m.paper_architecture
                else ""
                if m.img_size == p.img_size
                else f" (at {m.img_size} px)"
            )
            for v, m in _trained_as(study, key)
        ]
        table.rows.append(
            {
                "paper_model": key,
                "model": p.name,
                "img_size": p.img_size,
                "top1": p.top1,
                "params_m": p.params_m,
                "macs_g": p.macs_g,
                "top1_source": p.top1_source,
                "trained_as": ", ".join(trained),
            }
        )
    return table


def cnn_to_vit_table(study: Study) -> Table:
    """The From-CNN-to-ViT table: the paper's rows in order, each followed by this study's variants."""
    cols = [
        Column("base", "Base"),
        Column("design", "CNN design"),
        Column("paper_model", "Paper row", show=False),
        Column("model", "Model"),
        Column("variant", "Variant"),
        Column("source", "Source"),
        Column("top1", "Top-1 (%)", "float", 2),
        Column("params_m", "Params (M)", "float", 2),
        Column("macs_g", "MACs (G)", "float", 3),
        Column("images_per_s", "Train images/s", "float", 1),
        Column("img_size", "Input (px)", "int"),
        Column("note", "Note"),
        *RUN_COLUMNS,
    ]
    table = Table(
        "cnn_to_vit",
        "From CNN to ViT: measured beside published",
        "T2T-ViT's study of five CNN designs carried into ViT and T2T-ViT. Each 'paper' row gives the "
        "published ImageNet-1k numbers (MACs as the final paper prints them); the 'measured' rows under "
        "it are this study's variants of the same model. A demo-scale variant (a model_kwargs override "
        "of depth or width) is a smaller model, so the paper's numbers are not its numbers. "
        + figure_note(study),
        cols,
        row_key="variant",
    )
    for base, key, design in CNN_TO_VIT_ROWS:
        p = paper_row(key)
        trained = _trained_as(study, key)
        table.rows.append(
            {
                "base": base,
                "design": design,
                "paper_model": key,
                "model": p.name,
                "variant": None,
                "source": "paper",
                "top1": p.top1,
                "params_m": p.params_m,
                "macs_g": p.macs_g,
                "img_size": p.img_size,
                "note": "" if trained else NOT_TRAINED,
                "_display": {
                    k: f"{getattr(p, k):.1f}" for k in ("top1", "params_m", "macs_g") if getattr(p, k)
                },
            }
        )
        for variant, m in trained:
            note = [DEMO_SCALE + f": {m.kwargs_text}"] if not m.paper_architecture else []
            note.append(counting(m.img_size))
            table.rows.append(
                {
                    "base": base,
                    "design": design,
                    "paper_model": key,
                    "model": m.model,
                    "variant": variant,
                    "source": "measured",
                    "top1": m.metric("top1"),
                    "params_m": m.metric("params_m"),
                    "macs_g": m.metric("macs_g"),
                    "images_per_s": m.metric("images_per_s"),
                    "img_size": m.img_size,
                    "note": "; ".join(note),
                    "run_id": m.run_id,
                    "run_url": m.url,
                    **({"_display": {"top1": text}} if (text := m.spread_text("top1")) else {}),
                }
            )
    return table


def build_tables(study: Study) -> list[Table]:
    """Every table of the report, in the order the HTML shows them."""
    return [
        comparison_table(study),
        paper_t2t_vs_vit_table(study),
        cnn_to_vit_table(study),
        dvt_budget_table(study),
        dvt_speed_table(study),
        dvt_reuse_table(study),
    ]


def metrics_json(study: Study, tables: Sequence[Table]) -> dict[str, Any]:
    """``reports/metrics.json`` (``dvc metrics show``): per variant, and DVT at each budget."""
    by_name = {t.name: t for t in tables}
    variants = {}
    for row in by_name["comparison"].rows:
        if row["status"] != "measured":
            continue
        variants[row["variant"]] = {
            k: row[k]
            for k in ("top1", "top5", "top1_std", "seeds", "params_m", "macs_g", "images_per_s")
            if row.get(k) is not None
        }
    dvt: dict[str, Any] = {}
    for row in by_name["dvt_budgets"].rows:
        if row.get("top1") is not None:
            point = {"top1": row["top1"], "avg_gmacs": row["avg_gmacs"]}
            dvt.setdefault(row["cascade"], {})[row["key"]] = point
    for row in by_name["dvt_speed"].rows:
        if row["source"] == "measured":
            speeds = dvt.setdefault(row["cascade"], {}).setdefault("images_per_s", {})
            speeds[row["key"]] = row["images_per_s"]
    for row in by_name["dvt_reuse"].rows:
        if row.get("val_top1") is not None:
            dvt.setdefault(row["cascade"], {}).setdefault("reuse_top1", {})[row["trial"]] = row["val_top1"]
    return {"variants": variants, "dvt": dvt}
