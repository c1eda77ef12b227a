"""Ray for the drivers: starting (or joining) Ray, and building the ``TorchTrainer`` that runs :func:`fit`.

Both the train stage (:mod:`pipeline.train.runner`) and DVT's reuse ablation
(:mod:`pipeline.dvt.search`, one ``TorchTrainer`` per Tune trial, the Ray Train V2 pattern) go
through here, so a training run is built one way wherever it starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pipeline.train.loop import RunSpec, fit

log = logging.getLogger(__name__)

__all__ = ["build_trainer", "init_ray", "ray_running", "train_worker"]


def init_ray() -> bool:
    """Connect to ``RAY_ADDRESS`` or start a local instance; returns whether this call did it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a local Ray instance (set RAY_ADDRESS to use a cluster)")
        ray.init(log_to_driver=True)
    return True


@contextmanager
def ray_running() -> Iterator[None]:
    """Ray is up inside the block; shut down afterwards only if this block started it."""
    import ray

    started = init_ray()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop function: rebuild the :class:`RunSpec` and run the shared :func:`fit`."""
    from pipeline.train.runner import RaySession

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = RunSpec.from_dict(config["spec"])
    session = RaySession(spec)
    try:
        fit(spec, session)
    finally:
        session.close()


def build_trainer(
    spec: RunSpec,
    *,
    name: str,
    storage_path: str,
    max_failures: int = 0,
    keep_checkpoints: int | None = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ``TorchTrainer`` running :func:`train_worker` on ``spec.train.num_workers`` DDP workers.

    Args:
        spec: What to train (its ``train`` section sets workers, CPUs, GPU and placement).
        name: The Ray run's name (a folder under ``storage_path``; Ray resumes a run of that name).
        storage_path: Checkpoint storage every node sees (a folder or an ``s3://`` URI).
        max_failures: Worker-group restarts from the last checkpoint.
        keep_checkpoints: Checkpoints kept (None: all).
        callbacks: Ray Train callbacks (``TuneReportCallback`` inside a Tune trial).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = spec.train
    return TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.to_dict()},
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker},
            placement_strategy=train.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks),
        ),
    )
