"""Where state lives: the user's checkout, also from DVC's experiment copies; the MLflow experiment's kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.paths import checkout_root, repo_root, resolve_state
from pipeline.tracking import EXPERIMENT_KIND, MODEL_TRAINING, experiment_id, tracking_uri


@pytest.mark.parametrize("copy", [".dvc/tmp/exps/standalone/tmpa1b2c3", ".dvc/tmp/exps/tmpx9y8z7"])
def test_dvc_experiment_copies_keep_state_in_the_checkout(
    tmp_path: Path, copy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = tmp_path / "study"
    (checkout / copy / "stages").mkdir(parents=True)
    (checkout / "dvc.yaml").write_text("stages: {}\n")
    (checkout / copy / "dvc.yaml").write_text("stages: {}\n")  # --temp and --queue copies hold one too
    inside = checkout / copy
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert repo_root(inside / "stages") == inside  # outputs: where DVC looks for them
    assert checkout_root(inside / "stages") == checkout  # state: the checkout
    assert tracking_uri(inside) == f"sqlite:///{checkout.resolve()}/mlflow.db"
    assert resolve_state("runs", inside) == checkout.resolve() / "runs"
    # Outside a DVC copy both are the repository; a configured URI wins.
    assert checkout_root(checkout) == repo_root(checkout) == checkout.resolve()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(inside) == "http://mlflow.internal:5000"


def test_a_folder_named_like_a_copy_without_a_checkout_above_is_its_own_root(tmp_path: Path) -> None:
    inside = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    inside.mkdir(parents=True)
    (inside / "dvc.yaml").write_text("stages: {}\n")
    assert checkout_root(inside) == inside


def test_the_experiment_opens_as_model_training_in_the_mlflow_ui(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    new = experiment_id(client, "study", uri, tmp_path)
    assert client.get_experiment(new).tags[EXPERIMENT_KIND] == MODEL_TRAINING == "custom_model_development"
    old = client.create_experiment("older")  # made before the tag existed: tagged on next use
    assert EXPERIMENT_KIND not in client.get_experiment(old).tags
    assert experiment_id(client, "older", uri, tmp_path) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND] == MODEL_TRAINING


def test_an_experiment_copy_reads_the_checkouts_tars_if_it_has_only_the_manifest(tmp_path: Path) -> None:
    import json

    from pipeline.shardsets import shards_for_stage

    checkout = tmp_path / "study"
    copy = checkout / ".dvc" / "tmp" / "exps" / "tmpq1w2e3"
    splits = {"train": {"shards": [{"name": "train-000000.tar"}]}, "val": {"shards": []}}
    manifest = json.dumps({"splits": splits})
    for repo in (checkout, copy):
        (repo / "data" / "shards").mkdir(parents=True)
        (repo / "dvc.yaml").write_text("stages: {}\n")
        (repo / "data" / "shards" / "manifest.json").write_text(manifest)
    (checkout / "data" / "shards" / "train-000000.tar").write_bytes(b"tar")
    # Restored from the run cache: the manifest only.
    assert shards_for_stage("data/shards", copy) == str(checkout / "data" / "shards")
    (copy / "data" / "shards" / "train-000000.tar").write_bytes(b"tar")
    assert shards_for_stage("data/shards", copy) == str(copy / "data" / "shards")  # the copy sharded itself
    (copy / "data" / "shards" / "train-000000.tar").unlink()
    (copy / "data" / "shards" / "manifest.json").write_text(manifest.replace("000000", "000001"))
    assert shards_for_stage("data/shards", copy) == str(copy / "data" / "shards")  # other data: never mixed
    assert shards_for_stage("data/shards", checkout) == str(checkout / "data" / "shards")
    assert shards_for_stage("s3://bucket/shards", copy) == "s3://bucket/shards"
