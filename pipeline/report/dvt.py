"""DVT's tables: accuracy under a MACs budget, measured speed, and the reuse ablation, per cascade.

Every number comes from a tune_dvt stage's record (:class:`~pipeline.dvt.records.TuneRecord`,
``results/dvt/<cascade>/best.yaml``). Rows that *pick* a point ("best ≤ x % of full cost") pick it on
the calibration images' accuracy and cost (:func:`~pipeline.dvt.points.best_within`) and show it on
the reported images; DVT and every static model in a row are scored on the same reported images.
"""

from __future__ import annotations

from typing import Any

from pipeline.dvt.points import best_within
from pipeline.dvt.records import TuneRecord
from pipeline.report.collect import DVTResult, Measured, Study
from pipeline.report.paper import DEMO_SCALE, paper_key_for
from pipeline.report.table import Column, Table

BUDGET_FRACTIONS = (0.25, 0.5, 0.75, 1.0)

#: Exit index (1-based) -> token grid side of the paper's cascades at 224 px.
_PAPER_GRIDS = {1: 7, 2: 10, 3: 14}


def evaluated_on(record: TuneRecord) -> str:
    """Which images a record's accuracies are on, and which calibrated, in words."""
    if record.calibration == "train":
        return (
            f"all {record.reported_images} val images (thresholds calibrated on "
            f"{record.calibration_images} training images)"
        )
    return (
        f"{record.reported_images} val images (the other {record.calibration_images} val images "
        "calibrated the thresholds)"
    )


def same_image_statics(study: Study, dvt: DVTResult) -> list[tuple[str, float, float]]:
    """Static models scored on the cascade's reported images: (variant, top-1, GMACs).

    The backbone the tune stage scored is always one. With ``calibration: train`` the reported images
    are the whole validation split, on which every training run is scored, so every trained static
    model is one too; with ``val`` only the backbone is (the others saw other images).
    """
    record = dvt.record
    out = []
    if record.static is not None:
        out.append((record.static.variant, record.static.accuracy, record.static.gmacs))
    if record.calibration == "train":
        for variant, m in study.measured:
            if m.num_exits > 1 or (record.static and variant == record.static.variant):
                continue
            top1, macs = m.metric("val_top1"), m.metric("macs_g")
            if top1 is not None and macs is not None:
                out.append((variant, top1, macs))
    return out


def _static_best(statics: list[tuple[str, float, float]], budget: float) -> dict[str, Any]:
    fits = [s for s in statics if s[2] <= budget + 1e-12]
    if not fits:
        return {"static_variant": "none"}
    variant, top1, macs = max(fits, key=lambda s: (s[1], -s[2]))
    return {"static_variant": variant, "static_top1": top1, "static_macs_g": macs}


def _point_row(point: Any) -> dict[str, Any]:
    exits = {f"exit{k}": f for k, f in enumerate(point.exit_fractions, start=1)}
    return {
        "top1": point.accuracy,
        "avg_gmacs": point.avg_gmacs,
        "calib_top1": point.calib_accuracy,
        "q": point.q,
        "eta1": point.thresholds[0],
        "eta2": point.thresholds[1],
        **exits,
    }


