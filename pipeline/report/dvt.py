"""DVT's tables: accuracy under a MACs budget (with each exit alone) and the reuse ablation.

From the tune_dvt stage's ``results/dvt/curve.csv`` and ``best.yaml`` and the DVT training run's
per-exit accuracy; the static models beside them are this study's single-exit variants.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pipeline.report.collect import Measured, Study
from pipeline.report.paper import DEMO_SCALE, paper_key_for
from pipeline.report.table import Column, Table

BUDGET_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def _static_best(study: Study, budget: float) -> tuple[str, Measured] | None:
    """The most accurate measured single-exit variant costing at most ``budget`` GMACs."""
    fits = [
        (v, m)
        for v, m in study.measured
        if m.num_exits == 1
        and m.metric("macs_g") is not None
        and m.metric("macs_g") <= budget + 1e-12
        and m.metric("val_top1") is not None
    ]
    return max(fits, key=lambda vm: (vm[1].metric("val_top1"), -vm[1].metric("macs_g")), default=None)


def best_point(curve: Sequence[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    """The most accurate point of the MSDNet sweep within ``budget`` GMACs (the cheaper one on a tie)."""
    fits = [p for p in curve if p["source"] == "msdnet" and p["avg_gmacs"] <= budget + 1e-12]
    return max(fits, key=lambda p: (p["accuracy"], -p["avg_gmacs"]), default=None)


def dvt_budget_table(study: Study) -> Table:
    """DVT's accuracy at fractions of its full cost, its tuned thresholds, and each exit alone."""
    cols = [
        Column("point", "Setting"),
        Column("budget_fraction", "Budget (share of full cost)", "float", 2, show=False),
        Column("budget_gmacs", "Budget (G)", "float", 3),
        Column("top1", "Top-1 (%)", "float", 2),
        Column("avg_gmacs", "Avg MACs (G)", "float", 3),
        Column("q", "q", "float", 2, show=False),
        Column("eta1", "η1", "float", 3),
        Column("eta2", "η2", "float", 3),
        Column("exit1", "Exit 1", "float", 2),
        Column("exit2", "Exit 2", "float", 2),
        Column("exit3", "Exit 3", "float", 2),
        Column("evaluated_on", "Evaluated on"),
        Column("static_variant", "Best static variant within budget"),
        Column("static_top1", "Its top-1 (%)", "float", 2),
        Column("static_macs_g", "Its MACs (G)", "float", 3),
        Column("paper_gmacs", "Paper cost (G)", "float", 3),
        Column("run_id", "MLflow run", link="run_url", width=8),
        Column("run_url", "MLflow run URL", show=False),
    ]
    dvt = study.dvt
    caption = (
        "DVT's early-exit cascade at several budgets of average MACs per image. 'Best ≤ x %': the most "
        "accurate point of the MSDNet threshold sweep (results/dvt/curve.csv) whose average cost is "
        "within x % of the full cascade's (every image through every stage); its accuracy is on the "
        "held-out part of the validation split that calibrated nothing. The two tuned settings are "
        "the tune_dvt stage's choices for its budget. 'Exit k only': every image answered by stage k "
        "(top-1 on the whole validation split, from the training run). Exit columns: share of the "
        "images answering at each stage. The static variants are this study's single-exit models."
    )
    table = Table("dvt_budgets", "DVT: accuracy under a MACs budget", caption, cols)
    if dvt.status != "ok":
        table.caption += f" No DVT results: {dvt.status} ({dvt.note})."
        return table
    full = dvt.full_gmacs
    link = {"run_id": dvt.run_id, "run_url": dvt.url}

    def static(budget: float) -> dict[str, Any]:
        found = _static_best(study, budget)
        if found is None:
            return {"static_variant": "none"}
        v, m = found
        return {"static_variant": v, "static_top1": m.metric("val_top1"), "static_macs_g": m.metric("macs_g")}

    for fraction in BUDGET_FRACTIONS:
        budget = fraction * full
        p = best_point(dvt.curve, budget)
        row = {
            "point": f"best ≤ {fraction:.0%} of full cost",
            "budget_fraction": fraction,
            "budget_gmacs": budget,
            "evaluated_on": "held-out half of val",
            **static(budget),
            **link,
        }
        if p is None:
            row["_display"] = {"top1": "no point within budget"}
        else:
            row.update(
                {k: p[k] for k in ("q", "eta1", "eta2", "exit1", "exit2", "exit3")},
                top1=p["accuracy"],
                avg_gmacs=p["avg_gmacs"],
            )
        table.rows.append(row)
    budget = float(dvt.best.get("budget_gmacs", 0.0))
    for search, label in (("msdnet", "MSDNet rule"), ("optuna", "Optuna search")):
        t = dvt.best.get("thresholds", {}).get(search)
        if not t:
            continue
        eta = [float(x) for x in t["thresholds"]]
        exits = [float(x) for x in t["exit_fractions"]]
        table.rows.append(
            {
                "point": f"tuned: {label} for dvt.budget_gmacs",
                "budget_fraction": budget / full if full else None,
                "budget_gmacs": budget,
                "top1": t["test_accuracy"],
                "avg_gmacs": t["avg_gmacs"],
                "eta1": eta[0],
                "eta2": eta[1],
                "exit1": exits[0],
                "exit2": exits[1],
                "exit3": exits[2],
                "evaluated_on": "held-out half of val",
                **static(budget),
                **link,
            }
        )
    measured = study.find(dvt.variant).measured
    paper_cum = _paper_cumulative(measured)
    cumulative = 0.0
    for k, stage in enumerate(dvt.stage_gmacs, start=1):
        cumulative += stage
        row = {
            "point": f"exit {k} only",
            "top1": measured.metric(f"val_top1_exit{k}"),
            "avg_gmacs": cumulative,
            "evaluated_on": "whole val split",
            **{f"exit{j}": float(j == k) for j in (1, 2, 3)},
            **static(cumulative),
            "run_id": measured.run_id,
            "run_url": measured.url,
        }
        if paper_cum is None:
            row["_display"] = {"paper_gmacs": DEMO_SCALE if paper_key_for(measured.model, 224) else "—"}
        elif measured.img_size == 224:
            row["paper_gmacs"] = paper_cum[k - 1]
        else:
            row["_display"] = {"paper_gmacs": f"n/a (paper at 224 px: {paper_cum[k - 1]:.3f})"}
        table.rows.append(row)
    return table


