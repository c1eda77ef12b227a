"""``results/<variant>.json``: one variant's trainings, one per seed, and their figures over the seeds.

The train stage writes it (DVC tracks it as a metric); the report reads the MLflow runs it names.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import StudyConfig
from pipeline.stats import spread

#: The figures of each run that the results file keeps and summarises over seeds.
RUN_FIGURES = (
    "val_top1", "val_top5", "ema_val_top1", "ema_val_top5",
    "best_val_top1", "best_val_top5", "best_epoch", "images_per_s",
)  # fmt: skip


def results_record(cfg: StudyConfig, variant: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``results/<variant>.json``: every seed's run and figures, and mean/std/n over the seeds.

    ``top1``/``top5`` are the reported figure: the last epoch of the reported weights (the EMA's when
    ``ema_decay`` is set, as the authors evaluate them). ``best_top1`` is the best epoch's, picked
    on the same validation images it is measured on, hence optimistic; the report shows the last
    epoch unless ``report.epoch`` says ``best``.
    """
    first, tcfg = runs[0], cfg.train_for(variant)
    ema = tcfg.ema_decay is not None
    figures = {
        "top1": "ema_val_top1" if ema else "val_top1",
        "top5": "ema_val_top5" if ema else "val_top5",
        "best_top1": "best_val_top1",
        "best_top5": "best_val_top5",
        "images_per_s": "images_per_s",
    }
    summary = {}
    for name, key in figures.items():
        s = spread(r.get(key) for r in runs)
        summary[name] = {**s.to_dict(), "text": s.text(), "metric": key} if s else None
    return {
        "variant": variant,
        "model": first["model"],
        "run_id": first["run_id"],  # the first seed's run (its page links the others by tag)
        "experiment": cfg.tracking.experiment,
        "epochs": tcfg.epochs,
        "img_size": tcfg.img_size,
        "seeds": [r["seed"] for r in runs],
        "weights": "ema" if ema else "raw",
        "reported": "last epoch",
        "val_top1": summary["top1"]["mean"] if summary["top1"] else None,
        "val_top5": summary["top5"]["mean"] if summary["top5"] else None,
        "val_top1_std": summary["top1"]["std"] if summary["top1"] else None,
        "best_val_top1": summary["best_top1"]["mean"] if summary["best_top1"] else None,
        "n": len(runs),
        "params_m": first["params_m"],
        "macs_g": first["macs_g"],
        "images_per_s": summary["images_per_s"]["mean"] if summary["images_per_s"] else None,
        "summary": summary,
        "runs": runs,
    }
