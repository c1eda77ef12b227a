"""The reuse ablation's Tune trials on a real local Ray instance and a real MLflow store: one trial
per combination, one MLflow child run each, with one worker in the trial's process and with two
DDP workers under a Ray Train ``TorchTrainer``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import AugmentConfig, DVTConfig, TrainConfig
from pipeline.dvt.search import REUSE_COMBINATIONS, ReuseCombination, TuneContext, search_reuse
from pipeline.train.loop import RunSpec

pytestmark = pytest.mark.slow

TINY_DVT = {"depth": 1, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory):
    import ray

    # A local ray.init() writes ~/.ray/auth_token; keep it out of the real HOME.
    home, old_home = tmp_path_factory.mktemp("home"), os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if old_home is not None:
        os.environ["HOME"] = old_home


@pytest.mark.parametrize(
    ("workers", "combos"),
    [(1, REUSE_COMBINATIONS[:2]), (2, REUSE_COMBINATIONS[3:])],
    ids=["in-trial-process", "torch-trainer-ddp"],
)
def test_each_reuse_combination_is_one_trial_and_one_child_run(
    local_ray: None, tiny_shards: Path, tmp_path: Path, workers: int, combos: list[ReuseCombination]
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("tune-test", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment, run_name="study").info.run_id
    # Half a CPU per worker: two workers and the 0.01-CPU trial that drives them fit in 2 CPUs.
    train = TrainConfig(img_size=64, epochs=3, warmup_epochs=0, cooldown_epochs=0, batch_size=8, lr=1e-3,
                        drop_path_rate=0.0, num_workers=2, cpus_per_worker=0.5,
                        augment=AugmentConfig(scale_min=0.5))  # fmt: skip
    base = RunSpec(variant="dvt_tiny", model="dvt_t2t_vit_12", train=train, shards=str(tiny_shards),
                   num_classes=4, model_kwargs=TINY_DVT, tracking_uri=uri)  # fmt: skip
    dvt = DVTConfig(variants=["dvt_tiny"], budget_gmacs=1.0, reuse_epochs=2, reuse_steps_per_epoch=2,
                    reuse_workers=workers, max_concurrent_trials=2)  # fmt: skip
    context = TuneContext(parent, experiment, uri, str(tmp_path / "ray"))

    trials = search_reuse(dvt, base, context, combos)

    assert [(t.feature_reuse, t.relation_reuse) for t in trials] == [
        (c.feature_reuse, c.relation_reuse) for c in combos
    ]
    for trial in trials:
        assert 0 <= trial.val_top1 <= 100 and len(trial.exit_top1) == 3
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in children) == sorted(t.run_id for t in trials)
    assert sorted(r.info.run_name for r in children) == sorted(c.name for c in combos)
    for run in children:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_top1")
        assert [m.step for m in history] == [0, 1]  # reuse_epochs epochs, each logged once
        assert run.data.tags["feature_reuse"] in {"True", "False"}


def test_a_reuse_trial_too_big_for_the_local_cluster_fails_at_once(
    local_ray: None, tiny_shards: Path, tmp_path: Path
) -> None:
    train = TrainConfig(img_size=64, epochs=1, warmup_epochs=0, cooldown_epochs=0, batch_size=8,
                        num_workers=2, augment=AugmentConfig(scale_min=0.5))  # fmt: skip
    base = RunSpec(variant="dvt_tiny", model="dvt_t2t_vit_12", train=train, shards=str(tiny_shards),
                   num_classes=4, model_kwargs=TINY_DVT)  # fmt: skip
    dvt = DVTConfig(variants=["dvt_tiny"], budget_gmacs=1.0, reuse_epochs=1, reuse_workers=2)
    context = TuneContext("-", "-", "sqlite://", str(tmp_path / "ray"))
    with pytest.raises(ValueError, match=r"2\.01 CPU \(the cluster has 2\).*dvt\.reuse_workers=2"):
        search_reuse(dvt, base, context)