def _paper_cumulative(m: Measured) -> list[float] | None:
    """DVT_PAPER's cumulative stage cost for the trained cascade, if it is the paper's model."""
    from pipeline.models.dvt import DVT_PAPER

    if m.model not in DVT_PAPER or not m.paper_architecture:
        return None
    stages = DVT_PAPER[m.model]["stage_macs_g"]
    return [round(sum(stages[: k + 1]), 3) for k in range(len(stages))]


_COMBO = re.compile(r"feature=(on|off),relation=(on|off)")


def dvt_reuse_table(study: Study) -> Table:
    """The reuse ablation: validation top-1 of each combination of feature and relationship reuse."""
    cols = [
        Column("combination", "Combination", show=False),
        Column("feature_reuse", "Feature reuse", "bool"),
        Column("relation_reuse", "Relationship reuse", "bool"),
        Column("val_top1", "Top-1, last exit (%)", "float", 2),
        Column("val_top1_exit1", "Exit 1 (%)", "float", 2),
        Column("val_top1_exit2", "Exit 2 (%)", "float", 2),
        Column("val_top1_exit3", "Exit 3 (%)", "float", 2),
        Column("delta_pts", "Δ vs both on (points)", "float", 2),
        Column("best", "Best", "bool"),
        Column("run_id", "MLflow run", link="run_url", width=8),
        Column("run_url", "MLflow run URL", show=False),
    ]
    table = Table(
        "dvt_reuse",
        "DVT: the reuse ablation",
        "Each combination of feature and relationship reuse trained from scratch by the tune_dvt stage "
        "(a short run of dvt.reuse_epochs epochs, one Ray Tune trial each; results/dvt/best.yaml), "
        "validation top-1 per exit. The DVT paper reports that dropping both reuses costs about 4 "
        "points and dropping one about 2 (ImageNet, full training). Each row links to its trial's MLflow "
        "run (a child of the tuning run).",
        cols,
        row_key="combination",
    )
    if study.dvt.status != "ok":
        table.caption += f" No DVT results: {study.dvt.status} ({study.dvt.note})."
        return table
    reuse = study.dvt.best.get("reuse", {})
    if reuse.get("epochs"):
        steps = reuse.get("steps_per_epoch")
        table.caption += (
            f" Here each trial trained {reuse['epochs']} epoch(s)"
            + (f" of at most {steps} optimizer steps" if steps else "")
            + f" on {reuse.get('workers', 1)} worker(s), against the paper's full training: read the"
            " differences with the trial budget in mind."
        )
    scores = reuse.get("val_top1", {})
    parsed = []
    for name, metrics in scores.items():
        match = _COMBO.fullmatch(name)
        feature, relation = (match.group(1) == "on", match.group(2) == "on") if match else (None, None)
        parsed.append((name, feature, relation, metrics))
    parsed.sort(key=lambda t: (not t[1], not t[2]))
    both = next((m.get("val_top1") for _, f, r, m in parsed if f and r), None)
    for name, feature, relation, metrics in parsed:
        top1 = metrics.get("val_top1")
        table.rows.append(
            {
                "combination": name,
                "feature_reuse": feature,
                "relation_reuse": relation,
                "val_top1": top1,
                **{f"val_top1_exit{k}": metrics.get(f"val_top1_exit{k}") for k in (1, 2, 3)},
                "delta_pts": None if both is None or top1 is None else top1 - both,
                "best": name == reuse.get("best"),
                **study.dvt.trials.get(name, {"run_id": study.dvt.run_id, "run_url": study.dvt.url}),
            }
        )
    return table
