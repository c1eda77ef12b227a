"""One ``tune_dvt@<variant>`` stage: tune a trained cascade, score it beside its static backbone, time it.

1. The trained cascade (and the static backbone of its family, ``dvt.backbones``) are loaded from
   their training runs' final weights in MLflow.
2. Their softmax outputs are computed on the calibration images and on the reported images
   (:mod:`pipeline.dvt.images`); everything below that *chooses* looks only at the calibration set.
3. The MSDNet sweep, the budget point, Optuna's thresholds (:mod:`pipeline.dvt.search`) and the
   point matching the backbone's calibration accuracy are chosen and scored on both sets.
4. The reuse ablation runs when ``dvt.reuse_ablation`` names the cascade.
5. Throughput of early exit, simulate-all and the backbone is measured on one batch of reported
   images (:mod:`pipeline.dvt.speed`).

Everything goes into one MLflow run ``tune_dvt-<variant>`` (trials as its children) and one
:class:`~pipeline.dvt.records.TuneRecord`, written with ``curve.csv`` and ``metrics.json`` under
``results/dvt/<variant>/``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import StudyConfig
from pipeline.dvt.images import ImageSet, image_sets, iter_batches, predict
from pipeline.dvt.points import best_within, cheapest_reaching, score_point, sweep
from pipeline.dvt.records import ReuseAblation, SpeedRow, StaticScore, Throughput, TuneRecord
from pipeline.dvt.search import TuneContext, search_reuse, search_thresholds
from pipeline.storage import atomic_write
from pipeline.tracking import experiment_id, log_metrics, tracked_run
from pipeline.train.loop import RunSpec, build_model

log = logging.getLogger(__name__)

__all__ = ["load_final_state", "tune_cascade", "write_outputs"]

RECORD, CURVE, METRICS = "best.yaml", "curve.csv", "metrics.json"


def load_final_state(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """The final weights and config logged by a train stage (``checkpoint/model.pt``)."""
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory() as folder:
        path = download_artifacts(
            run_id=run_id, artifact_path="checkpoint/model.pt", dst_path=folder, tracking_uri=tracking_uri
        )
        return torch.load(Path(path), map_location="cpu", weights_only=True)


def _load_model(state: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, RunSpec]:
    spec = RunSpec.from_dict(state["config"])
    model = build_model(spec)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), spec


def _read_record(results: Path, variant: str, role: str) -> dict[str, Any]:
    path = results / f"{variant}.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing: run train@{variant} first ({role}; dvc repro)")
    return json.loads(path.read_text())


def _outputs(
    model: torch.nn.Module, shards: str, images: ImageSet, spec: RunSpec, device: torch.device, verify: bool
):
    from pipeline.data import build_transforms

    _, eval_tf = build_transforms(spec.train.img_size, spec.train.augment)
    batches = iter_batches(shards, images, eval_tf, batch_size=64, verify_sha256=verify)
    return predict(model, batches, device)


def _speed_batch(shards: str, reported: ImageSet, spec: RunSpec, size: int, verify: bool) -> torch.Tensor:
    """The first ``size`` reported images (fewer if fewer are reported)."""
    from pipeline.data import build_transforms

    _, eval_tf = build_transforms(spec.train.img_size, spec.train.augment)
    subset = ImageSet(reported.split, reported.indices[:size])
    batches = iter_batches(shards, subset, eval_tf, batch_size=size, verify_sha256=verify)
    return torch.cat([images for images, _ in batches])


def _throughput(
    cfg: StudyConfig,
    cascade: torch.nn.Module,
    static: torch.nn.Module | None,
    batch: torch.Tensor,
    stage_macs: list[float],
    points: dict[str, Any],
    static_score: StaticScore | None,
    device: torch.device,
) -> Throughput:
    from pipeline.dvt.inference import early_exit
    from pipeline.dvt.speed import device_name, time_early_exit, time_simulate_all, time_static

    dvt = cfg.dvt
    batch = batch.to(device)
    rows = []
    for name, point in points.items():
        if point is None:
            continue
        exits = early_exit(cascade, batch, point.thresholds, stage_macs)
        fractions = torch.bincount(exits.exits.cpu(), minlength=cascade.num_exits) / batch.shape[0]
        gmacs = float(exits.macs.mean()) / 1e9
        for kind, fn in (
            (
                "early_exit",
                lambda p=point: time_early_exit(
                    cascade, batch, p.thresholds, stage_macs, dvt.speed_warmup, dvt.speed_repeats
                ),
            ),
            (
                "simulate_all",
                lambda p=point: time_simulate_all(
                    cascade, batch, p.thresholds, dvt.speed_warmup, dvt.speed_repeats
                ),
            ),
        ):
            rows.append(
                SpeedRow(
                    kind,
                    name,
                    fn(),
                    point.accuracy,
                    gmacs if kind == "early_exit" else sum(stage_macs) / 1e9,
                    fractions.tolist(),
                )
            )
    if static is not None and static_score is not None:
        speed = time_static(static, batch, dvt.speed_warmup, dvt.speed_repeats)
        rows.append(SpeedRow("static", "full", speed, static_score.accuracy, static_score.gmacs))
    return Throughput(
        device=device_name(device),
        dtype=str(batch.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        batch_size=int(batch.shape[0]),
        warmup=dvt.speed_warmup,
        repeats=dvt.speed_repeats,
        rows=rows,
    )


def _metrics(record: TuneRecord) -> dict[str, float]:
    """The record's headline numbers under fixed MLflow/DVC metric names."""
    out = {
        "calibration_images": record.calibration_images,
        "reported_images": record.reported_images,
        "budget_gmacs": record.budget_gmacs,
    }
    named = {"msdnet": record.msdnet, "optuna": record.optuna, "match_static": record.match_static}
    for name, point in named.items():
        if point is not None:
            out |= {
                f"{name}_top1": point.accuracy,
                f"{name}_avg_gmacs": point.avg_gmacs,
                f"{name}_calib_top1": point.calib_accuracy,
            }
    for k, top1 in enumerate(record.exit_top1, start=1):
        out[f"exit{k}_top1"] = top1
    if record.static is not None:
        out |= {"static_top1": record.static.accuracy, "static_calib_top1": record.static.calib_accuracy}
    for trial in record.reuse.trials if record.reuse else []:
        out[f"reuse_top1_{trial.metric_key}"] = trial.val_top1
    for row in record.throughput.rows if record.throughput else []:
        out[f"images_per_s_{row.model}_{row.point}"] = row.images_per_s
    return out


