"""Tokens-to-Token ViT (Yuan et al., arXiv:2101.11986), section "From CNN to ViT": five CNN design
ideas carried into the paper's ViT-S/16 and into T2T-ViT-14.

================  ==========================  ====================================================
idea              T2T-ViT side (authors'      ViT side (no public code; the same construction on
                  code, exact counts)         the paper's ViT-S/16: depth 8, width 768, 8 heads,
                                              MLP ratio 3, no qkv bias, learned positions)
================  ==========================  ====================================================
deep-narrow /     ``t2t_vit_14`` itself;      ``vit_dn_paper``: depth 16, width 384, 6 heads;
shallow-wide      ``t2t_vit_14_wide``: width  ``vit_sw_paper``: depth 4, width 1024, 16 heads
                  768, depth 4, 12 heads
dense connection  ``t2t_vit_dense``: blocks   ``vit_dense_paper``: blocks 6/7/6, growth 64,
(DenseNet)        3/6/6/4, growth 64, widths  widths 128 -> 736, 8 heads, MLP ratio 4
                  128 -> 584, 8 heads, MLP 2
squeeze-excite    ``t2t_vit_14_se``           ``vit_se_paper``
(SENet)
more heads        ``t2t_vit_14_resnext``: 32  ``vit_resnext_paper``: 32 heads of dim 24
(ResNeXt)         heads of dim 12
ghost operation   ``t2t_vit_16_ghost``:       ``vit_ghost_paper``
(GhostNet)        depth 16
================  ==========================  ====================================================

Shapes and heads are configuration; SE and ghost layers are injected through timm's
``attn_layer``/``mlp_layer`` hooks; the dense backbones build their layers through ``block_fn``
(:mod:`pipeline.models.blocks`). ``docs/models.md`` records how the ViT-side choices compare with
the paper's printed parameters and MACs. Every entry merges its keyword arguments over these
defaults (``img_size``, ``num_classes``, ``drop_path_rate``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from timm.layers import LayerNorm, get_device_dtype, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter_fn
from torch import nn

from pipeline.models.blocks import DenseBlock, GhostAttention, GhostMlp, SqueezeExciteAttention, dense_layout
from pipeline.models.t2t_vit import T2TViT
from pipeline.models.t2t_vit import checkpoint_filter_fn as t2t_filter_fn
from pipeline.models.t2t_vit import pretrained_cfg as t2t_pretrained_cfg
from pipeline.models.vit import pretrained_cfg as vit_pretrained_cfg

__all__ = ["DenseT2TViT", "DenseViT"]


def _dense_block(
    *, layout: Sequence[tuple[int, int | None]], growth_rate: int, dim: int, depth: int, **kwargs: Any
) -> DenseBlock:
    """``block_fn`` for the dense backbones: timm calls it with the layer index as ``depth``.

    ``dim`` (timm passes the embedding width to every block) is replaced by the layer's own width.
    """
    in_dim, transition_dim = layout[depth]
    return DenseBlock(in_dim, growth_rate=growth_rate, transition_dim=transition_dim, depth=depth, **kwargs)


def _check_depth(depth: int | None, layout: Sequence[Any], block_config: Sequence[int]) -> None:
    if depth is not None and depth != len(layout):
        raise ValueError(
            f"a dense backbone's depth is sum(block_config) = {len(layout)} ({block_config}), got {depth}"
        )


class _DenseHeadMixin:
    """Final norm, head and feature info at the width the last dense block ends at.

    timm sizes them from ``embed_dim`` (the token width entering the first block), which a dense
    backbone outgrows. Mixed in before a ``VisionTransformer`` subclass built with
    ``weight_init='skip'``; :meth:`_finish_dense` then resizes and initialises everything once.
    """

    def _finish_dense(self, out_dim: int, norm_layer: Callable[..., nn.Module], weight_init: str) -> None:
        model: Any = self  # a VisionTransformer by construction
        if model.attn_pool is not None:
            raise ValueError("attention pooling ('map'/'prr') is not supported by the dense backbones")
        dd = get_device_dtype(model)
        model.num_features = model.head_hidden_size = out_dim
        if not isinstance(model.norm, nn.Identity):
            model.norm = norm_layer(out_dim, **dd)
        if not isinstance(model.fc_norm, nn.Identity):
            model.fc_norm = norm_layer(out_dim, **dd)
        model.head = nn.Linear(out_dim, model.num_classes, **dd) if model.num_classes > 0 else nn.Identity()
        reduction = model.feature_info[0]["reduction"] if model.feature_info else 16
        model.feature_info = [
            dict(module=f"blocks.{i}", num_chs=block.out_dim, reduction=reduction)
            for i, block in enumerate(model.blocks)
        ]
        model.weight_init_mode = "reset" if weight_init == "skip" else weight_init
        if weight_init != "skip":
            model.init_weights(needs_reset=False)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's ``reset_classifier``, with the new head at the dense output width."""
        model: Any = self
        super().reset_classifier(num_classes, global_pool)  # type: ignore[misc]
        if num_classes > 0:
            model.head = nn.Linear(model.num_features, num_classes, **get_device_dtype(model))
            model.head.train(model.training)


