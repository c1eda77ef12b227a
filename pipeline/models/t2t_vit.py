"""Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet (Yuan et al., arXiv:2101.11986).

T2T-ViT replaces ViT's 16x16 patch embedding with a Tokens-to-Token (T2T) module: three overlapping
"soft splits" (unfold with kernel/stride/padding (7, 4, 2), (3, 2, 1), (3, 2, 1)) with a narrow
(width 64) attention layer between consecutive splits, then a linear projection to the backbone
width. The backbone is timm's ``VisionTransformer`` with a frozen sinusoidal position table. Two
flavours of T2T layer exist: ``performer`` (T2T-ViT, linear attention with 32 fixed random
features) and ``transformer`` (T2T-ViT_t, single-head softmax attention).

The module reproduces the authors' released code (github.com/yitu-opensource/T2T-ViT) to the exact
parameter count, including two details the paper leaves out:

* the Performer T2T layer always applies dropout 0.1 after its projection and after its MLP
  (``t2t_drop_rate`` overrides it);
* the backbone uses ``nn.LayerNorm`` (eps 1e-5) and the authors' ``drop_rate`` means dropout after
  the position table and inside every block, not timm's head dropout.

The authors' released checkpoints load through timm's pretrained path (:func:`checkpoint_filter_fn`,
:mod:`pipeline.models.checkpoints`).

Every variant registers into timm, so after ``import pipeline.models``::

    timm.create_model("t2t_vit_14", num_classes=10, img_size=64)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipeline.models.checkpoints import explain_load_errors, make_filter
from pipeline.models.t2t_tokens import (
    PATCH_SIZE,
    SOFT_SPLITS,
    PerformerTokenAttention,
    SoftSplit,
    T2TModule,
    TokenAttention,
    TokenLayer,
    TokensType,
    autocast_off,
    nominal_patch_size,
    sinusoid_table,
)

__all__ = [
    "PATCH_SIZE",
    "SOFT_SPLITS",
    "PerformerTokenAttention",
    "SoftSplit",
    "TokensType",
    "autocast_off",
    "nominal_patch_size",
    "T2TModule",
    "T2TViT",
    "TokenAttention",
    "TokenLayer",
    "checkpoint_filter_fn",
    "sinusoid_table",
]


class T2TViT(VisionTransformer):
    """T2T-ViT: timm's ``VisionTransformer`` with a :class:`T2TModule` embedding and a frozen table.

    Differences from timm's ViT, all from the authors' code: the position table is sinusoidal and
    frozen (a non-trainable Parameter, so it is saved and counted but never updated), the class
    token is drawn with std 0.02, qkv has no bias, LayerNorm eps is 1e-5, and ``drop_rate`` is the
    dropout after the position table and inside the blocks (timm's head dropout stays 0).

    Args:
        img_size: Input side (or (height, width)); sides divisible by 16 give side / 16 tokens each.
        in_chans: Image channels.
        num_classes: Classes of the linear head (0 for none).
        embed_dim: Backbone width.
        depth: Backbone blocks.
        num_heads: Attention heads (the paper keeps head dim 64).
        mlp_ratio: MLP hidden width over ``embed_dim``.
        tokens_type: ``performer`` (T2T-ViT) or ``transformer`` (T2T-ViT_t) T2T layers.
        token_dim: Width of the T2T layers.
        t2t_drop_rate: Dropout inside the T2T layers; None takes the authors' defaults.
        soft_splits: (kernel, stride, padding) of the T2T module's three soft splits.
        qkv_bias: Bias on the backbone's qkv projections.
        drop_rate: Dropout after the position table and inside every block.
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, rising linearly to this value over the blocks.
        norm_layer: Normalization layer of the backbone.
        **kwargs: Further ``VisionTransformer`` arguments (``global_pool``, ``weight_init``, ...).
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        tokens_type: TokensType = "performer",
        token_dim: int = 64,
        t2t_drop_rate: float | None = None,
        soft_splits: Sequence[SoftSplit] = SOFT_SPLITS,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        **kwargs: Any,
    ) -> None:
        embed_layer = partial(
            T2TModule,
            tokens_type=tokens_type,
            token_dim=token_dim,
            drop_rate=t2t_drop_rate,
            soft_splits=soft_splits,
        )
        super().__init__(
            img_size=img_size,
            patch_size=nominal_patch_size(soft_splits),
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            pos_drop_rate=drop_rate,
            proj_drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            embed_layer=embed_layer,
            norm_layer=norm_layer,
            **kwargs,
        )
        self.tokens_type = tokens_type
        # Also here, not only in init_weights, so that weight_init='skip' still yields a frozen table.
        self._reset_pos_embed()

    def _reset_pos_embed(self) -> None:
        if self.pos_embed is None:
            return
        with torch.no_grad():
            self.pos_embed.copy_(sinusoid_table(self.pos_embed.shape[1], self.pos_embed.shape[2]))
        self.pos_embed.requires_grad_(False)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's ViT init (trunc-normal std 0.02 linears, zero biases) plus the authors' two changes."""
        super().init_weights(mode, needs_reset)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self._reset_pos_embed()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters the optimizer should not decay (the table is frozen anyway)."""
        return {"cls_token", "pos_embed"}


