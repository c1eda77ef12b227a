"""Ray Tune for DVT: the reuse ablation and the exit thresholds under a MACs budget.

(a) **Reuse settings.** One Tune trial per combination of feature and relationship reuse, each
    running the same :func:`~pipeline.train.loop.fit` as the train stage for ``dvt.reuse_epochs``
    epochs (of at most ``dvt.reuse_steps_per_epoch`` steps, when set: a short budget for the
    demo). With ``dvt.reuse_workers`` > 1 the trial is a Tune function that builds and fits a Ray
    Train ``TorchTrainer`` (the Ray Train V2 pattern; ``Tuner(trainer)`` is not supported); with
    one worker it fits in the trial's own process.
(b) **Thresholds.** On cached per-stage probabilities of the trained cascade over the validation
    split, a seeded split holds out ``dvt.holdout_fraction`` for calibration; Optuna (through Ray
    Tune) searches the two thresholds for the highest calibration accuracy within the budget of
    average MACs per image, and the MSDNet rule's sweep is run on the same samples. Both are then
    scored on the other part, which neither saw.

Every trial is an MLflow child run of one study run (tag ``mlflow.parentRunId``), logged once:
a reuse trial logs its own run (it trains for minutes); threshold trials take milliseconds, so the
driver writes their runs from Tune's results after the search.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.dvt.thresholds import (
    best_under_budget,
    budget_curve,
    evaluate_thresholds,
    holdout_split,
)
from pipeline.train.loop import RunSpec, build_model, fit

log = logging.getLogger(__name__)

REUSE_COMBINATIONS = [
    {"feature_reuse": f, "relation_reuse": r} for f, r in product((True, False), (True, False))
]


def combo_name(combo: dict[str, bool]) -> str:
    on = {True: "on", False: "off"}
    return f"feature={on[combo['feature_reuse']]},relation={on[combo['relation_reuse']]}"


def _child_run(client: Any, parent: str, experiment_id: str, name: str, tags: dict[str, str]) -> str:
    return client.create_run(
        experiment_id, run_name=name, tags={"mlflow.parentRunId": parent, **tags}
    ).info.run_id


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
        from mlflow.entities import Metric
        from ray import tune

        if "val_top1" not in metrics:
            return
        now, epoch = int(time.time() * 1000), int(metrics["epoch"])
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"]
        self.client.log_batch(self.spec.run_id, metrics=batch)
        tune.report(dict(metrics))


def _trial_resources(train: Any) -> dict[str, float]:
    """What a reuse trial asks Tune for: its one worker's share, or nearly nothing when the trial
    only drives a TorchTrainer whose workers ask for their own."""
    if train.num_workers > 1:
        return {"CPU": 0.01}
    return {"CPU": train.cpus_per_worker, "GPU": 1 if train.use_gpu else 0}


def _check_trial_fits(train: Any) -> None:
    """Fail at once, not hang, when one reuse trial alone needs more than the Ray cluster has.

    Under a cluster (``RAY_ADDRESS``) an autoscaler may still add nodes: there it is a warning.
    """
    import os

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
    """A Tune function trainable: fit one reuse combination, report each epoch to Tune.

    One worker: :func:`fit` runs in the trial's process. Several: the trial builds and fits a
    Ray Train ``TorchTrainer`` (DDP) that reports through ``TuneReportCallback``.
    """
    from mlflow.tracking import MlflowClient

    spec = RunSpec.from_dict(config["spec"])
    combo = config["combo"]
    client = MlflowClient(spec.tracking_uri)
    run_id = _child_run(
        client,
        config["parent_run_id"],
        config["experiment_id"],
        combo_name(combo),
        {"dvt_trial": "reuse", **{k: str(v) for k, v in combo.items()}},
    )
    spec = RunSpec(**{**spec.__dict__, "run_id": run_id, "model_kwargs": {**spec.model_kwargs, **combo}})
    status = "FAILED"
    try:
        if spec.train.num_workers == 1:
            fit(spec, _TrialSession(spec, client))
        else:
            _fit_with_trainer(spec, storage_path=config["storage_path"])
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)


def _fit_with_trainer(spec: RunSpec, *, storage_path: str) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train.runner import _worker

    TorchTrainer(
        _worker,
        train_loop_config={"spec": spec.to_dict()},
        torch_config=TorchConfig(backend="nccl" if spec.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=spec.train.num_workers,
            use_gpu=spec.train.use_gpu,
            resources_per_worker={"CPU": spec.train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"reuse-{spec.run_id[:8]}",
            storage_path=storage_path,
            callbacks=[TuneReportCallback()],
        ),
    ).fit()


def threshold_trial(config: dict[str, Any], *, data: dict[str, Any]) -> dict[str, float]:
    """A Tune function trainable: score one pair of thresholds on the calibration samples.

    Scoring takes milliseconds, so the trial leaves MLflow to the driver (one child run per trial,
    written after the search): a database round trip per trial would cost more than the trial.
    """
    thresholds = [config["eta1"], config["eta2"], -math.inf]
    result = evaluate_thresholds(data["probs"], data["labels"], data["stage_macs"], thresholds)
    budget = data["budget"]
    # Infeasible settings rank below every feasible one, closer misses above farther ones.
    score = result.accuracy if result.avg_macs <= budget else -100.0 * result.avg_macs / budget
    return {"score": score, "accuracy": result.accuracy, "avg_macs": result.avg_macs}


def _log_threshold_trials(results: Any, data: dict[str, Any]) -> None:
    """One MLflow child run of the study run per threshold trial, in trial order."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(data["tracking_uri"])
    for result in sorted(results, key=lambda r: r.path or ""):
        if result.error is not None:
            raise RuntimeError(f"threshold trial {result.config} failed: {result.error}")
        eta1, eta2, m = result.config["eta1"], result.config["eta2"], result.metrics
        run_id = _child_run(
            client,
            data["parent_run_id"],
            data["experiment_id"],
            f"eta=({eta1:.3f},{eta2:.3f})",
            {"dvt_trial": "threshold"},
        )
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            params=[Param("eta1", str(eta1)), Param("eta2", str(eta2))],
            metrics=[
                Metric("calib_accuracy", m["accuracy"], now, 0),
                Metric("calib_avg_gmacs", m["avg_macs"] / 1e9, now, 0),
                Metric("score", m["score"], now, 0),
            ],
        )
        client.set_terminated(run_id)