def dvt_budget_table(study: Study) -> Table:
    """Per cascade: accuracy at fractions of its full cost, its tuned thresholds, each exit alone, and
    its static backbone, all on the same reported images."""
    cols = [
        Column("cascade", "Cascade"),
        Column("key", "Key", show=False),
        Column("point", "Setting"),
        Column("budget_fraction", "Budget (share of full cost)", "float", 2, show=False),
        Column("budget_gmacs", "Budget (G)", "float", 3),
        Column("top1", "Top-1 (%)", "float", 2),
        Column("avg_gmacs", "Avg MACs (G)", "float", 3),
        Column("calib_top1", "Calibration top-1 (%)", "float", 2),
        Column("q", "q", "float", 2, show=False),
        Column("eta1", "η1", "float", 3),
        Column("eta2", "η2", "float", 3),
        Column("exit1", "Exit 1", "float", 2),
        Column("exit2", "Exit 2", "float", 2),
        Column("exit3", "Exit 3", "float", 2),
        Column("evaluated_on", "Evaluated on", show=False),
        Column("static_variant", "Best static variant within budget"),
        Column("static_top1", "Its top-1 (%)", "float", 2),
        Column("static_macs_g", "Its MACs (G)", "float", 3),
        Column("paper_top1", "Paper top-1, single stage (%)", "float", 1),
        Column("paper_gmacs", "Paper cost (G)", "float", 3),
        Column("run_id", "MLflow run", link="run_url", width=8),
        Column("run_url", "MLflow run URL", show=False),
    ]
    caption = (
        "Each DVT cascade at several budgets of average MACs per image. Every choice is made on the "
        "calibration images only ('Calibration top-1'): 'best ≤ x %' is the sweep point (MSDNet rule, "
        "results/dvt/<cascade>/curve.csv) most accurate on the calibration images among those whose "
        "calibration cost is within x % of the full cascade's; the tuned settings are the stage's choices "
        "for its budget; 'matching the static backbone' is the cheapest sweep point at least as accurate "
        "as the backbone on the calibration images. Top-1, average MACs and exit shares are then measured "
        "on the reported images, the same images every static model in the row is scored on. 'Exit k "
        "only': every image answered by stage k. Paper: T2T-ViT-12 trained alone on 7×7 / 14×14 tokens "
        "(DVT paper, Table 1) beside exits 1 and 3 of DVT-T2T-ViT-12 at 224 px."
    )
    table = Table("dvt_budgets", "DVT: accuracy under a MACs budget", caption, cols)
    for dvt in study.dvt:
        if dvt.status != "ok":
            table.caption += f" {dvt.variant}: no results ({dvt.status}: {dvt.note})."
            continue
        r = dvt.record
        table.caption += f" {dvt.variant}: evaluated on {evaluated_on(r)}."
        statics = same_image_statics(study, dvt)
        base = {
            "cascade": dvt.variant,
            "evaluated_on": evaluated_on(r),
            "run_id": r.run_id,
            "run_url": dvt.url,
        }
        for fraction in BUDGET_FRACTIONS:
            budget = fraction * r.full_gmacs
            p = best_within(r.curve, budget)
            row = {
                **base,
                "key": f"budget_{round(100 * fraction)}pct",
                "budget_fraction": fraction,
                "point": f"best ≤ {fraction:.0%} of full cost",
                "budget_gmacs": budget,
                **_static_best(statics, budget),
            }
            if p is None:
                row["_display"] = {"top1": "no point within budget"}
            else:
                row.update(_point_row(p))
            table.rows.append(row)
        tuned = [
            ("msdnet", "tuned: MSDNet rule for the budget", r.msdnet, r.budget_gmacs),
            ("optuna", "tuned: Optuna search for the budget", r.optuna, r.budget_gmacs),
        ]
        if r.match_static is not None and r.static is not None:
            tuned.append(("match_static", f"matching {r.static.variant} (calibration)", r.match_static, None))
        for key, label, point, budget in tuned:
            gmacs = budget if budget is not None else point.avg_gmacs
            table.rows.append(
                {
                    **base,
                    "key": key,
                    "point": label,
                    "budget_gmacs": budget,
                    "budget_fraction": gmacs / r.full_gmacs,
                    **_point_row(point),
                    **_static_best(statics, gmacs),
                }
            )
        measured = study.find(dvt.variant).measured
        paper = _paper_single_stage(measured, r)
        cumulative = 0.0
        for k, (stage, top1) in enumerate(zip(r.stage_gmacs, r.exit_top1, strict=True), start=1):
            cumulative += stage
            row = {
                **base,
                "key": f"exit{k}",
                "point": f"exit {k} only",
                "top1": top1,
                "avg_gmacs": cumulative,
                **{f"exit{j}": float(j == k) for j in range(1, len(r.stage_gmacs) + 1)},
                **_static_best(statics, cumulative),
            }
            if paper is not None and k in paper:
                row["paper_top1"], row["paper_gmacs"] = paper[k]
            elif paper is None and paper_key_for(measured.model, 224):
                row["_display"] = {"paper_top1": DEMO_SCALE}
            table.rows.append(row)
        if r.static is not None:
            table.rows.append(
                {
                    **base,
                    "key": "static",
                    "point": f"static backbone {r.static.variant}",
                    "top1": r.static.accuracy,
                    "avg_gmacs": r.static.gmacs,
                    "calib_top1": r.static.calib_accuracy,
                    "run_id": r.static.run_id,
                    "run_url": _run_url(study, r.static.variant),
                }
            )
    return table


