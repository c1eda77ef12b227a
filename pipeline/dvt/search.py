"""Ray Tune searches for DVT: the reuse ablation and the exit thresholds under a MACs budget.

* :func:`search_reuse`: one Tune trial per combination of feature and relationship reuse, each
  running the shared :func:`~pipeline.train.loop.fit` for ``dvt.reuse_epochs`` epochs (of at most
  ``dvt.reuse_steps_per_epoch`` steps when set). With ``dvt.reuse_workers`` > 1 the trial builds and
  fits a Ray Train ``TorchTrainer`` (:func:`~pipeline.train.ray_driver.build_trainer`; the Ray Train
  V2 pattern, ``Tuner(trainer)`` is not supported); with one worker it fits in its own process. The
  ablation is a measurement, as in the paper: it chooses nothing.
* :func:`search_thresholds`: Optuna (through Ray Tune) searches the thresholds for the highest
  accuracy on the **calibration** images whose average MACs fit the budget. Its trials are given only
  the calibration images' softmax outputs.

Every trial is an MLflow child run of the tuning run (tag ``mlflow.parentRunId``), logged once: a
reuse trial logs its own run (it trains for minutes); threshold trials take milliseconds, so the
driver writes their runs from Tune's results after the search.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

import numpy as np
import torch

from pipeline.config import DVTConfig, TrainConfig
from pipeline.dvt.records import ReuseTrial
from pipeline.dvt.thresholds import evaluate_thresholds
from pipeline.tracking import child_run, log_metrics, tracked_run
from pipeline.train.loop import RunSpec, fit

log = logging.getLogger(__name__)

__all__ = ["REUSE_COMBINATIONS", "ReuseCombination", "TuneContext", "search_reuse", "search_thresholds"]


@dataclass(frozen=True)
class ReuseCombination:
    """One setting of the two reuse flags."""

    feature_reuse: bool
    relation_reuse: bool

    @property
    def name(self) -> str:
        """The trial's MLflow run name."""
        on = {True: "on", False: "off"}
        return f"feature reuse {on[self.feature_reuse]}, relation reuse {on[self.relation_reuse]}"


REUSE_COMBINATIONS = [ReuseCombination(f, r) for f, r in product((True, False), (True, False))]


@dataclass(frozen=True)
class TuneContext:
    """Where the trials log and store: the tuning run, its experiment, the MLflow store, Ray storage."""

    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    storage_path: str


class _TrialSession:
    """One in-process rank inside a Tune trial: epoch metrics go to Tune and to the trial's MLflow run.

    Used when a reuse trial has one worker: DDP has nothing to do then, and running :func:`fit`
    in the trial's own process saves starting a Ray Train controller and a worker per trial.
    """

    def __init__(self, spec: RunSpec, client: Any) -> None:
        use_gpu = spec.train.use_gpu and torch.cuda.is_available()
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cuda:0" if use_gpu else "cpu")
        if not use_gpu:
            torch.set_num_threads(spec.train.torch_threads)
        self.spec, self.client = spec, client

    def checkpoint(self) -> None:
        return None  # a failed trial starts over: it is short

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        from ray import tune

        if "val_top1" not in metrics:
            return
        values = {k: v for k, v in metrics.items() if k != "epoch"}
        log_metrics(self.client, self.spec.run_id, values, step=int(metrics["epoch"]))
        tune.report(dict(metrics))


def _trial_resources(train: TrainConfig) -> dict[str, float]:
    """What a reuse trial asks Tune for: its one worker's share, or nearly nothing when the trial
    only drives a TorchTrainer whose workers ask for their own."""
    if train.num_workers > 1:
        return {"CPU": 0.01}
    return {"CPU": train.cpus_per_worker, "GPU": 1 if train.use_gpu else 0}


