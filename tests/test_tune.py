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


def test_one_tune_dvt_stage_end_to_end(local_ray: None, tiny_shards: Path, tmp_path: Path) -> None:
    """tune_cascade on a tiny cascade and its tiny backbone, logged to a real MLflow store: the record
    holds both protocols' counts, the backbone on the same images, speed rows; MLflow has it all."""
    import json

    import torch
    from mlflow.tracking import MlflowClient

    from pipeline.config import parse_config
    from pipeline.dvt.records import TuneRecord
    from pipeline.dvt.study import tune_cascade, write_outputs
    from pipeline.train.loop import build_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("tune-e2e", artifact_location=(tmp_path / "art").as_uri())
    raw = {
        "train": {"img_size": 64, "epochs": 1, "warmup_epochs": 0, "batch_size": 8, "drop_path_rate": 0.0,
                  "num_workers": 1, "storage_path": str(tmp_path / "ray")},
        "variants": {"dvt_tiny": {"model": "dvt_t2t_vit_12", "model_kwargs": TINY_DVT},
                     "tiny": {"model": "t2t_vit_7", "model_kwargs": TINY_DVT}},
        "dvt": {"variants": ["dvt_tiny"], "backbones": {"dvt_tiny": "tiny"}, "budget_gmacs": 1.0,
                "calibration": "val", "calibration_images": 6, "threshold_trials": 3, "speed_batch": 4,
                "speed_repeats": 1, "speed_warmup": 0},
        "tracking": {"experiment": "tune-e2e"},
    }  # fmt: skip
    cfg = parse_config(raw)
    results = tmp_path / "results"
    results.mkdir()
    for variant, vcfg in cfg.variants.items():
        spec = RunSpec(variant=variant, model=vcfg.model, train=cfg.train_for(variant),
                       shards=str(tiny_shards), num_classes=4, model_kwargs=vcfg.model_kwargs,
                       tracking_uri=uri)  # fmt: skip
        run_id = client.create_run(experiment, run_name=variant).info.run_id
        torch.save({"model": build_model(spec).state_dict(), "config": spec.to_dict()}, tmp_path / "model.pt")
        client.log_artifact(run_id, str(tmp_path / "model.pt"), artifact_path="checkpoint")
        client.set_terminated(run_id)
        (results / f"{variant}.json").write_text(json.dumps({"variant": variant, "run_id": run_id}))

    record = tune_cascade(cfg, "dvt_tiny", root=tmp_path, results=results, tracking_uri=uri)
    write_outputs(record, results / "dvt" / "dvt_tiny")

    assert TuneRecord.read(results / "dvt" / "dvt_tiny" / "best.yaml") == record
    assert (record.calibration, record.calibration_images, record.reported_images) == ("val", 6, 10)
    assert record.static.variant == "tiny" and 0 <= record.static.accuracy <= 100
    assert record.msdnet.calib_avg_gmacs <= 1.0 and record.match_static is not None and record.reuse is None
    speeds = {(r.model, r.point) for r in record.throughput.rows}
    assert speeds == {("early_exit", "budget"), ("simulate_all", "budget"), ("early_exit", "match_static"),
                      ("simulate_all", "match_static"), ("static", "full")}  # fmt: skip
    assert record.throughput.batch_size == 4 and all(r.images_per_s > 0 for r in record.throughput.rows)
    run = client.get_run(record.run_id)
    assert run.info.status == "FINISHED" and run.data.params["speed.batch_size"] == "4"
    assert run.data.metrics["msdnet_top1"] == record.msdnet.accuracy
    assert run.data.tags["static_run_id"] == record.static.run_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{record.run_id}'")
    assert len(children) == 3  # the threshold trials