@torch.no_grad()
def stage_probabilities(
    state: dict[str, Any], shards: str, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Per-stage softmax over the validation split from a trained cascade's final weights.

    Returns:
        (probs (stages, samples, classes), labels, MACs of each stage alone).
    """
    from pipeline.data import build_eval_loader, build_transforms
    from pipeline.dvt.inference import collect_stage_probs

    spec = RunSpec.from_dict(state["config"])
    spec = RunSpec(**{**spec.__dict__, "shards": shards})
    model = build_model(spec)
    model.load_state_dict(state["model"])
    model.eval()
    _, eval_tf = build_transforms(spec.train.img_size, spec.train.augment)
    loader, _ = build_eval_loader(shards, rank=0, world_size=1, batch_size=64, transform=eval_tf)
    probs, labels = collect_stage_probs(model, loader, torch.device(device))
    return probs, labels, [float(m) for m in model.stage_macs(spec.train.img_size)]


def threshold_choice(thresholds: Any, scored: Any, **extra: float) -> dict[str, Any]:
    """A chosen set of thresholds as ``best.yaml`` records it, scored on the held-out samples
    (``scored``: a :class:`~pipeline.dvt.thresholds.ThresholdEval` or a budget-curve point)."""
    return {
        "thresholds": [float(t) for t in thresholds],
        **extra,
        "test_accuracy": scored.accuracy,
        "avg_gmacs": scored.avg_macs / 1e9,
        "exit_fractions": scored.exit_fractions.tolist(),
    }


@dataclass(frozen=True)
class TuneResult:
    reuse: dict[str, dict[str, float]]
    best_reuse: str
    msdnet: dict[str, Any]
    optuna: dict[str, Any]
    curve: list[dict[str, Any]]
    stage_gmacs: list[float]


def _search_reuse(
    cfg: Any, base: RunSpec, common: dict[str, Any], combos: list[dict[str, bool]] = REUSE_COMBINATIONS
) -> dict[str, dict[str, float]]:
    """Train ``base`` once per reuse combination (one Tune trial each); val top-1 per combination."""
    from ray import tune

    train = base.train.model_copy(
        update={
            "epochs": cfg.dvt.reuse_epochs,
            "num_workers": cfg.dvt.reuse_workers,
            "warmup_epochs": min(base.train.warmup_epochs, cfg.dvt.reuse_epochs - 1 or 0.5),
            "cooldown_epochs": 0,
            "checkpoint_every_steps": 0,
            "max_steps_per_epoch": cfg.dvt.reuse_steps_per_epoch,
        }
    )
    spec = RunSpec(**{**base.__dict__, "train": train})
    _check_trial_fits(train)
    trainable = tune.with_resources(reuse_trial, _trial_resources(train))
    tuner = tune.Tuner(
        trainable,
        param_space={"spec": spec.to_dict(), "combo": tune.grid_search(combos), **common},
        tune_config=tune.TuneConfig(
            metric="val_top1",
            mode="max",
            max_concurrent_trials=cfg.dvt.max_concurrent_trials,
            reuse_actors=True,  # a new trial skips the process start and imports
        ),
        run_config=tune.RunConfig(name="reuse", storage_path=common["storage_path"]),
    )
    results = tuner.fit()
    table = {}
    for result in results:
        if result.error is not None:
            raise RuntimeError(f"reuse trial {combo_name(result.config['combo'])} failed: {result.error}")
        m = result.metrics
        table[combo_name(result.config["combo"])] = {
            k: float(v) for k, v in m.items() if k.startswith("val_top1")
        }
    return table


def _search_thresholds(cfg: Any, data: dict[str, Any], storage: str) -> dict[str, float]:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(metric="score", mode="max", seed=cfg.dvt.seed)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(threshold_trial, data=data), {"CPU": 0.25}),
        param_space={"eta1": tune.uniform(0.0, 1.0), "eta2": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(
            search_alg=search,
            num_samples=cfg.dvt.threshold_trials,
            max_concurrent_trials=cfg.dvt.max_concurrent_trials,
            reuse_actors=True,  # a trial takes milliseconds; a fresh process per trial took seconds
        ),
        # Status tables only: one block per millisecond trial would bury the stage's log.
        run_config=tune.RunConfig(name="thresholds", storage_path=storage, verbose=1),
    )
    results = tuner.fit()
    _log_threshold_trials(results, data)
    best = results.get_best_result(metric="score", mode="max")
    return {"eta1": best.config["eta1"], "eta2": best.config["eta2"], **best.metrics}


def tune_dvt(
    cfg: Any,
    *,
    state: dict[str, Any],
    shards: str,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    storage: str,
) -> TuneResult:
    """Run both searches; returns every number the stage writes out."""
    base = RunSpec.from_dict(state["config"])
    base = RunSpec(**{**base.__dict__, "shards": shards, "tracking_uri": tracking_uri})
    common = {"parent_run_id": parent_run_id, "experiment_id": experiment_id, "storage_path": storage}

    log.info(
        "reuse ablation: %d trials of %d epoch(s)%s",
        len(REUSE_COMBINATIONS),
        cfg.dvt.reuse_epochs,
        f" of at most {cfg.dvt.reuse_steps_per_epoch} steps" if cfg.dvt.reuse_steps_per_epoch else "",
    )
    reuse = _search_reuse(cfg, base, common)
    best_reuse = max(reuse, key=lambda k: reuse[k]["val_top1"])

    probs, labels, stage_macs = stage_probabilities(state, shards)
    calib, test = holdout_split(labels.shape[0], cfg.dvt.holdout_fraction, cfg.dvt.seed)
    budget = cfg.dvt.budget_gmacs * 1e9
    # The rule's q is chosen on the calibration samples; the curve and the choice are scored on the rest.
    chosen = best_under_budget(
        budget_curve(probs[:, calib], probs[:, calib], labels[calib], stage_macs), budget
    )
    curve = budget_curve(probs[:, calib], probs[:, test], labels[test], stage_macs)
    msdnet = next(p for p in curve if p.q == chosen.q)

    data = {
        "probs": probs[:, calib],
        "labels": labels[calib],
        "stage_macs": stage_macs,
        "budget": budget,
        "tracking_uri": tracking_uri,
        **common,
    }
    log.info(
        "threshold search: %d Optuna trials under %.4g GMACs", cfg.dvt.threshold_trials, cfg.dvt.budget_gmacs
    )
    best = _search_thresholds(cfg, data, storage)
    eta = [best["eta1"], best["eta2"], -math.inf]
    optuna_test = evaluate_thresholds(probs[:, test], labels[test], stage_macs, eta)
    curve_rows = [{"source": "msdnet", **p.to_dict()} for p in curve]
    curve_rows.append(
        {
            "source": "optuna",
            "q": None,
            "thresholds": eta,
            "accuracy": optuna_test.accuracy,
            "avg_macs": optuna_test.avg_macs,
            "exit_fractions": optuna_test.exit_fractions.tolist(),
        }
    )
    return TuneResult(
        reuse=reuse,
        best_reuse=best_reuse,
        msdnet=threshold_choice(msdnet.thresholds, msdnet),
        optuna=threshold_choice(eta, optuna_test, calib_accuracy=best["accuracy"]),
        curve=curve_rows,
        stage_gmacs=[m / 1e9 for m in stage_macs],
    )


def load_final_state(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """The final weights and config logged by a train stage (``checkpoint/model.pt``)."""
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory() as folder:
        path = download_artifacts(
            run_id=run_id, artifact_path="checkpoint/model.pt", dst_path=folder, tracking_uri=tracking_uri
        )
        return torch.load(Path(path), map_location="cpu", weights_only=True)


def run_study(cfg: Any, *, record: dict[str, Any], root: Path, tracking_uri: str) -> tuple[TuneResult, str]:
    """Open the study's MLflow run, start Ray, run both searches and log the summary.

    Returns:
        The result and the study run id.
    """
    import ray
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from pipeline.paths import resolve
    from pipeline.train.runner import _experiment_id, _init_ray

    client = MlflowClient(tracking_uri)
    experiment_id = _experiment_id(client, cfg.tracking.experiment, tracking_uri, root)
    parent = client.create_run(
        experiment_id,
        run_name=f"tune_dvt-{cfg.dvt.variant}",
        tags={"dvc_stage": "tune_dvt", "variant": cfg.dvt.variant, "trained_run_id": record["run_id"]},
    ).info.run_id
    client.log_batch(parent, params=[Param(f"dvt.{k}", str(v)) for k, v in cfg.dvt.model_dump().items()])
    state = load_final_state(tracking_uri, record["run_id"])
    base_storage = cfg.train_for(cfg.dvt.variant).storage_path
    # An object-store URI stays a URI (every node must see the trials' files); a path is the repo's.
    storage = (
        f"{base_storage.rstrip('/')}/tune"
        if "://" in base_storage
        else str(resolve(base_storage, root) / "tune")
    )
    started = _init_ray()
    status = "FAILED"
    try:
        result = tune_dvt(
            cfg,
            state=state,
            shards=state["config"]["shards"],
            tracking_uri=tracking_uri,
            experiment_id=experiment_id,
            parent_run_id=parent,
            storage=storage,
        )
        now = int(time.time() * 1000)
        metrics = [Metric(f"reuse_top1/{k}", v["val_top1"], now, 0) for k, v in result.reuse.items()]
        metrics += [
            Metric(f"{src}_test_top1", getattr(result, src)["test_accuracy"], now, 0)
            for src in ("msdnet", "optuna")
        ]
        metrics += [
            Metric(f"{src}_avg_gmacs", getattr(result, src)["avg_gmacs"], now, 0)
            for src in ("msdnet", "optuna")
        ]
        client.log_batch(
            parent,
            metrics=[
                Metric(m.key.replace(",", "_").replace("=", "-"), m.value, m.timestamp, 0) for m in metrics
            ],
        )
        status = "FINISHED"
    finally:
        client.set_terminated(parent, status=status)
        if started:
            ray.shutdown()
    return result, parent


def write_outputs(result: TuneResult, cfg: Any, out: Path, *, parent_run_id: str) -> None:
    """``best.yaml``, ``curve.csv``, ``curve.png`` and ``metrics.json`` under ``out``."""
    import csv
    import json

    import matplotlib
    import yaml

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    best = {
        "variant": cfg.dvt.variant,
        "mlflow_run_id": parent_run_id,
        "budget_gmacs": cfg.dvt.budget_gmacs,
        "stage_gmacs": result.stage_gmacs,
        "reuse": {
            "epochs": cfg.dvt.reuse_epochs,
            "steps_per_epoch": cfg.dvt.reuse_steps_per_epoch,
            "workers": cfg.dvt.reuse_workers,
            "best": result.best_reuse,
            "val_top1": result.reuse,
        },
        "thresholds": {"msdnet": result.msdnet, "optuna": result.optuna},
    }
    (out / "best.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(best, default=str)), sort_keys=False))
    with open(out / "curve.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "q", "eta1", "eta2", "accuracy", "avg_gmacs", "exit1", "exit2", "exit3"])
        for row in result.curve:
            eta = row["thresholds"]
            writer.writerow(
                [
                    row["source"],
                    row["q"],
                    eta[0],
                    eta[1],
                    row["accuracy"],
                    row["avg_macs"] / 1e9,
                    *row["exit_fractions"],
                ]
            )
    metrics = {
        "budget_gmacs": cfg.dvt.budget_gmacs,
        "msdnet_test_top1": result.msdnet["test_accuracy"],
        "msdnet_avg_gmacs": result.msdnet["avg_gmacs"],
        "optuna_test_top1": result.optuna["test_accuracy"],
        "optuna_avg_gmacs": result.optuna["avg_gmacs"],
        "reuse_val_top1": {k: v["val_top1"] for k, v in result.reuse.items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    sweep = sorted((r for r in result.curve if r["source"] == "msdnet"), key=lambda r: r["avg_macs"])
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.plot(
        [r["avg_macs"] / 1e9 for r in sweep],
        [r["accuracy"] for r in sweep],
        "o-",
        ms=3,
        label="DVT, MSDNet thresholds (sweep)",
    )
    ax.scatter(
        [result.optuna["avg_gmacs"]],
        [result.optuna["test_accuracy"]],
        marker="*",
        s=160,
        color="C3",
        label="Optuna thresholds",
        zorder=3,
    )
    ax.scatter(
        [result.msdnet["avg_gmacs"]],
        [result.msdnet["test_accuracy"]],
        marker="D",
        s=50,
        color="C2",
        label="MSDNet choice under budget",
        zorder=3,
    )
    ax.axvline(cfg.dvt.budget_gmacs, color="grey", ls="--", lw=1, label="budget")
    ax.set_xlabel("average MACs per image (G, all matmuls)")
    ax.set_ylabel("top-1 on the held-out part (%)")
    ax.set_title(f"{cfg.dvt.variant}: accuracy against average cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curve.png")
    plt.close(fig)
