"""T2T-ViT and the paper's ViTs: registered under their own names, built as the authors' code builds them."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import assert_trains
from timm.layers import DropPath

from pipeline.models import PAPER, count_params
from pipeline.models.t2t_vit import (
    PerformerTokenAttention,
    T2TViT,
    TokenAttention,
    checkpoint_filter_fn,
    sinusoid_table,
)

# Every model registered by the two family modules (other modules may add more t2t_vit* names).
T2T_MODELS = timm.list_models(module="t2t_vit")
PAPER_VITS = timm.list_models(module="vit")


def test_registry_lists_every_variant() -> None:
    expected = {
        "t2t_vit_7", "t2t_vit_10", "t2t_vit_12", "t2t_vit_14", "t2t_vit_19", "t2t_vit_24",
        "t2t_vit_t_14", "t2t_vit_t_19", "t2t_vit_t_24",
    }  # fmt: skip
    assert expected <= set(T2T_MODELS) <= set(timm.list_models("t2t_vit*"))
    assert {"vit_s16_paper", "vit_b16_paper", "vit_l16_paper", "deit_small_paper"} <= set(PAPER_VITS)
    assert not set(PAPER_VITS) & set(timm.list_models(module="vision_transformer"))


# Every registered model trains at two layers (tests/test_zoo.py sweeps the registry); these at full
# depth, the dense one with all four of its blocks and three transitions.
@pytest.mark.parametrize("name", ["t2t_vit_7", "t2t_vit_t_14", "t2t_vit_dense"])
def test_full_depth_model_trains(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, img_size=64, drop_path_rate=0.1)
    assert_trains(model)


def test_demo_vit_overrides_every_size() -> None:
    model = timm.create_model(
        "deit_small_paper", img_size=64, patch_size=8, depth=4, embed_dim=192, num_heads=3, num_classes=10
    )
    assert model.patch_embed.num_patches == 64
    assert len(model.blocks) == 4
    assert_trains(model)


@pytest.mark.parametrize("key", [k for k, row in PAPER.items() if row["params_all"] is not None])
def test_parameter_counts_match_the_authors_code(key: str) -> None:
    row = PAPER[key]
    with torch.device("meta"):  # no memory, no init cost: the counts need shapes only
        model = timm.create_model(row["model"], img_size=row["img_size"], num_classes=1000)
    all_params, trainable = count_params(model)
    assert all_params == row["params_all"]
    # A ViT has no frozen tensors, so PAPER leaves its trainable column empty.
    assert trainable == (row["params_trainable"] or row["params_all"])


#: The authors' README table of released models (github.com/yitu-opensource/T2T-ViT): ImageNet-1k top-1.
README_TOP1 = {
    "t2t_vit_7": 71.7, "t2t_vit_10": 75.2, "t2t_vit_12": 76.5,
    "t2t_vit_14": 81.5, "t2t_vit_19": 81.9, "t2t_vit_24": 82.3,
    "t2t_vit_t_14": 81.7, "t2t_vit_t_19": 82.4, "t2t_vit_t_24": 82.6,
    "t2t_vit_14@384": 83.3,
}  # fmt: skip


def test_every_t2t_vit_variant_has_its_published_top1_and_source() -> None:
    assert {k for k in PAPER if PAPER[k]["model"] in T2T_MODELS} == set(README_TOP1)
    for key, top1 in README_TOP1.items():
        assert PAPER[key]["top1"] == top1, key
        assert "github.com/yitu-opensource/T2T-ViT README" in PAPER[key]["top1_source"], key
    for key in ("t2t_vit_14", "t2t_vit_14@384", "t2t_vit_24"):  # also in the paper's ViT comparison
        assert "arXiv:2101.11986" in PAPER[key]["top1_source"], key
    assert all((row["top1"] is None) == (row["top1_source"] is None) for row in PAPER.values())


@pytest.mark.parametrize(("img_size", "tokens"), [(64, 16), (224, 196), (384, 576)])
def test_position_table_follows_img_size(img_size: int, tokens: int) -> None:
    with torch.device("meta"):
        model = timm.create_model("t2t_vit_14", img_size=img_size)
    assert model.patch_embed.num_patches == tokens
    assert model.pos_embed.shape == (1, tokens + 1, 384)
    assert not model.pos_embed.requires_grad


def test_t2t_module_makes_196_tokens_from_224() -> None:
    model = timm.create_model("t2t_vit_7", num_classes=0).eval()
    with torch.no_grad():
        tokens = model.patch_embed(torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 196, 256)


def test_position_table_is_sinusoidal_and_frozen() -> None:
    model = timm.create_model("t2t_vit_7", img_size=64, num_classes=10)
    table = model.pos_embed[0]
    assert torch.equal(model.pos_embed, sinusoid_table(17, 256))
    assert table[0, 0] == 0 and table[0, 1] == 1  # class token at position 0: sin 0, cos 0
    assert table[3, 2].item() == pytest.approx(math.sin(3 / 10000 ** (2 / 256)), abs=1e-6)
    assert table[3, 3].item() == pytest.approx(math.cos(3 / 10000 ** (2 / 256)), abs=1e-6)
    assert model.no_weight_decay() == {"cls_token", "pos_embed"}


def test_backbone_follows_the_authors_code() -> None:
    model = timm.create_model("t2t_vit_14", img_size=64, drop_path_rate=0.1)
    assert isinstance(model, T2TViT)
    block = model.blocks[-1]
    assert block.attn.qkv.bias is None and block.attn.head_dim == 64
    assert isinstance(block.drop_path1, DropPath) and block.drop_path1.drop_prob == pytest.approx(0.1)
    assert model.blocks[0].norm1.eps == 1e-5
    attn = model.patch_embed.attention1.attn
    assert isinstance(attn, PerformerTokenAttention)
    assert attn.kqv.in_features == 147 and attn.kqv.out_features == 192
    assert attn.random_features.shape == (32, 64) and not attn.random_features.requires_grad
    # Orthogonal rows scaled by sqrt(32).
    gram = attn.random_features @ attn.random_features.T
    torch.testing.assert_close(gram, 32 * torch.eye(32), atol=1e-3, rtol=0)
    t_attn = timm.create_model("t2t_vit_t_14", img_size=64).patch_embed.attention2.attn
    assert isinstance(t_attn, TokenAttention) and t_attn.scale == 576**-0.5


def test_performer_matches_the_quadratic_kernel_formula() -> None:
    torch.manual_seed(0)
    layer = PerformerTokenAttention(147, 64, proj_drop=0.0).double().eval()
    x = torch.randn(2, 50, 147, dtype=torch.float64)
    k, q, v = layer.kqv(x).split(64, dim=-1)
    w = layer.random_features

    def phi(u: torch.Tensor) -> torch.Tensor:
        return torch.exp(u @ w.T - (u * u).sum(-1, keepdim=True) / 2) / math.sqrt(32)

    kernel = phi(q) @ phi(k).transpose(1, 2)  # (B, T, T) positive "attention" weights
    expected = v + layer.proj((kernel @ v) / (kernel.sum(-1, keepdim=True) + layer.eps))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_token_transformer_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    layer = TokenAttention(147, 64).eval()
    x = torch.randn(2, 30, 147)
    q, k, v = layer.qkv(x).split(64, dim=-1)
    weights = ((q * 147**-0.5) @ k.transpose(1, 2)).softmax(-1)
    torch.testing.assert_close(layer(x), v + layer.proj(weights @ v), rtol=1e-4, atol=1e-5)


def test_t2t_vit_7_is_finite_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = timm.create_model("t2t_vit_7", num_classes=10, img_size=64)
    images = torch.randn(2, 3, 64, 64)
    for scale in (1.0, 30.0):  # large inputs drive every random feature towards underflow
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images * scale)
        assert torch.isfinite(logits).all()
        F.cross_entropy(logits.float(), torch.tensor([0, 1])).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_performer_is_finite_when_every_feature_underflows() -> None:
    # exp(w.u - |u|^2/2) underflows for |u| this large; the authors' fp16 path divides 0 by 0 here.
    layer = PerformerTokenAttention(147, 64, proj_drop=0.0).eval()
    with torch.no_grad():
        layer.kqv.weight.mul_(1e3)
    with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():
        out = layer(torch.randn(2, 40, 147))
    assert torch.isfinite(out).all()


def test_authors_checkpoint_names_load() -> None:
    model = timm.create_model("t2t_vit_7", img_size=64, num_classes=10)
    # Rename ours to the authors' layout, then back through the filter.
    authors = {}
    for key, value in model.state_dict().items():
        if key.startswith("patch_embed."):
            key = key.replace("patch_embed.", "tokens_to_token.").replace(".attn.random_features", ".w")
            key = key.replace(".attn.kqv.", ".kqv.").replace(".attn.proj.", ".proj.")
            key = key.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2.")
        authors[f"module.{key}"] = value
    assert "tokens_to_token.attention1.w" in {k.removeprefix("module.") for k in authors}
    restored = checkpoint_filter_fn(authors, model)
    assert restored.keys() == model.state_dict().keys()
    model.load_state_dict(restored, strict=True)