def _check_trial_fits(train: TrainConfig) -> None:
    """Fail at once, not hang, when one reuse trial alone needs more than the Ray cluster has.

    Under a cluster (``RAY_ADDRESS``) an autoscaler may still add nodes: there it is a warning.
    """
    import ray

    need = _trial_resources(train)
    if train.num_workers > 1:  # the trial's own sliver plus the TorchTrainer's workers
        need = {
            "CPU": need["CPU"] + train.num_workers * train.cpus_per_worker,
            "GPU": train.num_workers if train.use_gpu else 0,
        }
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if v > have.get(k, 0) + 1e-9}
    if not short:
        return
    detail = ", ".join(f"{v:g} {k} (the cluster has {h:g})" for k, (v, h) in short.items())
    msg = (
        f"one DVT reuse trial needs {detail}: dvt.reuse_workers={train.num_workers} workers of "
        f"train.cpus_per_worker={train.cpus_per_worker:g} CPU(s) each"
        + (" plus 0.01 CPU for the Tune trial that drives them" if train.num_workers > 1 else "")
        + ". Lower dvt.reuse_workers or train.cpus_per_worker in params.yaml, or use a larger cluster."
    )
    if os.environ.get("RAY_ADDRESS"):
        log.warning("%s Waiting for the cluster to grow.", msg)
    else:
        raise ValueError(msg)


def reuse_trial(config: dict[str, Any]) -> None:
    """A Tune function trainable: fit one reuse combination, report each epoch to Tune."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.ray_driver import build_trainer

    spec = RunSpec.from_dict(config["spec"])
    combo = ReuseCombination(**config["combo"])
    context = TuneContext(**config["context"])
    client = MlflowClient(context.tracking_uri)
    flags = {"feature_reuse": combo.feature_reuse, "relation_reuse": combo.relation_reuse}
    run_id = child_run(
        client,
        context.parent_run_id,
        context.experiment_id,
        combo.name,
        {"dvt_trial": "reuse", **{k: str(v) for k, v in flags.items()}},
    )
    spec = replace(spec, run_id=run_id, model_kwargs={**spec.model_kwargs, **flags})
    with tracked_run(client, run_id):
        if spec.train.num_workers == 1:
            fit(spec, _TrialSession(spec, client))
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            build_trainer(
                spec,
                name=f"reuse-{run_id[:8]}",
                storage_path=context.storage_path,
                callbacks=[TuneReportCallback()],
            ).fit()


def search_reuse(
    dvt: DVTConfig,
    base: RunSpec,
    context: TuneContext,
    combos: list[ReuseCombination] = REUSE_COMBINATIONS,
) -> list[ReuseTrial]:
    """Train ``base`` once per reuse combination (one Tune trial each).

    Returns:
        One trial per combination, in ``combos`` order: last-exit and per-exit validation top-1.
    """
    from mlflow.tracking import MlflowClient
    from ray import tune

    train = base.train.model_copy(
        update={
            "epochs": dvt.reuse_epochs,
            "num_workers": dvt.reuse_workers,
            "warmup_epochs": min(base.train.warmup_epochs, dvt.reuse_epochs - 1 or 0.5),
            "cooldown_epochs": 0,
            "checkpoint_every_steps": 0,
            "max_steps_per_epoch": dvt.reuse_steps_per_epoch,
        }
    )
    spec = replace(base, train=train)
    _check_trial_fits(train)
    tuner = tune.Tuner(
        tune.with_resources(reuse_trial, _trial_resources(train)),
        param_space={
            "spec": spec.to_dict(),
            "combo": tune.grid_search([c.__dict__ for c in combos]),
            "context": context.__dict__,
        },
        tune_config=tune.TuneConfig(
            metric="val_top1",
            mode="max",
            max_concurrent_trials=dvt.max_concurrent_trials,
            reuse_actors=True,  # a new trial skips the process start and imports
        ),
        run_config=tune.RunConfig(name="reuse", storage_path=context.storage_path),
    )
    results = tuner.fit()
    by_combo = {}
    for result in results:
        combo = ReuseCombination(**result.config["combo"])
        if result.error is not None:
            raise RuntimeError(f"reuse trial {combo.name} failed: {result.error}")
        by_combo[combo] = result.metrics
    client = MlflowClient(context.tracking_uri)
    runs = {
        r.info.run_name: r.info.run_id
        for r in client.search_runs(
            [context.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{context.parent_run_id}' and tags.dvt_trial = 'reuse'",
        )
    }
    trials = []
    for combo in combos:
        m = by_combo[combo]
        exits = sorted(k for k in m if k.startswith("val_top1_exit"))
        trials.append(
            ReuseTrial(
                feature_reuse=combo.feature_reuse,
                relation_reuse=combo.relation_reuse,
                val_top1=float(m["val_top1"]),
                exit_top1=[float(m[k]) for k in exits],
                run_id=runs.get(combo.name, ""),
            )
        )
    return trials


def threshold_trial(config: dict[str, Any], *, data: dict[str, Any]) -> dict[str, float]:
    """A Tune function trainable: score one pair of thresholds on the calibration images."""
    thresholds = [config["eta1"], config["eta2"], -math.inf]
    result = evaluate_thresholds(data["probs"], data["labels"], data["stage_macs"], thresholds)
    budget = data["budget"]
    # Infeasible settings rank below every feasible one, closer misses above farther ones.
    score = result.accuracy if result.avg_macs <= budget else -100.0 * result.avg_macs / budget
    return {"score": score, "accuracy": result.accuracy, "avg_macs": result.avg_macs}


def _log_threshold_trials(results: Any, context: TuneContext) -> None:
    """One MLflow child run of the tuning run per threshold trial, in trial order."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(context.tracking_uri)
    for result in sorted(results, key=lambda r: r.path or ""):
        if result.error is not None:
            raise RuntimeError(f"threshold trial {result.config} failed: {result.error}")
        eta1, eta2, m = result.config["eta1"], result.config["eta2"], result.metrics
        run_id = child_run(
            client,
            context.parent_run_id,
            context.experiment_id,
            f"eta=({eta1:.3f},{eta2:.3f})",
            {"dvt_trial": "threshold"},
        )
        client.log_batch(run_id, params=[Param("eta1", str(eta1)), Param("eta2", str(eta2))])
        log_metrics(
            client,
            run_id,
            {"calib_accuracy": m["accuracy"], "calib_avg_gmacs": m["avg_macs"] / 1e9, "score": m["score"]},
        )
        client.set_terminated(run_id)