class DenseT2TViT(_DenseHeadMixin, T2TViT):
    """T2T-ViT with a DenseNet-style backbone (the authors' T2T-ViT-Dense).

    The T2T module projects to ``embed_dim`` (the frozen position table has that width); dense
    blocks of ``block_config`` layers each append ``growth_rate`` channels, and transitions halve
    the width between blocks. Stochastic depth rises linearly over all layers (timm's rule; the
    authors' code indexes its schedule by dense-block number instead, a slip that leaves every
    layer at most 0.03 at drop_path_rate 0.1).

    Args:
        embed_dim: Width of the tokens entering the first layer.
        block_config: Layers per dense block.
        growth_rate: Channels each layer appends.
        num_heads: Attention heads of every layer.
        mlp_ratio: MLP hidden width over each layer's input width.
        depth: Must equal ``sum(block_config)`` if given.
        norm_layer: Normalization layer (the authors' ``nn.LayerNorm``).
        weight_init: timm's ViT init mode.
        **kwargs: Further :class:`T2TViT` arguments.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 128,
        block_config: Sequence[int] = (3, 6, 6, 4),
        growth_rate: int = 64,
        num_heads: int = 8,
        mlp_ratio: float = 2.0,
        depth: int | None = None,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        weight_init: str = "",
        **kwargs: Any,
    ) -> None:
        layout = dense_layout(embed_dim, block_config, growth_rate)
        _check_depth(depth, layout, block_config)
        super().__init__(
            embed_dim=embed_dim,
            depth=len(layout),
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            norm_layer=norm_layer,
            block_fn=partial(_dense_block, layout=layout, growth_rate=growth_rate),
            weight_init="skip",
            **kwargs,
        )
        self._finish_dense(layout[-1][0] + growth_rate, norm_layer, weight_init)


class DenseViT(_DenseHeadMixin, VisionTransformer):
    """timm's ``VisionTransformer`` with a DenseNet-style backbone (the paper's ViT-Dense).

    As :class:`DenseT2TViT`, with a patch embedding and learned positions at ``embed_dim``.

    Args:
        embed_dim: Width of the patch tokens entering the first layer.
        block_config: Layers per dense block.
        growth_rate: Channels each layer appends.
        num_heads: Attention heads of every layer.
        mlp_ratio: MLP hidden width over each layer's input width.
        depth: Must equal ``sum(block_config)`` if given.
        norm_layer: Normalization layer (timm's ``LayerNorm`` by default, as the other ViTs).
        weight_init: timm's ViT init mode.
        **kwargs: Further ``VisionTransformer`` arguments.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 128,
        block_config: Sequence[int] = (6, 7, 6),
        growth_rate: int = 64,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        depth: int | None = None,
        norm_layer: Callable[..., nn.Module] | str | None = None,
        weight_init: str = "",
        **kwargs: Any,
    ) -> None:
        layout = dense_layout(embed_dim, block_config, growth_rate)
        _check_depth(depth, layout, block_config)
        norm = get_norm_layer(norm_layer) or LayerNorm
        super().__init__(
            embed_dim=embed_dim,
            depth=len(layout),
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            norm_layer=norm,
            block_fn=partial(_dense_block, layout=layout, growth_rate=growth_rate),
            weight_init="skip",
            **kwargs,
        )
        self._finish_dense(layout[-1][0] + growth_rate, norm, weight_init)


_T2T_NAMES = ("t2t_vit_14_resnext", "t2t_vit_14_wide", "t2t_vit_14_se", "t2t_vit_dense", "t2t_vit_16_ghost")
_VIT_NAMES = (
    "vit_dn_paper",
    "vit_sw_paper",
    "vit_dense_paper",
    "vit_se_paper",
    "vit_resnext_paper",
    "vit_ghost_paper",
)

