"""DVT: the registered cascades match the authors' code in size and cost, and every variant trains."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_trains
from timm.models.vision_transformer import Block

import pipeline.models.cost as cost
from pipeline.models import PAPER, count_macs, count_params
from pipeline.models.dvt import (
    DVT_PAPER,
    DVT_PAPER_SINGLE_STAGE,
    DynamicVisionTransformer,
    RelationReuse,
    ReuseBlock,
    ReuseState,
    build_dvt,
    resize_grid,
)
from pipeline.train.task import MultiExitTask, task_for

DVT_MODELS = sorted(DVT_PAPER)
REUSE = list(itertools.product([False, True], repeat=2))  # (feature_reuse, relation_reuse)
TINY = dict(num_classes=10, img_size=64, depth=2, embed_dim=64, num_heads=2)


def test_registry_lists_every_cascade() -> None:
    assert set(DVT_MODELS) == {"dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_deit_small"}
    assert set(DVT_MODELS) <= set(timm.list_models("dvt_*"))
    assert not set(DVT_MODELS) & set(timm.list_models(module="vision_transformer"))
    import pipeline.models

    assert "dvt" in pipeline.models.__all__  # `import pipeline.models` alone registers the cascades


@pytest.mark.parametrize("name", DVT_MODELS)
def test_parameter_counts_match_the_authors_code(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert isinstance(model, DynamicVisionTransformer) and model.num_exits == 3
    assert count_params(model)[0] == DVT_PAPER[name]["params_all"]


@pytest.mark.parametrize("name", DVT_MODELS)
def test_stage_macs_match_the_paper(name: str) -> None:
    with torch.device("meta"):  # FlopCounterMode needs shapes only
        model = timm.create_model(name)
    macs = [m / 1e9 for m in model.stage_macs()]
    for measured, expected in zip(macs, DVT_PAPER[name]["stage_macs_g"], strict=True):
        assert measured == pytest.approx(expected, rel=1e-2)
        assert measured == pytest.approx(expected, abs=5.01e-4)  # equal to the three decimals given
    # Running the whole cascade costs the three stages together.
    assert count_macs(model, 224) == sum(model.stage_macs())


def test_single_stage_results_of_the_paper_match_the_cascades_grids() -> None:
    # arXiv:2105.15075: T2T-ViT-12 trained alone on n x n tokens -> (top-1 %, GFLOPs).
    assert DVT_PAPER_SINGLE_STAGE == {14: (76.7, 1.78), 7: (70.3, 0.47), 4: (60.8, 0.21)}
    with torch.device("meta"):
        model = timm.create_model("dvt_t2t_vit_12")
    sides = [grid[0] for grid in model.grids]
    assert sides[0] in DVT_PAPER_SINGLE_STAGE and sides[-1] in DVT_PAPER_SINGLE_STAGE  # exits 1 and 3
    # The published single-stage costs are the cascade's first stage and T2T-ViT-12 (its last stage
    # without reuse), to the paper's two decimals.
    assert DVT_PAPER_SINGLE_STAGE[sides[0]][1] == pytest.approx(model.stage_macs()[0] / 1e9, abs=5e-3)
    static = PAPER["t2t_vit_12"]["macs_g_all_matmul"]
    assert DVT_PAPER_SINGLE_STAGE[sides[-1]][1] == pytest.approx(static, abs=2e-2)


@pytest.mark.parametrize(
    ("name", "img_size", "grids"),
    [
        ("dvt_t2t_vit_12", 224, [7, 10, 14]),
        ("dvt_deit_small", 224, [7, 10, 14]),
        ("dvt_t2t_vit_14", 64, [2, 3, 4]),
        ("dvt_deit_small", 64, [2, 3, 4]),
        ("dvt_t2t_vit_14", 384, [12, 16, 24]),
    ],
)
def test_stages_see_increasing_token_grids(name: str, img_size: int, grids: list[int]) -> None:
    with torch.device("meta"):
        model = timm.create_model(name, img_size=img_size)
    assert model.grids == [(g, g) for g in grids]
    assert [stage.pos_embed.shape[1] for stage in model.stages] == [g * g + 1 for g in grids]


def test_grids_increase_at_every_side_from_64() -> None:
    from pipeline.models.dvt import DEIT_PATCH_EMBEDS, T2T_FIRST_SPLITS, PaddedPatchEmbed
    from pipeline.models.t2t_vit import SOFT_SPLITS, T2TModule

    with torch.device("meta"):
        for side in range(64, 1025, 16):
            t2t = [T2TModule(side, soft_splits=(first, *SOFT_SPLITS[1:]), patch_size=first[1] * 4).grid_size
                   for first in T2T_FIRST_SPLITS]  # fmt: skip
            deit = [PaddedPatchEmbed(side, size, padding=pad).grid_size for size, pad in DEIT_PATCH_EMBEDS]
            for grids in (t2t, deit):
                assert grids[0][0] < grids[1][0] < grids[2][0], (side, grids)


def test_stages_share_no_weights() -> None:
    model = timm.create_model("dvt_t2t_vit_12", **TINY)
    pointers = [{p.data_ptr() for p in stage.parameters()} for stage in model.stages]
    assert not (pointers[0] & pointers[1] or pointers[1] & pointers[2] or pointers[0] & pointers[2])


@pytest.mark.parametrize("name", ["dvt_t2t_vit_12", "dvt_deit_small"])
@pytest.mark.parametrize(("feature_reuse", "relation_reuse"), REUSE)
def test_every_reuse_combination_trains(name: str, feature_reuse: bool, relation_reuse: bool) -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        name, feature_reuse=feature_reuse, relation_reuse=relation_reuse, drop_path_rate=0.1, **TINY
    )
    assert (model.feature_reuse, model.relation_reuse) == (feature_reuse, relation_reuse)
    assert len(model.relation_adapters) == (2 if relation_reuse else 0)
    for index, stage in enumerate(model.stages):
        assert all((block.reuse_mlp is not None) == (feature_reuse and index > 0) for block in stage.blocks)
    assert_trains(model.train(), exits=3)


def test_training_loop_sums_the_exit_losses() -> None:
    model = timm.create_model("dvt_deit_small", **TINY)
    aug = type("Aug", (), {"label_smoothing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0})()
    task = task_for(model, 10, aug)
    assert isinstance(task, MultiExitTask)
    outputs = model(torch.randn(2, 3, 64, 64))
    target = torch.tensor([1, 2])
    expected = sum(F.cross_entropy(o, target) for o in outputs)
    torch.testing.assert_close(task.loss(outputs, target), expected)
    assert task.logits(outputs) is outputs[-1]


def test_forward_is_the_chain_of_stages() -> None:
    torch.manual_seed(0)
    model = timm.create_model("dvt_t2t_vit_12", **TINY).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        outputs = model(images)
        state = None
        for index in range(3):
            logits, state = model.forward_stage(index, images, state)
            torch.testing.assert_close(logits, outputs[index])
    assert state is None  # the last stage hands nothing on


def test_later_stages_need_the_upstream_state() -> None:
    model = timm.create_model("dvt_t2t_vit_12", **TINY)
    with pytest.raises(ValueError, match="ReuseState"):
        model.forward_stage(1, torch.randn(1, 3, 64, 64))


def test_cascade_rejects_stages_built_for_other_flags() -> None:
    stages = list(build_dvt("deit", feature_reuse=False, **TINY).stages)
    with pytest.raises(ValueError, match="feature_reuse=True"):
        DynamicVisionTransformer(stages, feature_reuse=True)


def test_resize_grid_is_the_authors_upsample_then_pool() -> None:
    torch.manual_seed(0)
    for source, target, upsampled in [(7, 10, 14), (10, 14, 20)]:
        x = torch.randn(2, 48, source, source)
        expected = F.adaptive_avg_pool2d(F.interpolate(x, (upsampled, upsampled), mode="nearest"), target)
        torch.testing.assert_close(resize_grid(x, (target, target)), expected)
    x = torch.randn(5, 4, 4)
    assert resize_grid(x, (4, 4)) is x
    assert resize_grid(x, (2, 3)).shape == (5, 2, 3)


def _authors_relation_resize(relations: torch.Tensor, source: int, target: int) -> torch.Tensor:
    """The reshape sequence of the authors' ``forward_features`` for reused relations (after the MLP)."""
    upsample = torch.nn.Upsample(size=(2 * source, 2 * source), mode="nearest")
    pool = torch.nn.AdaptiveAvgPool2d((target, target))
    new_hw = target * target
    temp = relations[:, :, :, 1:]
    batch, heads, n, hw = temp.shape
    temp = pool(upsample(temp.reshape(-1, n, source, source))).reshape(-1, n, new_hw)
    temp = torch.cat((relations[:, :, :, 0].reshape(-1, n, 1), temp), dim=2).transpose(1, 2)
    cls_row, temp = temp[:, :, 0:1], temp[:, :, 1:]
    temp = pool(upsample(temp.reshape(-1, new_hw + 1, source, source))).reshape(-1, new_hw + 1, new_hw)
    return torch.cat((cls_row, temp), dim=2).transpose(1, 2).reshape(batch, -1, new_hw + 1, new_hw + 1)


