"""Models in MLflow's format: a training's model logged with signature and input example, registered
under its variant, the best version aliased @best, and loaded back by mlflow.pytorch with the same
logits. Real MLflow (SQLite store), nothing mocked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.config import AugmentConfig, TrainConfig
from pipeline.train.loop import RunSpec, build_model
from pipeline.train.registry import BEST, log_model

TINY = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _spec() -> RunSpec:
    train = TrainConfig(img_size=32, batch_size=8, num_workers=1, augment=AugmentConfig())
    return RunSpec(variant="tiny", model="vit_tiny_patch16_224", train=train, shards="unused",
                   num_classes=4, model_kwargs=TINY)  # fmt: skip


def test_each_training_is_a_registered_version_and_best_loads_with_its_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    models = {}
    for seed, top1 in ((0, 40.0), (1, 55.0), (2, 50.0)):
        run_id = client.create_run(experiment).info.run_id
        client.log_metric(run_id, "val_top1", top1, step=0)
        torch.manual_seed(seed)
        spec = _spec()
        model = build_model(spec).eval()
        models[top1] = model
        version_uri = log_model(uri, run_id, "tiny", model.state_dict(), spec.to_dict())
        assert version_uri == f"models:/tiny/{seed + 1}"

    mv = client.get_model_version_by_alias("tiny", BEST)
    assert str(mv.version) == "2"  # the run with the highest val_top1
    # Loaded the way the module's docstring tells users to: the store named by the environment.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = mlflow.pytorch.load_model(f"models:/tiny@{BEST}")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), models[55.0](x))
        assert not torch.equal(loaded(x), models[50.0](x))
    info = mlflow.models.get_model_info(f"models:/tiny@{BEST}")
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 4]
    assert info.saved_input_example_info is not None


def test_logging_a_model_leaves_no_uri_behind_for_the_rest_of_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's fluent setters write MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into os.environ; a
    study that logged a model once would otherwise register every later model of the process (and
    of its child processes, such as ``dvc repro``) in the first study's store."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    spec = _spec()
    model = build_model(spec).eval()
    for name in ("a", "b"):
        uri = f"sqlite:///{tmp_path / f'{name}.db'}"
        client = MlflowClient(uri)  # no registry URI given: MLflow resolves it from the context
        experiment = client.create_experiment(name, artifact_location=(tmp_path / name).as_uri())
        run_id = client.create_run(experiment).info.run_id
        client.log_metric(run_id, "val_top1", 1.0, step=0)
        assert log_model(uri, run_id, f"model_{name}", model.state_dict(), spec.to_dict()).endswith("/1")
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
        found = [m.name for m in client.search_registered_models()]
        assert found == [f"model_{name}"], f"{uri} holds {found}"
