"""The typed config: every shipped params file validates, bad input names its key, and dvc.yaml
declares exactly the params each stage reads."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, parse_config


def _raw(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


@pytest.mark.parametrize("name", ["params.yaml", "profiles/mini.yaml", "profiles/imagenet.yaml"])
def test_shipped_params_files_validate(root: Path, name: str) -> None:
    cfg = load_config(root / name)
    assert cfg.variants


def test_misspelt_key_is_named(root: Path) -> None:
    raw = _raw(root)
    raw["train"]["epocs"] = raw["train"].pop("epochs")
    with pytest.raises(ConfigError, match=r"train\.epocs: unknown key"):
        parse_config(raw)


def test_wrong_type_and_range_are_named(root: Path) -> None:
    raw = _raw(root)
    raw["train"]["batch_size"] = "many"
    raw["data"]["demo"]["num_classes"] = 1
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert "train.batch_size" in str(err.value)
    assert "data.demo.num_classes" in str(err.value)


def test_variant_override_is_validated(root: Path) -> None:
    raw = _raw(root)
    name = next(iter(raw["variants"]))
    raw["variants"][name]["train"] = {"lr": -1}
    with pytest.raises(ConfigError, match=rf"variants\.{name}\.train.*lr"):
        parse_config(raw)
    raw["variants"][name]["train"] = {"learning_rate": 1e-3}
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_config(raw)


def test_variant_override_merges(root: Path) -> None:
    raw = _raw(root)
    name = next(iter(raw["variants"]))
    raw["variants"][name]["train"] = {"epochs": 3, "augment": {"hflip": 0.0}}
    cfg = parse_config(raw)
    merged = cfg.train_for(name)
    assert merged.epochs == 3 and merged.augment.hflip == 0.0
    assert merged.lr == cfg.train.lr and merged.augment.scale_min == cfg.train.augment.scale_min


def test_demo_source_requires_demo_root(root: Path) -> None:
    raw = _raw(root)
    raw["data"]["root"] = "/datasets/imagenet"
    with pytest.raises(ConfigError, match="data.root"):
        parse_config(raw)
    raw["data"]["source"] = "folder"
    assert parse_config(raw).data.root == "/datasets/imagenet"


def test_batch_must_split_over_workers(root: Path) -> None:
    raw = _raw(root)
    raw["train"].update(batch_size=63, num_workers=2)
    with pytest.raises(ConfigError, match="batch_size"):
        parse_config(raw)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def _declared(root: Path) -> dict[str, list[str]]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        out[name] = [
            p.replace("${key}", "{variant}").replace("${dvt.variant}", "{dvt_variant}")
            for p in body.get("params", [])
        ]
    return out


def test_dvc_yaml_declares_exactly_the_params_each_stage_reads(root: Path) -> None:
    declared = _declared(root)
    for name, params in declared.items():
        module = importlib.import_module(f"stages.{name}")
        assert sorted(params) == sorted(module.PARAMS), f"dvc.yaml stage {name} vs stages/{name}.py PARAMS"


def test_declared_params_exist_in_config(root: Path) -> None:
    cfg = load_config(root / "params.yaml").model_dump()
    variant = next(iter(cfg["variants"]))
    for params in _declared(root).values():
        for key in params:
            node = cfg
            key = key.replace("{dvt_variant}", cfg["dvt"]["variant"])
            for part in key.replace("{variant}", variant).split("."):
                assert part in node, f"{key} is declared in dvc.yaml but is not a config key"
                node = node[part]


def test_no_hyperparameter_in_cmd(root: Path) -> None:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        cmd = stage.get("do", stage)["cmd"]
        extra = cmd.split()[3:]  # after "python -m stages.x"
        assert extra in ([], ["--variant", "${key}"]), f"stage {name} passes {extra} outside params.yaml"


def test_config_is_immutable(root: Path) -> None:
    cfg = load_config(root / "params.yaml")
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        cfg.train.epochs = 1  # type: ignore[misc]
    assert copy.deepcopy(cfg) == cfg


@pytest.mark.parametrize("name", ["params.yaml", "profiles/mini.yaml", "profiles/imagenet.yaml"])
def test_every_variant_names_a_registered_model(root: Path, name: str) -> None:
    import timm

    import pipeline.models  # noqa: F401 - registers the study's models

    cfg = load_config(root / name)
    assert {v.model for v in cfg.variants.values()} <= set(timm.list_models())


def test_imagenet_profile_lists_the_whole_zoo(root: Path) -> None:
    import timm

    import pipeline.models  # noqa: F401

    cfg = load_config(root / "profiles/imagenet.yaml")
    zoo = (
        set(timm.list_models("t2t_vit*")) | set(timm.list_models("*_paper")) | set(timm.list_models("dvt_*"))
    )
    assert zoo <= {v.model for v in cfg.variants.values()}
