"""The typed config: every shipped params file validates, bad input names its key, and dvc.yaml
declares exactly the params each stage reads."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import torch
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


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("train", "epochs", True), ("train", "epochs", "3"), ("train", "use_gpu", "yes"),
     ("train", "lr", "fast"), ("train", "epochs", 3.0), ("data.demo", "num_classes", False),
     ("report", "output", 7), ("data.shards", "verify_sha256", "yes"), ("data.shards", "verify_sha256", 1)],
)  # fmt: skip
def test_wrong_types_are_refused_not_coerced(root: Path, section: str, key: str, value: object) -> None:
    raw = _raw(root)
    node = raw
    for part in section.split("."):
        node = node[part]
    node[key] = value
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: Input should be a valid"):
        parse_config(raw)


def test_ints_for_floats_and_yaml_exponents_still_load(root: Path, tmp_path: Path) -> None:
    text = (root / "params.yaml").read_text()
    assert "  lr: 1.0e-3\n" in text and "  cpus_per_worker: 1\n" in text
    text = text.replace("  lr: 1.0e-3\n", "  lr: 2e-3\n").replace("  min_lr: 1.0e-5\n", "  min_lr: 1E-5\n")
    (tmp_path / "params.yaml").write_text(text)
    cfg = load_config(tmp_path / "params.yaml")
    assert cfg.train.lr == 2e-3 and cfg.train.min_lr == 1e-5  # YAML 1.2 floats, as DVC reads them
    assert cfg.train.cpus_per_worker == 1.0 and isinstance(cfg.train.cpus_per_worker, float)
    quoted = text.replace("  lr: 2e-3\n", '  lr: "2e-3"\n')
    (tmp_path / "params.yaml").write_text(quoted)
    with pytest.raises(ConfigError, match=r"train\.lr: Input should be a valid number"):
        load_config(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    ("update", "message"),
    [({"min_lr": 2e-3, "lr": 1e-3}, r"train: .*min_lr \(0.002\) must be <= lr \(0.001\)"),
     ({"warmup_epochs": 5, "epochs": 5}, r"train: .*warmup_epochs \(5\.0\) must be < epochs"),
     ({"warmup_epochs": 4, "epochs": 6, "cooldown_epochs": 2}, r"warmup_epochs \(4\.0\) must be < epochs"),
     ({"storage_path": ""}, r"train\.storage_path: String should have at least 1 character"),
     ({"storage_path": "  "}, r"train\.storage_path: String should match pattern")],
)  # fmt: skip
def test_cross_field_nonsense_is_refused_naming_the_keys(root: Path, update: dict, message: str) -> None:
    raw = _raw(root)
    raw["train"].update(update)
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_an_img_size_the_model_cannot_tile_is_refused(root: Path) -> None:
    raw = _raw(root)
    raw["train"]["img_size"] = 72  # not a multiple of 16: T2T-ViT's soft splits (4 x 2 x 2)
    with pytest.raises(ConfigError, match=r"variants\.t2t_vit_7: train\.img_size 72 .* use 64 or 80"):
        parse_config(raw)
    raw["train"]["img_size"] = 64
    raw["variants"]["vit_7"]["model_kwargs"]["patch_size"] = 12
    with pytest.raises(ConfigError, match=r"variants\.vit_7: train\.img_size 64 is not a multiple of 12"):
        parse_config(raw)
    raw["variants"]["vit_7"]["model_kwargs"]["patch_size"] = 8
    raw["variants"]["vit_7"]["train"] = {"img_size": 40}  # a variant's own size is checked too
    assert parse_config(raw).train_for("vit_7").img_size == 40
    raw["variants"]["t2t_vit_7"]["train"] = {"img_size": 40}
    with pytest.raises(ConfigError, match=r"variants\.t2t_vit_7: train\.img_size 40 .* use 32 or 48"):
        parse_config(raw)


def test_the_token_patch_rule_matches_the_built_models() -> None:
    import timm

    import pipeline.models  # noqa: F401
    from pipeline.config import token_patch

    for name, kwargs in [("t2t_vit_7", {}), ("vit_s16_paper", {}), ("vit_s16_paper", {"patch_size": 8}),
                         ("t2t_vit_14_wide", {}), ("vit_tiny_patch16_224", {"patch_size": 4})]:  # fmt: skip
        with torch.device("meta"):
            model = timm.create_model(name, img_size=64, num_classes=10, **kwargs)
        assert token_patch(name, kwargs) == model.patch_embed.patch_size[0], name
    assert token_patch("dvt_deit_small", {}) == 32  # its first stage: 7x7 tokens of 32 px at 224


@pytest.mark.parametrize("output", ["/", ".", "./", "", "..", "../reports"])
def test_report_output_must_be_a_folder_of_its_own(root: Path, output: str) -> None:
    raw = _raw(root)
    raw["report"]["output"] = output
    with pytest.raises(ConfigError, match=r"report\.output: .*not a folder of its own"):
        parse_config(raw)


def test_report_output_may_not_be_the_repository_root(root: Path, tmp_path: Path) -> None:
    raw = _raw(root)
    raw["report"]["output"] = str(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"report\.output: .* is the repository root"):
        load_config(tmp_path / "params.yaml")
    raw["report"]["output"] = str(tmp_path / "reports")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "params.yaml").report.output == str(tmp_path / "reports")


def test_seeds_replace_seed(root: Path) -> None:
    raw = _raw(root)
    assert parse_config(raw).train.seeds == [0]
    raw["train"]["seeds"] = [3, 1]
    cfg = parse_config(raw)
    assert cfg.train.seed == 3 and cfg.train.for_seed(1).seeds == [1] and cfg.train.for_seed(1).seed == 1
    for bad, message in [([], r"train\.seeds: List should have at least 1 item"),
                         ([1, 1], r"train\.seeds: .*repeat a seed"),
                         ([-1], r"train\.seeds\.0: Input should be greater than or equal to 0"),
                         (1, r"train\.seeds: Input should be a valid list")]:  # fmt: skip
        raw["train"]["seeds"] = bad
        with pytest.raises(ConfigError, match=message):
            parse_config(raw)
    del raw["train"]["seeds"]
    raw["train"]["seed"] = 4
    with pytest.raises(ConfigError, match=r"train: .*seed: replaced by seeds, a list: write seeds: \[4\]"):
        parse_config(raw)
    del raw["train"]["seed"]
    name = next(iter(raw["variants"]))
    raw["variants"][name]["train"] = {"seed": 2}
    with pytest.raises(ConfigError, match=rf"variants\.{name}\.train: .*write seeds: \[2\]"):
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
            p.replace("${key}", "{variant}").replace("${item}", "{variant}") for p in body.get("params", [])
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
    entry = next(iter(cfg["pretrained"]), None)
    for params in _declared(root).values():
        for key in params:
            if key.startswith("pretrained.{variant}"):
                if entry is None:
                    continue  # no pretrained entry in this profile: the foreach makes no evaluate stage
                key = key.replace("{variant}", entry)
            node = cfg
            for part in key.replace("{variant}", variant).split("."):
                assert part in node, f"{key} is declared in dvc.yaml but is not a config key"
                node = node[part]


@pytest.mark.parametrize("name", ["params.yaml", "profiles/mini.yaml", "profiles/imagenet.yaml"])
def test_shipped_params_files_spell_out_every_declared_key(root: Path, name: str) -> None:
    """DVC reads a declared key from the file itself, without the config's defaults: a key left out
    fails dvc repro (``Parameters ... are missing``)."""
    raw = yaml.safe_load((root / name).read_text())
    for key in {key for params in _declared(root).values() for key in params}:
        node = raw
        for part in key.split("."):
            if part == "{variant}":
                if not node:
                    break  # no entry (pretrained in the demo profiles): the foreach makes no stage
                part = next(iter(node))
            assert isinstance(node, dict) and part in node, f"{name} does not spell out {key}"
            node = node[part]


def test_the_shard_stage_declares_every_shard_key_but_the_readers_check() -> None:
    """A new data.shards key is declared where it is read; verify_sha256 is only the readers'."""
    from pipeline.config import ShardConfig
    from stages import evaluate, shard, train, tune_dvt

    declared = {p.removeprefix("data.shards.") for p in shard.PARAMS if p.startswith("data.shards.")}
    assert declared == set(ShardConfig.model_fields) - {"verify_sha256"}
    assert all("data.shards.verify_sha256" in m.PARAMS for m in (train, tune_dvt, evaluate))


def test_no_hyperparameter_in_cmd(root: Path) -> None:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        cmd = stage.get("do", stage)["cmd"]
        extra = cmd.split()[3:]  # after "python -m stages.x"
        assert extra in ([], ["--variant", "${key}"], ["--variant", "${item}"], ["--name", "${key}"]), (
            f"stage {name} passes {extra} outside params.yaml"
        )


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
