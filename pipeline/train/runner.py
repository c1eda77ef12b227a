"""The driver of one training: MLflow run, Ray Train ``TorchTrainer`` over N workers, result file.

The driver (the DVC stage's process) checks the tracking store, opens the MLflow run and logs the
resolved params, tags, parameter count and MACs before any worker starts; workers rebuild the
:class:`~pipeline.train.loop.RunSpec` and call the same :func:`~pipeline.train.loop.fit` the
single-process tests call, rank 0 logging per-epoch metrics into that run. A local Ray instance
is started unless ``RAY_ADDRESS`` names a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import StudyConfig, params_hash
from pipeline.paths import resolve
from pipeline.shards import MANIFEST, read_manifest
from pipeline.tracking import check_tracking, file_sha256, flatten, git_state, tracking_uri
from pipeline.train.loop import RunSpec, build_model, fit

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


class TrainingFailed(RuntimeError):
    """The Ray training run ended in an error; the MLflow run is marked FAILED."""


def _log_epoch(spec: RunSpec, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    if not spec.run_id:
        return
    now, step = int(time.time() * 1000), int(metrics["epoch"])
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]
    MlflowClient(spec.tracking_uri).log_batch(spec.run_id, metrics=batch)


class RaySession:
    """A Ray Train worker as seen by :func:`fit`: rank 0 checkpoints and logs to MLflow."""

    def __init__(self, spec: RunSpec) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.spec = spec
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        use_gpu = spec.train.use_gpu and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{ctx.get_local_rank()}" if use_gpu else "cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(spec.train.torch_threads)

    def checkpoint(self) -> dict[str, Any] | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as folder:
            return torch.load(Path(folder) / STATE_FILE, map_location=self.device, weights_only=True)

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        import ray.train

        # ray.train.report is a barrier: every rank calls it once per epoch; only rank 0 passes a checkpoint.
        if self.rank != 0 or state is None:
            ray.train.report(metrics)
            return
        _log_epoch(self.spec, metrics)
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state, Path(folder) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _worker(config: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = RunSpec.from_dict(config["spec"])
    fit(spec, RaySession(spec))


def _init_ray(cfg_cpus: float) -> bool:
    """Connect to ``RAY_ADDRESS`` or start a local instance; returns whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return True
    log.info("starting a local Ray instance")
    ray.init(log_to_driver=True, num_cpus=max(int(cfg_cpus), os.cpu_count() or 1))
    return True


def train_variant(cfg: StudyConfig, variant: str, *, root: Path, results_dir: Path) -> dict[str, Any]:
    """Train one variant on Ray, track it in MLflow, and write ``results_dir/<variant>.json``.

    Returns:
        The result record (also written to the JSON file).

    Raises:
        TrackingUnavailable: the MLflow store cannot be reached (before anything starts).
        TrainingFailed: a worker raised; the MLflow run is marked FAILED.
    """
    import mlflow
    import ray
    from mlflow.tracking import MlflowClient
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.models.cost import count_macs, count_params

    vcfg, tcfg = cfg.variants[variant], cfg.train_for(variant)
    shards = resolve(cfg.data.shards.output, root)
    manifest = read_manifest(shards)
    uri = tracking_uri(root)
    check_tracking(uri)
    spec = RunSpec(
        variant=variant,
        model=vcfg.model,
        train=tcfg,
        shards=str(shards),
        num_classes=len(manifest["classes"]),
        model_kwargs=dict(vcfg.model_kwargs),
        tracking_uri=uri,
    )

    model = build_model(spec)  # fails here, in seconds, on a bad model name or kwargs
    n_all, n_trainable = count_params(model)
    macs = count_macs(model, tcfg.img_size)
    del model

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        location = (root / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        experiment_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    phash = params_hash(tcfg, vcfg, cfg.data)
    tags = {
        **git_state(root),
        "variant": variant,
        "model": vcfg.model,
        "dvc_stage": f"train@{variant}",
        "params_hash": phash,
        "data_manifest_sha256": file_sha256(shards / MANIFEST),
    }
    if os.environ.get("RAY_JOB_ID"):
        tags["ray_job_id"] = os.environ["RAY_JOB_ID"]
    run = client.create_run(experiment_id, run_name=variant, tags=tags)
    run_id = run.info.run_id
    spec = RunSpec(**{**spec.__dict__, "run_id": run_id})
    params = flatten(
        {
            "variant": variant,
            "model": vcfg.model,
            "model_kwargs": vcfg.model_kwargs,
            "train": tcfg.model_dump(mode="json"),
            "num_classes": spec.num_classes,
        }
    )
    from mlflow.entities import Metric, Param

    client.log_batch(
        run_id,
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        metrics=[
            Metric("params_m", n_all / 1e6, int(time.time() * 1000), 0),
            Metric("params_trainable_m", n_trainable / 1e6, int(time.time() * 1000), 0),
            Metric("macs_g", macs / 1e9, int(time.time() * 1000), 0),
        ],
    )
    log.info("MLflow run %s (experiment %s) at %s", run_id, cfg.tracking.experiment, uri)
    log.info(
        "%s: %s, %.2f M params, %.3f G MACs at %d px",
        variant,
        vcfg.model,
        n_all / 1e6,
        macs / 1e9,
        tcfg.img_size,
    )

    started_ray = _init_ray(tcfg.num_workers * tcfg.cpus_per_worker)
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"spec": spec.to_dict()},
            torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=tcfg.num_workers,
                use_gpu=tcfg.use_gpu,
                resources_per_worker={"CPU": tcfg.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=f"{variant}-{phash}-{run_id[:8]}",
                storage_path=str(root / "runs" / "ray"),
                failure_config=FailureConfig(max_failures=0),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise TrainingFailed(f"training {variant} failed: {result.error}")
        metrics = result.metrics or {}
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as folder:
                state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
                with tempfile.TemporaryDirectory() as out:
                    torch.save({"model": state["model"], "config": state["config"]}, Path(out) / "model.pt")
                    client.log_artifact(run_id, str(Path(out) / "model.pt"), artifact_path="checkpoint")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    finally:
        if started_ray:
            ray.shutdown()
    client.set_terminated(run_id, status="FINISHED")

    record = {
        "variant": variant,
        "model": vcfg.model,
        "run_id": run_id,
        "experiment": cfg.tracking.experiment,
        "epochs": tcfg.epochs,
        "img_size": tcfg.img_size,
        "val_top1": metrics.get("val_top1"),
        "val_top5": metrics.get("val_top5"),
        "params_m": n_all / 1e6,
        "macs_g": macs / 1e9,
        "images_per_s": metrics.get("images_per_s"),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{variant}.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info(
        "%s: val top-1 %.2f %% -> %s",
        variant,
        record["val_top1"] or float("nan"),
        results_dir / f"{variant}.json",
    )
    return record