def checkpoint_filter_fn(state_dict: dict[str, Any], model: T2TViT) -> dict[str, torch.Tensor]:
    """Prepare a checkpoint of the authors' code, timm or this project for ``model``.

    Unwraps the file (``state_dict_ema`` first), strips ``module.``, renames the authors' tensors
    (``tokens_to_token.`` becomes ``patch_embed.``; the Performer layer's ``kqv``/``proj``/``w`` move
    under ``attn``, ``w`` as ``random_features``; its ``mlp.0``/``mlp.2`` become ``fc1``/``fc2``) and
    keeps the checkpoint's position table: the stored one is what the authors evaluate, and a model
    fine-tuned from another size stores a resized table that is no fresh sinusoid. At another grid
    the table is resized bicubically, class token kept, as the authors' ``resize_pos_embed`` does
    (:mod:`pipeline.models.checkpoints`).

    Args:
        state_dict: The checkpoint as read (a dict holding the weights, or the weights).
        model: The model the tensors are for.

    Returns:
        The renamed tensors.

    Raises:
        CheckpointError: the tensors are not ``model``'s architecture.
    """
    return _FILTER(state_dict, model)


_FILTER = make_filter()


def pretrained_cfg(**kwargs: Any) -> dict[str, Any]:
    """Data config of the authors' evaluation: bicubic resize to 248, centre crop 224."""
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
        "classifier": "head",
        "paper_ids": "arXiv:2101.11986",
        "paper_name": "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        name: pretrained_cfg()
        for name in (
            "t2t_vit_7",
            "t2t_vit_10",
            "t2t_vit_12",
            "t2t_vit_14",
            "t2t_vit_19",
            "t2t_vit_24",
            "t2t_vit_t_14",
            "t2t_vit_t_19",
            "t2t_vit_t_24",
        )
    }
)


def _create_t2t_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> T2TViT:
    with explain_load_errors(pretrained, kwargs.get("pretrained_cfg_overlay")):
        return build_model_with_cfg(
            T2TViT,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=3, feature_cls="getter"),
            **kwargs,
        )


@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-7: Performer T2T layers; depth 7, width 256, 4 heads, MLP ratio 2."""
    model_args = dict(tokens_type="performer", embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0)
    return _create_t2t_vit("t2t_vit_7", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_10(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-10: Performer T2T layers; depth 10, width 256, 4 heads, MLP ratio 2."""
    model_args = dict(tokens_type="performer", embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0)
    return _create_t2t_vit("t2t_vit_10", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-12: Performer T2T layers; depth 12, width 256, 4 heads, MLP ratio 2."""
    model_args = dict(tokens_type="performer", embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0)
    return _create_t2t_vit("t2t_vit_12", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14: Performer T2T layers; depth 14, width 384, 6 heads, MLP ratio 3."""
    model_args = dict(tokens_type="performer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
    return _create_t2t_vit("t2t_vit_14", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_19(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-19: Performer T2T layers; depth 19, width 448, 7 heads, MLP ratio 3."""
    model_args = dict(tokens_type="performer", embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0)
    return _create_t2t_vit("t2t_vit_19", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_24(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-24: Performer T2T layers; depth 24, width 512, 8 heads, MLP ratio 3."""
    model_args = dict(tokens_type="performer", embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0)
    return _create_t2t_vit("t2t_vit_24", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-14: Transformer T2T layers; depth 14, width 384, 6 heads, MLP ratio 3."""
    model_args = dict(tokens_type="transformer", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0)
    return _create_t2t_vit("t2t_vit_t_14", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_t_19(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-19: Transformer T2T layers; depth 19, width 448, 7 heads, MLP ratio 3."""
    model_args = dict(tokens_type="transformer", embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0)
    return _create_t2t_vit("t2t_vit_t_19", pretrained, **dict(model_args, **kwargs))


@register_model
def t2t_vit_t_24(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-24: Transformer T2T layers; depth 24, width 512, 8 heads, MLP ratio 3."""
    model_args = dict(tokens_type="transformer", embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0)
    return _create_t2t_vit("t2t_vit_t_24", pretrained, **dict(model_args, **kwargs))