def tune_cascade(
    cfg: StudyConfig, variant: str, *, root: Path, results: Path, tracking_uri: str
) -> TuneRecord:
    """Tune, score and time the trained cascade ``variant``; log it all to one MLflow run.

    Raises:
        ValueError: A needed training result is missing, or the image sets cannot be drawn.
    """
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from pipeline.paths import resolve_state as resolve  # the checkout, also under dvc exp run --temp
    from pipeline.train.ray_driver import ray_running

    dvt = cfg.dvt
    trained = _read_record(results, variant, "the cascade to tune")
    backbone = dvt.backbones.get(variant)
    static_record = _read_record(results, backbone, f"the static backbone of {variant}") if backbone else None

    client = MlflowClient(tracking_uri)
    experiment = experiment_id(client, cfg.tracking.experiment, tracking_uri, root)
    tags = {"dvc_stage": f"tune_dvt@{variant}", "variant": variant, "trained_run_id": trained["run_id"]}
    if static_record:
        tags["static_run_id"] = static_record["run_id"]
    parent = client.create_run(experiment, run_name=f"tune_dvt-{variant}", tags=tags).info.run_id
    params = {f"dvt.{k}": v for k, v in dvt.model_dump().items()} | {
        "dvt.budget_for_variant": dvt.budget_for(variant)
    }
    client.log_batch(parent, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    base_storage = cfg.train_for(variant).storage_path
    # An object-store URI stays a URI (every node must see the trials' files); a path is the repo's.
    storage = (
        f"{base_storage.rstrip('/')}/tune/{variant}"
        if "://" in base_storage
        else str(resolve(base_storage, root) / "tune" / variant)
    )
    context = TuneContext(parent, experiment, tracking_uri, storage)

    with tracked_run(client, parent):
        use_gpu = cfg.train_for(variant).use_gpu and torch.cuda.is_available()
        device = torch.device("cuda" if use_gpu else "cpu")
        cascade, spec = _load_model(load_final_state(tracking_uri, trained["run_id"]), device)
        shards = spec.shards
        verify = cfg.data.shards.verify_sha256  # this stage's param, not the one the cascade trained with
        calib_set, reported_set = image_sets(dvt, shards)
        log.info(
            "%s: calibrating on %d %s images, reporting on %d val images",
            variant,
            len(calib_set),
            calib_set.split,
            len(reported_set),
        )
        calib = _outputs(cascade, shards, calib_set, spec, device, verify)
        reported = _outputs(cascade, shards, reported_set, spec, device, verify)
        stage_macs = [float(m) for m in cascade.stage_macs(spec.train.img_size)]

        static = static_score = None
        if backbone:
            static, static_spec = _load_model(load_final_state(tracking_uri, static_record["run_id"]), device)
            from pipeline.models.cost import count_macs

            s_calib, s_rep = (
                _outputs(static, shards, s, static_spec, device, verify) for s in (calib_set, reported_set)
            )
            static_score = StaticScore(
                variant=backbone,
                model=static_spec.model,
                run_id=static_record["run_id"],
                gmacs=count_macs(static, static_spec.train.img_size) / 1e9,
                calib_accuracy=100.0 * float(np.mean(s_calib[0][0].argmax(-1) == s_calib[1])),
                accuracy=100.0 * float(np.mean(s_rep[0][0].argmax(-1) == s_rep[1])),
            )

        budget = dvt.budget_for(variant)
        curve = sweep(calib, reported, stage_macs)
        msdnet = best_within(curve, budget)
        if msdnet is None:
            cheapest = min(p.calib_avg_gmacs for p in curve)
            raise ValueError(
                f"no threshold setting of {variant} fits dvt.budget_gmacs={budget:g} G on the calibration "
                f"images; the cheapest needs {cheapest:.4g} G: raise the budget"
            )
        with ray_running():
            log.info("%s: %d Optuna trials under %.4g GMACs", variant, dvt.threshold_trials, budget)
            eta = search_thresholds(dvt, *calib, stage_macs, budget * 1e9, context)
            reuse = None
            if variant in dvt.reuse_ablation:
                base = replace(
                    spec, shards=shards, tracking_uri=tracking_uri, run_id=None, verify_sha256=verify
                )
                trials = search_reuse(dvt, base, context)
                reuse = ReuseAblation(dvt.reuse_epochs, dvt.reuse_steps_per_epoch, dvt.reuse_workers, trials)
        match = cheapest_reaching(curve, static_score.calib_accuracy) if static_score else None
        record = TuneRecord(
            variant=variant,
            model=spec.model,
            run_id=parent,
            trained_run_id=trained["run_id"],
            img_size=spec.train.img_size,
            calibration=dvt.calibration,
            calibration_images=len(calib_set),
            reported_images=len(reported_set),
            budget_gmacs=budget,
            stage_gmacs=[m / 1e9 for m in stage_macs],
            exit_top1=[100.0 * float(np.mean(p.argmax(-1) == reported[1])) for p in reported[0]],
            curve=curve,
            msdnet=msdnet,
            optuna=score_point(eta, calib, reported, stage_macs),
            match_static=match,
            static=static_score,
            reuse=reuse,
        )
        batch = _speed_batch(shards, reported_set, spec, dvt.speed_batch, verify)
        log.info("%s: timing on a batch of %d reported images", variant, batch.shape[0])
        speed = _throughput(
            cfg,
            cascade,
            static,
            batch,
            stage_macs,
            {"budget": msdnet, "match_static": match},
            static_score,
            device,
        )
        record = replace(record, throughput=speed)
        client.log_batch(
            parent,
            params=[
                Param("speed.device", speed.device),
                Param("speed.dtype", speed.dtype),
                Param("speed.threads", str(speed.threads)),
                Param("speed.batch_size", str(speed.batch_size)),
            ],
        )
        log_metrics(client, parent, _metrics(record))
    return record


def write_outputs(record: TuneRecord, out: Path) -> None:
    """``best.yaml`` (the record), ``curve.csv`` (for ``dvc plots``) and ``metrics.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    record.write(out / RECORD)
    fh = io.StringIO(newline="")  # the rows, then one atomic write
    writer = csv.writer(fh)
    writer.writerow(
        [
            "q",
            "eta1",
            "eta2",
            "calib_accuracy",
            "calib_avg_gmacs",
            "accuracy",
            "avg_gmacs",
            *(f"exit{k + 1}" for k in range(len(record.stage_gmacs))),
        ]
    )
    for p in record.curve:
        writer.writerow(
            [
                p.q,
                *p.thresholds[:2],
                p.calib_accuracy,
                p.calib_avg_gmacs,
                p.accuracy,
                p.avg_gmacs,
                *p.exit_fractions,
            ]
        )
    atomic_write(out / CURVE, fh.getvalue())
    atomic_write(out / METRICS, json.dumps(_metrics(record), indent=2) + "\n")