@pytest.mark.parametrize(("source", "target"), [(7, 10), (10, 14)])
def test_relation_reuse_matches_the_authors_reshapes(source: int, target: int) -> None:
    torch.manual_seed(0)
    adapter = RelationReuse(8, 8)
    logits = torch.randn(2, 8, source * source + 1, source * source + 1)
    with torch.no_grad():
        expected = _authors_relation_resize(adapter.mlp(logits), source, target)
        got = adapter(logits, (source, source), (target, target), 1)
    torch.testing.assert_close(got, expected)
    # While MACs are counted the resize runs as gathers (zero MACs, as the paper counts it): same bias.
    token = cost._COUNTING.set(True)
    try:
        with torch.no_grad():
            counted = adapter(logits, (source, source), (target, target), 1)
    finally:
        cost._COUNTING.reset(token)
    torch.testing.assert_close(counted, expected)


def test_reuse_block_follows_the_paper_formula() -> None:
    torch.manual_seed(0)
    dim, reuse_dim, tokens = 32, 48, 10
    block = ReuseBlock(dim, 2, reuse_dim=reuse_dim, mlp_ratio=2.0).eval()
    x, features = torch.randn(2, tokens, dim), torch.randn(2, tokens, reuse_dim)
    bias = torch.randn(2, 2, tokens, tokens)
    with torch.no_grad():
        out, logits = block.forward_with_reuse(x, features, bias, return_logits=True)
        q, k, v = block.attn.qkv(block.norm1(x)).reshape(2, tokens, 3, 2, 16).permute(2, 0, 3, 1, 4)
        expected_logits = q @ k.transpose(-2, -1) * 16**-0.5 + bias
        attended = (expected_logits.softmax(-1) @ v).transpose(1, 2).reshape(2, tokens, dim)
        z = x + block.attn.proj(attended)
        expected = z + block.mlp(block.norm2(torch.cat([z, features], dim=-1)))
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert block.mlp.fc1.in_features == dim + reuse_dim and block.mlp.fc2.out_features == dim
    with pytest.raises(RuntimeError, match="upstream features"):
        block(x)


