"""Published checkpoints through timm's pretrained path: the authors' T2T-ViT and DVT layouts, timm files,
this project's own files, position tables, transfer heads, and the errors a wrong file gives.

The authors' layouts come from tests/data/official_keys/*.keys.json: every tensor name and shape of
their released models, read from their code (github.com/yitu-opensource/T2T-ViT,
github.com/blackfeather-wang/Dynamic-Vision-Transformer). Files are built here with random values.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import pipeline.models  # noqa: F401 - registers the models
from pipeline.models.checkpoints import (
    CheckpointError,
    authors_dvt_names,
    authors_t2t_names,
    read_dvt_published,
)
from pipeline.models.t2t_vit import sinusoid_table

KEYS = Path(__file__).parent / "data" / "official_keys"
T2T = sorted(p.name.removesuffix(".keys.json") for p in KEYS.glob("t2t_vit_*.keys.json"))
DVT = sorted(p.name.removesuffix(".keys.json") for p in KEYS.glob("dvt_*.keys.json"))


def _layout(name: str) -> dict[str, list[int]]:
    return json.loads((KEYS / f"{name}.keys.json").read_text())["tensors"]


def _random(shapes: dict[str, list[int]], seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    if device == "meta":
        return {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v, generator=gen) * 0.02 for k, v in shapes.items()}


def _t2t_release(tensors: dict[str, torch.Tensor], ema: dict[str, torch.Tensor], arch: str) -> dict:
    """The dict the authors' timm 0.3.4 saver writes (DDP 'module.' prefix included)."""
    return {
        "epoch": 309,
        "arch": arch,
        "state_dict": {f"module.{k}": v for k, v in tensors.items()},
        "state_dict_ema": {f"module.{k}": v for k, v in ema.items()},
        "args": argparse.Namespace(model=arch, img_size=224, drop_path=0.1),
        "version": 2,
        "metric": 81.5,
    }


def _dvt_release(tensors: dict[str, torch.Tensor]) -> dict:
    return {
        "model_state_dict": tensors,
        "flops": [0.468, 1.446, 3.455],
        "anytime_classification": [70.1, 76.4, 78.9],
        "dynamic_threshold": torch.rand(59, 3),
        "budgeted_batch_classification": [[0.5, 1.0, 2.0], [70.0, 75.0, 78.0]],
    }