default_cfgs = generate_default_cfgs(
    {
        **{name: t2t_pretrained_cfg() for name in _T2T_NAMES},
        # The ViT-side variants are the T2T-ViT paper's constructions, trained with the same recipe.
        **{name: vit_pretrained_cfg(paper_ids="arXiv:2101.11986") for name in _VIT_NAMES},
    }
)


def _create(cls: type[VisionTransformer], variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    return build_model_with_cfg(
        cls,
        variant,
        pretrained,
        pretrained_filter_fn=t2t_filter_fn if issubclass(cls, T2TViT) else vit_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


#: T2T-ViT-14's backbone, the base every T2T-side variant changes.
_T2T_14 = dict(tokens_type="performer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
#: The paper's ViT-S/16 (``vit_s16_paper``), the base every ViT-side variant changes.
_VIT_S16 = dict(patch_size=16, embed_dim=768, depth=8, num_heads=8, mlp_ratio=3.0, qkv_bias=False)


@register_model
def t2t_vit_14_resnext(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14-ResNeXt: T2T-ViT-14 with 32 heads of dim 12 (21,545,550 params)."""
    model_args = dict(_T2T_14, num_heads=32)
    return _create(T2TViT, "t2t_vit_14_resnext", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_14_wide(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14-Wide ("d768-4"): width 768, depth 4, 12 heads, MLP ratio 3 (25,156,302 params)."""
    model_args = dict(_T2T_14, embed_dim=768, depth=4, num_heads=12)
    return _create(T2TViT, "t2t_vit_14_wide", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_14_se(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14-SE: an SE gate (384 -> 24 -> 384) after every attention (21,803,598 params)."""
    model_args = dict(_T2T_14, attn_layer=SqueezeExciteAttention)
    return _create(T2TViT, "t2t_vit_14_se", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_dense(pretrained: bool = False, **kwargs: Any) -> DenseT2TViT:
    """T2T-ViT-Dense: dense blocks 3/6/6/4, growth 64, widths 128 -> 584, 8 heads (23,647,062 params)."""
    model_args = dict(
        tokens_type="performer",
        embed_dim=128,
        block_config=(3, 6, 6, 4),
        growth_rate=64,
        num_heads=8,
        mlp_ratio=2.0,
    )
    return _create(DenseT2TViT, "t2t_vit_dense", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_16_ghost(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-16-Ghost: depth 16, ghost q/k/v and MLP (16,253,262 params)."""
    model_args = dict(_T2T_14, depth=16, attn_layer=GhostAttention, mlp_layer=GhostMlp)
    return _create(T2TViT, "t2t_vit_16_ghost", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_dn_paper(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-DN (deep-narrow): ViT-S/16 at depth 16, width 384, 6 heads (24.4 M; paper 24.5 M)."""
    model_args = dict(_VIT_S16, embed_dim=384, depth=16, num_heads=6)
    return _create(VisionTransformer, "vit_dn_paper", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_sw_paper(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-SW (shallow-wide): ViT-S/16 at depth 4, width 1024, 16 heads (44.0 M; paper 47.9 M)."""
    model_args = dict(_VIT_S16, embed_dim=1024, depth=4, num_heads=16)
    return _create(VisionTransformer, "vit_sw_paper", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_dense_paper(pretrained: bool = False, **kwargs: Any) -> DenseViT:
    """ViT-Dense: patch-16 tokens at 128, dense blocks 6/7/6, growth 64 -> 736 (46.6 M; paper 46.7 M)."""
    model_args = dict(
        patch_size=16,
        embed_dim=128,
        block_config=(6, 7, 6),
        growth_rate=64,
        num_heads=8,
        mlp_ratio=4.0,
        qkv_bias=False,
    )
    return _create(DenseViT, "vit_dense_paper", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_se_paper(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-SE: ViT-S/16 with an SE gate (768 -> 48 -> 768) after every attention (49.3 M; paper 49.2 M)."""
    model_args = dict(_VIT_S16, attn_layer=SqueezeExciteAttention)
    return _create(VisionTransformer, "vit_se_paper", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_resnext_paper(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-ResNeXt: ViT-S/16 with 32 heads of dim 24 (48.8 M; paper 48.6 M)."""
    model_args = dict(_VIT_S16, num_heads=32)
    return _create(VisionTransformer, "vit_resnext_paper", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_ghost_paper(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-Ghost: ViT-S/16 with ghost q/k/v and MLP (32.2 M; paper 32.1 M)."""
    model_args = dict(_VIT_S16, attn_layer=GhostAttention, mlp_layer=GhostMlp)
    return _create(VisionTransformer, "vit_ghost_paper", pretrained, **dict(model_args, **kwargs))