def test_plain_reuse_block_is_timms_block() -> None:
    torch.manual_seed(0)
    block = ReuseBlock(32, 2, qkv_bias=True).eval()
    reference = Block(32, 2, qkv_bias=True).eval()
    reference.load_state_dict(block.state_dict())
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        explicit, logits = block.forward_with_reuse(x, return_logits=True)  # the unfused path
        torch.testing.assert_close(explicit, reference(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(block(x), reference(x))
    assert logits.shape == (2, 2, 10, 10)


def test_feature_reuse_gives_the_class_slot_a_zero_vector() -> None:
    torch.manual_seed(0)
    block = ReuseBlock(32, 2, reuse_dim=48)
    upstream = ReuseState(tokens=torch.randn(2, 1 + 4, 32), logits=None, grid=(2, 2), num_prefix_tokens=1)
    features = block.reuse_features(upstream, (3, 3), 1)
    assert features.shape == (2, 1 + 9, 48)
    assert torch.equal(features[:, 0], torch.zeros(2, 48))
    # The class token's own f_l output plays no part.
    changed = ReuseState(upstream.tokens.clone(), None, (2, 2), 1)
    changed.tokens[:, 0] += 10.0
    torch.testing.assert_close(block.reuse_features(changed, (3, 3), 1), features)


def test_reuse_state_selects_samples() -> None:
    state = ReuseState(torch.arange(12.0).reshape(3, 2, 2), torch.zeros(3, 4, 2, 2), (1, 1), 1)
    picked = state.index_select(torch.tensor([2, 0]))
    assert torch.equal(picked.tokens, state.tokens[[2, 0]])
    assert picked.logits.shape == (2, 4, 2, 2) and picked.grid == (1, 1)


def test_meta_and_cpu_stage_macs_agree() -> None:
    model = timm.create_model("dvt_t2t_vit_12", **TINY)
    with torch.device("meta"):
        meta_model = timm.create_model("dvt_t2t_vit_12", **TINY)
    assert model.stage_macs() == meta_model.stage_macs()
    assert model.training  # counting restores the mode


def test_fit_trains_a_cascade_through_the_shared_loop(tiny_shards: Path) -> None:
    from pipeline.config import AugmentConfig, TrainConfig
    from pipeline.train.loop import LocalSession, RunSpec, fit

    cfg = TrainConfig(img_size=64, epochs=1, warmup_epochs=0, cooldown_epochs=0, batch_size=8, lr=1e-3,
                      drop_path_rate=0.1, num_workers=1, augment=AugmentConfig(scale_min=0.5),
                      ema_decay=0.9)  # fmt: skip
    tiny = {"depth": 2, "embed_dim": 64, "num_heads": 2}
    spec = RunSpec(variant="dvt_tiny", model="dvt_t2t_vit_12", train=cfg, shards=str(tiny_shards),
                   num_classes=4, model_kwargs=tiny)  # fmt: skip
    session = LocalSession()
    metrics = fit(spec, session)
    assert len(session.history) == 1 and 0 <= metrics["val_top1"] <= 100
    for prefix in ("val_top1_exit", "ema_val_top1_exit"):  # every exit, raw and EMA weights
        assert all(0 <= metrics[f"{prefix}{k}"] <= 100 for k in (1, 2, 3))
    assert metrics["ema_val_top1"] == metrics["ema_val_top1_exit3"]
    assert any(key.startswith("stages.2.blocks.0.reuse_mlp") for key in session.state["model"])