def search_thresholds(
    dvt: DVTConfig,
    calib_probs: np.ndarray,
    calib_labels: np.ndarray,
    stage_macs: list[float],
    budget_macs: float,
    context: TuneContext,
) -> list[float]:
    """Optuna's best (eta_1, eta_2) on the calibration images within ``budget_macs``.

    Args:
        dvt: Trials, concurrency and the seed.
        calib_probs: Softmax outputs of every stage on the calibration images (stages, N, classes).
        calib_labels: Their labels.
        stage_macs: MACs of each stage alone.
        budget_macs: Average MACs per image allowed.
        context: Where the trials log.

    Returns:
        The thresholds, the last -inf.
    """
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    if calib_probs.shape[0] != 3:
        raise ValueError(f"the threshold search covers 3-stage cascades, got {calib_probs.shape[0]} stages")
    data = {"probs": calib_probs, "labels": calib_labels, "stage_macs": stage_macs, "budget": budget_macs}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(threshold_trial, data=data), {"CPU": 0.25}),
        param_space={"eta1": tune.uniform(0.0, 1.0), "eta2": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(metric="score", mode="max", seed=dvt.seed),
            num_samples=dvt.threshold_trials,
            max_concurrent_trials=dvt.max_concurrent_trials,
            reuse_actors=True,  # a trial takes milliseconds; a fresh process per trial took seconds
        ),
        # Status tables only: one block per millisecond trial would bury the stage's log.
        run_config=tune.RunConfig(name="thresholds", storage_path=context.storage_path, verbose=1),
    )
    results = tuner.fit()
    _log_threshold_trials(results, context)
    best = results.get_best_result(metric="score", mode="max")
    return [float(best.config["eta1"]), float(best.config["eta2"]), -math.inf]
