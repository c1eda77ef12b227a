"""DVT at inference: early exit through the cascade and the thresholds that steer it.

:mod:`pipeline.dvt.inference` runs a :class:`~pipeline.models.dvt.DynamicVisionTransformer` with true
batched early exit (and the authors' "run every stage" simulation); :mod:`pipeline.dvt.thresholds`
(numpy only) calibrates the exit thresholds for a budget and evaluates them. The model itself lives
in :mod:`pipeline.models.dvt`.
"""

from pipeline.dvt.inference import (
    EarlyExit,
    all_stage_logits,
    collect_stage_probs,
    early_exit,
    evaluate_early_exit,
)
from pipeline.dvt.thresholds import (
    CurvePoint,
    ThresholdEval,
    best_under_budget,
    budget_curve,
    calibrate_thresholds,
    evaluate_thresholds,
    exit_proportions,
    exit_stages,
    holdout_split,
    proportion_sweep,
)

__all__ = [
    "CurvePoint",
    "EarlyExit",
    "ThresholdEval",
    "all_stage_logits",
    "best_under_budget",
    "budget_curve",
    "calibrate_thresholds",
    "collect_stage_probs",
    "early_exit",
    "evaluate_early_exit",
    "evaluate_thresholds",
    "exit_proportions",
    "exit_stages",
    "holdout_split",
    "proportion_sweep",
]
