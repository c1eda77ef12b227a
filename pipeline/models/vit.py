"""An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale (Dosovitskiy et al.,
arXiv:2010.11929), configured as the T2T-ViT paper (arXiv:2101.11986) compares against it.

The baselines are timm's ``VisionTransformer`` with the paper's settings, registered under names
that end in ``_paper`` so they never shadow timm's own models:

=====================  ======================================================  ============
name                   configuration                                           params (1k)
=====================  ======================================================  ============
``vit_s16_paper``      the paper's ViT-S/16: depth 8, width 768, 8 heads,      48,754,408
                       MLP ratio 3, no qkv bias (not timm's ``vit_small_*``)
``vit_b16_paper``      ViT-B/16: depth 12, width 768, 12 heads, MLP ratio 4    86,567,656
``vit_l16_paper``      ViT-L/16: depth 24, width 1024, 16 heads, MLP ratio 4   304,326,632
``deit_small_paper``   DeiT-small (Touvron et al., arXiv:2012.12877): depth    22,050,664
                       12, width 384, 6 heads, MLP ratio 4, qkv bias
=====================  ======================================================  ============

Every entry function merges its keyword arguments over these defaults, so a demo-scale model is
one call: ``timm.create_model("deit_small_paper", img_size=64, patch_size=8, depth=4,
embed_dim=192, num_heads=3, num_classes=10)``.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as timm_filter_fn

from pipeline.models.checkpoints import explain_load_errors, make_filter

__all__ = ["checkpoint_filter_fn"]

#: timm's ViT filter behind this project's checkpoint rules (EMA first, stored position table resized
#: as the authors do, head kept or dropped by class count, architecture checked):
#: :mod:`pipeline.models.checkpoints`.
checkpoint_filter_fn = make_filter(base=timm_filter_fn)


def pretrained_cfg(**kwargs: Any) -> dict[str, Any]:
    """Data config of the DeiT-style from-scratch recipe the paper trains every baseline with."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "paper_ids": "arXiv:2010.11929",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vit_s16_paper": pretrained_cfg(),
        "vit_b16_paper": pretrained_cfg(),
        "vit_l16_paper": pretrained_cfg(),
        # DeiT's own evaluation: resize 256, centre crop 224.
        "deit_small_paper": pretrained_cfg(paper_ids="arXiv:2012.12877", crop_pct=0.875),
    }
)


def _create_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    with explain_load_errors(pretrained, kwargs.get("pretrained_cfg_overlay")):
        return build_model_with_cfg(
            VisionTransformer,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=3, feature_cls="getter"),
            **kwargs,
        )


@register_model
def vit_s16_paper(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The T2T-ViT paper's ViT-S/16: depth 8, width 768, 8 heads, MLP 2304, no qkv bias (48.6 M)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=8, num_heads=8, mlp_ratio=3.0, qkv_bias=False)
    return _create_vit("vit_s16_paper", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_b16_paper(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16: depth 12, width 768, 12 heads, MLP 3072, qkv bias (86.6 M)."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True)
    return _create_vit("vit_b16_paper", pretrained, **dict(model_args, **kwargs))


@register_model
def vit_l16_paper(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-L/16: depth 24, width 1024, 16 heads, MLP 4096, qkv bias (304.3 M)."""
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, qkv_bias=True)
    return _create_vit("vit_l16_paper", pretrained, **dict(model_args, **kwargs))


@register_model
def deit_small_paper(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """DeiT-small: depth 12, width 384, 6 heads, MLP 1536, qkv bias (22.1 M)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True)
    return _create_vit("deit_small_paper", pretrained, **dict(model_args, **kwargs))