def _load(name: str, path: Path, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


@pytest.mark.parametrize("name", T2T + DVT)
def test_every_official_layout_loads_strictly(name: str, tmp_path: Path) -> None:
    """Exact names and shapes of each released model load through timm's pretrained path, strict."""
    shapes = _layout(name)
    tensors = _random(shapes, device="meta")  # names and shapes only: no bytes, no init
    path = tmp_path / f"{name}.pth.tar"
    torch.save(
        _dvt_release(tensors) if name.startswith("dvt") else _t2t_release(tensors, tensors, name), path
    )
    with torch.device("meta"):
        model = _load(name, path)
    assert len(model.state_dict()) == len(shapes)  # strict: every tensor of the file has a place
    assert sum(p.numel() for p in model.state_dict().values()) == sum(
        torch.Size(s).numel() for s in shapes.values()
    )


def test_authors_t2t_release_loads_its_ema_weights(tmp_path: Path) -> None:
    shapes = _layout("t2t_vit_7")
    plain, ema = _random(shapes, seed=1), _random(shapes, seed=2)
    path = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    torch.save(_t2t_release(plain, ema, "t2t_vit_7"), path)
    model = _load("t2t_vit_7", path)
    ours = model.state_dict()
    # Spot checks by hand, independent of the renaming code: the EMA weights, stored table, Performer w.
    assert torch.equal(
        ours["patch_embed.attention1.attn.random_features"], ema["tokens_to_token.attention1.w"]
    )
    assert torch.equal(
        ours["patch_embed.attention2.mlp.fc2.weight"], ema["tokens_to_token.attention2.mlp.2.weight"]
    )
    assert torch.equal(
        ours["patch_embed.attention1.attn.proj.bias"], ema["tokens_to_token.attention1.proj.bias"]
    )
    assert torch.equal(ours["pos_embed"], ema["pos_embed"])
    assert torch.equal(ours["blocks.6.mlp.fc2.weight"], ema["blocks.6.mlp.fc2.weight"])
    assert not torch.equal(ours["head.weight"], plain["head.weight"])
    # ... and back: the project's names map to exactly the authors' layout.
    assert {k: tuple(v.shape) for k, v in authors_t2t_names(ours).items()} == {
        k: tuple(v) for k, v in shapes.items()
    }


def test_stored_384_table_is_used_not_a_fresh_sinusoid(tmp_path: Path, caplog) -> None:
    shapes = {**_layout("t2t_vit_14"), "pos_embed": [1, 577, 384]}
    tensors = _random(shapes, seed=3)
    # As a fine-tuned table is stored: near a sinusoid, but not one.
    tensors["pos_embed"] = sinusoid_table(577, 384) + 0.05 * torch.randn(1, 577, 384)
    path = tmp_path / "83.3_T2T_ViT_14.pth.tar"
    torch.save(_t2t_release(tensors, tensors, "t2t_vit_14"), path)

    at_384 = _load("t2t_vit_14", path, img_size=384, weight_init="skip")
    assert torch.equal(at_384.pos_embed.detach(), tensors["pos_embed"])
    assert not torch.allclose(at_384.pos_embed.detach(), sinusoid_table(577, 384), atol=1e-3)
    assert not at_384.pos_embed.requires_grad

    with caplog.at_level(logging.WARNING, logger="pipeline.models.checkpoints"):
        at_224 = _load("t2t_vit_14", path, img_size=224, weight_init="skip")
    grid = tensors["pos_embed"][0, 1:].reshape(1, 24, 24, 384).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(14, 14), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 196, 384)
    expected = torch.cat([tensors["pos_embed"][:, :1], expected], dim=1)
    torch.testing.assert_close(at_224.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert str(path) in message and "24x24 to 14x14" in message and "384 px" in message


def test_transfer_drops_the_head_and_keeps_the_rest(tmp_path: Path) -> None:
    shapes = _layout("t2t_vit_7")
    tensors = _random(shapes, seed=4)
    path = tmp_path / "t2t7.pth.tar"
    torch.save(_t2t_release(tensors, tensors, "t2t_vit_7"), path)
    model = _load("t2t_vit_7", path, num_classes=10)
    assert model.head.weight.shape == (10, 256)
    assert torch.equal(model.blocks[0].attn.qkv.weight, tensors["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_format_deit_file(tmp_path: Path, suffix: str) -> None:
    kwargs = dict(depth=2, img_size=64, patch_size=16)
    reference = timm.create_model("deit_small_paper", **kwargs).eval()
    path = tmp_path / f"deit{suffix}"
    if suffix == ".safetensors":
        import safetensors.torch

        safetensors.torch.save_file(reference.state_dict(), str(path))
    else:
        torch.save(reference.state_dict(), path)
    model = _load("deit_small_paper", path, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert model.pretrained_cfg["crop_pct"] == 0.875


def test_project_checkpoint_keeps_its_head(tmp_path: Path) -> None:
    reference = timm.create_model("t2t_vit_7", img_size=64, num_classes=10).eval()
    path = tmp_path / "model.pt"
    torch.save({"model": reference.state_dict(), "config": {"model": "t2t_vit_7"}}, path)
    model = _load("t2t_vit_7", path, img_size=64, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_dvt_release_gives_the_same_exits_as_the_project_layout(tmp_path: Path) -> None:
    shapes = _layout("dvt_t2t_vit_12")
    tensors = _random(shapes, seed=5)
    authors = tmp_path / "dvt_t2t_vit_12.pth.tar"
    torch.save(_dvt_release(tensors), authors)
    from_authors = _load("dvt_t2t_vit_12", authors, weight_init="skip").eval()

    # Spot checks of the stage and reuse renaming, written out by hand.
    ours = from_authors.state_dict()
    assert torch.equal(
        ours["relation_adapters.0.mlp.fc1.weight"], tensors["less_token.relation_reuse_conv.0.weight"]
    )
    assert torch.equal(
        ours["relation_adapters.1.mlp.fc2.bias"], tensors["normal_token.relation_reuse_conv.2.bias"]
    )
    assert torch.equal(
        ours["stages.1.blocks.3.reuse_mlp.1.fc2.weight"],
        tensors["less_token.blocks.3.feature_resuse_mlp.1.fc2.weight"],
    )
    assert torch.equal(
        ours["stages.0.patch_embed.attention1.attn.random_features"],
        tensors["less_less_token.tokens_to_token.attention1.w"],
    )
    assert set(authors_dvt_names(ours)) == set(shapes)

    project = tmp_path / "model.pt"
    torch.save({"model": from_authors.state_dict()}, project)
    from_project = _load("dvt_t2t_vit_12", project, weight_init="skip").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        exits_a, exits_b = from_authors(x), from_project(x)
    assert len(exits_a) == 3
    for a, b in zip(exits_a, exits_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    published = read_dvt_published(authors)
    assert published is not None and published.flops == pytest.approx([0.468, 1.446, 3.455])
    assert published.budgeted_batch_classification[1] == pytest.approx([70.0, 75.0, 78.0])
    assert len(published.dynamic_threshold) == 59
    assert read_dvt_published(project) is None


# --- errors ---------------------------------------------------------------------------------------


def test_another_architecture_names_the_model_it_looks_like(tmp_path: Path) -> None:
    path = tmp_path / "82.3_T2T_ViT_24.pth.tar"
    tensors = _random(_layout("t2t_vit_24"), device="meta")
    torch.save(_t2t_release(tensors, tensors, "t2t_vit_24"), path)
    with pytest.raises(CheckpointError) as err, torch.device("meta"):
        _load("t2t_vit_14", path)
    message = str(err.value)
    assert str(path) in message and "t2t_vit_14" in message
    assert "looks like t2t_vit_24" in message.replace("look like", "looks like")
    assert "blocks.14.norm1.weight" in message  # the first unexpected key
    assert "cls_token: checkpoint (1, 1, 512) vs model (1, 1, 384)" in message


def test_truncated_file_is_named_as_damaged(tmp_path: Path) -> None:
    tensors = _random(_layout("t2t_vit_7"))
    path = tmp_path / "71.7_T2T_ViT_7.pth.tar"
    torch.save(_t2t_release(tensors, tensors, "t2t_vit_7"), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged") as err:
        _load("t2t_vit_7", path)
    assert str(path) in str(err.value)

    garbage = tmp_path / "not_a_checkpoint.pth.tar"
    garbage.write_bytes(b"<html>403 Forbidden</html>" * 10)
    with pytest.raises(CheckpointError, match="damaged") as err:
        _load("t2t_vit_7", garbage)
    assert str(garbage) in str(err.value)

    with pytest.raises(CheckpointError, match="no such file"):
        _load("t2t_vit_7", tmp_path / "missing.pth.tar")


class Unsafe:
    """A class no safe unpickler knows: loading it would run this module's code."""


def test_pickle_needing_other_globals_is_refused_with_the_safe_way_out(tmp_path: Path) -> None:
    tensors = _random(_layout("t2t_vit_7"))
    release = _t2t_release(tensors, tensors, "t2t_vit_7")
    release["args"] = Unsafe()
    path = tmp_path / "unsafe.pth.tar"
    torch.save(release, path)
    with pytest.raises(CheckpointError) as err:
        _load("t2t_vit_7", path)
    message = str(err.value)
    assert str(path) in message and "Unsafe" in message
    assert "argparse.Namespace" in message and "trust" in message
