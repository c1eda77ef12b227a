"""The "From CNN to ViT" variants: the T2T side matches the authors' code exactly, and the injected
layers compute what the authors' separate-tensor formulation computes (tests/test_zoo.py trains every
variant)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.models import PAPER, count_macs, count_params
from pipeline.models.blocks import GhostAttention, GhostMlp, SqueezeExciteAttention, dense_layout

VARIANTS = timm.list_models(module="cnn_to_vit")
T2T_SIDE = ["t2t_vit_14_resnext", "t2t_vit_14_wide", "t2t_vit_14_se", "t2t_vit_dense", "t2t_vit_16_ghost"]
VIT_SIDE = [
    "vit_dn_paper",
    "vit_sw_paper",
    "vit_dense_paper",
    "vit_se_paper",
    "vit_resnext_paper",
    "vit_ghost_paper",
]


def test_registry_lists_every_variant_under_its_own_name() -> None:
    assert set(VARIANTS) == set(T2T_SIDE) | set(VIT_SIDE)
    assert not set(VARIANTS) & set(timm.list_models(module="vision_transformer"))
    assert all(name in PAPER for name in VARIANTS)


def _meta(name: str, **kwargs: object) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", T2T_SIDE)
def test_t2t_side_parameter_counts_match_the_authors_code(name: str) -> None:
    row = PAPER[name]
    assert count_params(_meta(name)) == (row["params_all"], row["params_trainable"])


@pytest.mark.parametrize("name", T2T_SIDE)
def test_t2t_side_macs_match_the_all_matmul_column(name: str) -> None:
    macs = count_macs(_meta(name), 224) / 1e9
    assert macs == pytest.approx(PAPER[name]["macs_g_all_matmul"], rel=5e-3)


def test_vit_side_keeps_the_paper_vit_s16_where_the_idea_does_not_touch_it() -> None:
    base = count_params(_meta("vit_s16_paper"))[0]
    assert count_params(_meta("vit_resnext_paper"))[0] == base  # more heads, same tensors
    # SE adds 2 x 768 x 48 bias-free weights per block.
    assert count_params(_meta("vit_se_paper"))[0] == base + 8 * 2 * 768 * 48
    resnext = _meta("vit_resnext_paper")
    assert resnext.blocks[0].attn.num_heads == 32 and resnext.blocks[0].attn.head_dim == 24


def test_configured_shapes_follow_the_authors_code() -> None:
    resnext = _meta("t2t_vit_14_resnext")
    assert resnext.blocks[0].attn.num_heads == 32 and resnext.blocks[0].attn.head_dim == 12
    wide = _meta("t2t_vit_14_wide")
    assert (len(wide.blocks), wide.embed_dim, wide.blocks[0].attn.head_dim) == (4, 768, 64)
    ghost = _meta("t2t_vit_16_ghost")
    assert len(ghost.blocks) == 16 and isinstance(ghost.blocks[0].mlp, GhostMlp)
    assert (
        ghost.blocks[0].attn.qkv.primary.out_features == 3 * 192
        and ghost.blocks[0].attn.qkv.primary.bias is None
    )
    se = _meta("t2t_vit_14_se").blocks[0].attn
    assert isinstance(se, SqueezeExciteAttention)
    assert se.se.fc.fc1.weight.shape == (24, 384) and se.se.fc.fc1.bias is None and se.se.fc.fc2.bias is None


@pytest.mark.parametrize(
    ("name", "transitions", "out_dim"),
    [
        ("t2t_vit_dense", [(320, 160), (544, 272), (656, 328)], 584),  # blocks 3/6/6/4
        ("vit_dense_paper", [(512, 256), (704, 352)], 736),  # blocks 6/7/6
    ],
)
def test_dense_widths_grow_by_64_and_transitions_halve_them(
    name: str, transitions: list[tuple[int, int]], out_dim: int
) -> None:
    model = _meta(name, num_classes=7)
    assert len(model.blocks) == 19
    assert model.blocks[0].norm1.normalized_shape == (128,)
    assert model.blocks[-1].norm1.normalized_shape == (out_dim - 64,)
    found = [
        (block.transition[0].in_features, block.transition[0].out_features)
        for block in model.blocks
        if isinstance(block.transition, torch.nn.Sequential)
    ]
    assert found == transitions
    assert model.num_features == model.norm.normalized_shape[0] == model.head.in_features == out_dim
    model.reset_classifier(3)
    assert (model.head.in_features, model.head.out_features) == (out_dim, 3)
    with pytest.raises(ValueError, match=r"sum\(block_config\)"):
        _meta(name, depth=4)


def test_dense_layout_matches_the_authors_loop() -> None:
    layout = dense_layout(128, (3, 6, 6, 4), 64)
    assert layout[:4] == [(128, None), (192, None), (256, 160), (160, None)]
    assert layout[-1] == (520, None)  # 520 + 64 = 584 channels reach the norm and head
    assert [t for _, t in layout if t] == [160, 272, 328]


def test_squeeze_excite_gates_channels_by_their_token_mean() -> None:
    torch.manual_seed(0)
    attn = SqueezeExciteAttention(32, num_heads=4, se_ratio=1 / 8).eval()
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
    y = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 32))
    w1, w2 = attn.se.fc.fc1.weight, attn.se.fc.fc2.weight
    gate = torch.sigmoid(F.relu(y.mean(dim=1, keepdim=True) @ w1.T) @ w2.T)
    torch.testing.assert_close(attn(x), y * gate)


def test_ghost_attention_matches_separate_q_k_v_with_cheap_copies() -> None:
    # The authors' layout: q = [W_q x, s_q * W_q x] split into heads, the same for k and v.
    torch.manual_seed(0)
    dim, heads = 16, 2
    attn = GhostAttention(dim, num_heads=heads).eval()
    x = torch.randn(2, 5, dim)
    weights = attn.qkv.primary.weight.split(dim // 2)
    scales = attn.qkv.cheap.weight.flatten().split(dim // 2)

    def heads_of(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        half = x @ w.T
        return torch.cat((half, half * s), dim=-1).reshape(2, 5, heads, dim // heads).transpose(1, 2)

    q, k, v = (heads_of(w, s) for w, s in zip(weights, scales, strict=True))
    weights_qk = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
    expected = attn.proj((weights_qk @ v).transpose(1, 2).reshape(2, 5, dim))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_ghost_mlp_hidden_layer_is_one_computed_slice_and_two_cheap_ones() -> None:
    torch.manual_seed(0)
    mlp = GhostMlp(8, 24).eval()
    x = torch.randn(2, 5, 8)
    computed = F.gelu(mlp.fc1(x))
    scales = mlp.cheap.weight.view(8, 2)  # two scalars per channel
    ghosts = F.gelu(computed.unsqueeze(-1) * scales).flatten(-2)
    torch.testing.assert_close(mlp(x), mlp.fc2(torch.cat((computed, ghosts), dim=-1)))
    assert sum(p.numel() for p in mlp.parameters()) == (8 * 8 + 8) + 2 * 8 + (24 * 8 + 8)