def _run_url(study: Study, variant: str) -> str:
    found = study.find(variant)
    return found.measured.url if found is not None and found.measured is not None else ""


def _paper_single_stage(m: Measured, record: TuneRecord) -> dict[int, tuple[float, float]] | None:
    """Table 1's T2T-ViT-12-alone numbers by exit, when the cascade is the paper's DVT-T2T-ViT-12 at 224."""
    from pipeline.models.dvt import DVT_PAPER_SINGLE_STAGE

    if m.model != "dvt_t2t_vit_12" or not m.paper_architecture or record.img_size != 224:
        return None
    return {k: DVT_PAPER_SINGLE_STAGE[g] for k, g in _PAPER_GRIDS.items() if g in DVT_PAPER_SINGLE_STAGE}


def dvt_speed_table(study: Study) -> Table:
    """Measured images/s of early exit, simulate-all and the static backbone, the paper's rows beside."""
    from pipeline.models.dvt import DVT_PAPER_SPEED

    cols = [
        Column("source", "Source"),
        Column("cascade", "Cascade", show=False),
        Column("model", "Model"),
        Column("key", "Key", show=False),
        Column("images_per_s", "Images/s", "float", 0),
        Column("top1", "Top-1 (%)", "float", 2),
        Column("avg_gmacs", "Avg MACs (G)", "float", 3),
        Column("speedup", "Speed-up over the static backbone", "float", 2),
        Column("ideal", "MACs-ideal speed-up", "float", 2),
        Column("setup", "Device, batch, dtype"),
    ]
    caption = (
        "Measured throughput in the tune_dvt stage, on the hardware it ran on: batched early exit "
        "(a batch pays only for the stages its images reach), the authors' way of running every stage on "
        "every image and applying the exits afterwards (simulate-all), and the static backbone of the "
        "same family, on the same batch of reported images with the same thresholds; median of the "
        "repeats after untimed warm-up batches. Top-1 is on all reported images. MACs-ideal: the "
        "backbone's MACs over the cascade's average MACs on the timed batch. The paper's rows (one 2080Ti, "
        "batch 128, ImageNet at 224 px) stand beside; demo-scale models are far smaller, so compare the "
        "speed-ups, not the images/s."
    )
    table = Table("dvt_speed", "DVT: measured speed", caption, cols)
    for dvt in study.tuned:
        speed = dvt.record.throughput
        if speed is None:
            continue
        static = next((row for row in speed.rows if row.model == "static"), None)
        setup = f"{speed.device}; batch {speed.batch_size}; {speed.dtype}"
        for row in speed.rows:
            name = dvt.record.static.variant if row.model == "static" else f"{dvt.variant}: {row.model}"
            point = {"budget": " at the budget point", "match_static": " at the backbone's accuracy"}
            table.rows.append(
                {
                    "source": "measured",
                    "model": name + point.get(row.point, ""),
                    "cascade": dvt.variant,
                    "key": f"{row.model}_{row.point}",
                    "images_per_s": row.images_per_s,
                    "top1": row.top1,
                    "avg_gmacs": row.avg_gmacs,
                    "setup": setup,
                    "speedup": row.images_per_s / static.images_per_s if static else None,
                    "ideal": static.avg_gmacs / row.avg_gmacs if static and row.avg_gmacs else None,
                }
            )
    base = None
    for name, speed, top1 in DVT_PAPER_SPEED:
        is_static = not name.startswith("DVT")
        base = speed if is_static else base
        table.rows.append(
            {
                "source": "paper",
                "model": name,
                "key": f"paper.{name}",
                "images_per_s": speed,
                "top1": top1,
                "speedup": speed / base if base else None,
                "setup": "2080Ti; batch 128; ImageNet 224 px",
            }
        )
    return table


