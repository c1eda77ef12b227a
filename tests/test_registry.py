"""Models in MLflow's format: a training's model logged with signature and input example, registered
under its variant, the best version aliased @best, and loaded back by mlflow.pytorch with the same
logits. Real MLflow (SQLite store), nothing mocked."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import AugmentConfig, TrainConfig
from pipeline.train.loop import RunSpec, build_model
from pipeline.train.registry import BEST, log_model

TINY = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _spec() -> RunSpec:
    train = TrainConfig(img_size=32, batch_size=8, num_workers=1, augment=AugmentConfig())
    return RunSpec(variant="tiny", model="vit_tiny_patch16_224", train=train, shards="unused",
                   num_classes=4, model_kwargs=TINY)  # fmt: skip


def test_each_training_is_a_registered_version_and_best_loads_with_its_logits(tmp_path: Path) -> None:
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
    loaded = mlflow.pytorch.load_model(f"models:/tiny@{BEST}")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), models[55.0](x))
        assert not torch.equal(loaded(x), models[50.0](x))
    info = mlflow.models.get_model_info(f"models:/tiny@{BEST}")
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 4]
    assert info.saved_input_example_info is not None