def dvt_reuse_table(study: Study) -> Table:
    """The reuse ablation of each cascade that ran it: top-1 of each combination, the paper's Δ beside."""
    from pipeline.models.dvt import DVT_PAPER_REUSE_DELTA

    cols = [
        Column("cascade", "Cascade"),
        Column("combination", "Combination", show=False),
        Column("trial", "Trial", show=False),
        Column("feature_reuse", "Feature reuse", "bool"),
        Column("relation_reuse", "Relationship reuse", "bool"),
        Column("val_top1", "Top-1, last exit (%)", "float", 2),
        Column("val_top1_exit1", "Exit 1 (%)", "float", 2),
        Column("val_top1_exit2", "Exit 2 (%)", "float", 2),
        Column("val_top1_exit3", "Exit 3 (%)", "float", 2),
        Column("delta_pts", "Δ vs both on (points)", "float", 2),
        Column("paper_delta_pts", "Paper Δ (about)", "float", 0),
        Column("run_id", "MLflow run", link="run_url", width=8),
        Column("run_url", "MLflow run URL", show=False),
    ]
    table = Table(
        "dvt_reuse",
        "DVT: the reuse ablation",
        "Each combination of feature and relationship reuse trained from scratch by the tune_dvt stage "
        "of the cascades dvt.reuse_ablation names (a short run of dvt.reuse_epochs epochs, one Ray Tune "
        "trial each), validation top-1 per exit. The ablation measures; it chooses nothing (each cascade "
        "keeps the reuse settings it was trained with). The DVT paper reports that dropping both reuses "
        "costs about 4 points and dropping one about 2 (T2T-ViT-12 cascade, ImageNet, full training). Each "
        "row links to its trial's MLflow run (a child of the tuning run).",
        cols,
        row_key="combination",
    )
    for dvt in study.tuned:
        reuse = dvt.record.reuse
        if reuse is None:
            continue
        steps = reuse.steps_per_epoch
        table.caption += (
            f" {dvt.variant}: each trial trained {reuse.epochs} epoch(s)"
            + (f" of at most {steps} optimizer steps" if steps else "")
            + f" on {reuse.workers} worker(s), against the paper's full training: read the differences with"
            " the trial budget in mind."
        )
        trials = sorted(reuse.trials, key=lambda t: (not t.feature_reuse, not t.relation_reuse))
        both = next((t.val_top1 for t in trials if t.feature_reuse and t.relation_reuse), None)
        for t in trials:
            table.rows.append(
                {
                    "cascade": dvt.variant,
                    "combination": f"{dvt.variant}.{t.metric_key}",
                    "trial": t.metric_key,
                    "feature_reuse": t.feature_reuse,
                    "relation_reuse": t.relation_reuse,
                    "val_top1": t.val_top1,
                    **{f"val_top1_exit{k}": v for k, v in enumerate(t.exit_top1, start=1)},
                    "delta_pts": None if both is None else t.val_top1 - both,
                    "paper_delta_pts": DVT_PAPER_REUSE_DELTA[(t.feature_reuse, t.relation_reuse)],
                    "run_id": t.run_id or dvt.run_id,
                    "run_url": dvt.trial_url(study.ui_base, t.run_id or dvt.run_id),
                }
            )
    return table
