"""Not All Images are Worth 16x16 Words: Dynamic Transformers for Efficient Image Recognition
(Wang et al., arXiv:2105.15075, NeurIPS 2021).

DVT cascades three Transformers of the same width and depth that see the same image through
tokenizers of decreasing stride: 7x7, 10x10 and 14x14 tokens at 224x224. At inference an image
stops at the first stage whose softmax confidence reaches that stage's threshold
(:mod:`pipeline.dvt.inference`, :mod:`pipeline.dvt.thresholds`). Two mechanisms let a later stage
build on the one before it (chained: stage 3 reuses stage 2 only):

* **feature reuse**: every block ``l`` of the later stage has its own
  ``f_l = LN -> MLP(E -> 128 -> 48, GELU)`` applied to the upstream stage's final tokens (before its
  final LayerNorm). The class token is dropped, the 48-channel map is resized to the current grid
  (:func:`resize_grid`), a zero vector fills the class-token slot, and the result is concatenated
  into the block's MLP input: ``z_l = z'_l + MLP(LN(concat(z'_l, E_l)))`` with the MLP ``E+48 -> E``;
* **relationship reuse**: the upstream stage's pre-softmax attention logits of all L layers (its own
  reuse included), stacked as (B, h*L, n, n), go through one 1x1-convolution MLP
  (``h*L -> 3h*L -> h*L``, GELU), are resized on the key axis and then on the query axis (class row
  and column kept), split per layer and added to that layer's scaled attention logits.

Everything is timm: each stage is a ``VisionTransformer`` (:class:`~pipeline.models.t2t_vit.T2TViT`
for the T2T-ViT backbones) whose blocks are :class:`ReuseBlock` (timm's ``Block`` with the reuse
hooks) and whose attention is :class:`ReuseAttention`. One class, :class:`DynamicVisionTransformer`,
is the cascade for every backbone and every reuse combination.

**Other input sizes.** The tokenizers keep their kernel, stride and padding, so the token grid of
each stage is the unfold/convolution output size of the image: 7/10/14 at 224, 2/3/4 at 64, 12/16/24
at 384 (T2T) -- three strictly increasing grids for every side that is a multiple of 16 from 64 up.
Reuse resizes a ``h x w`` grid to ``H x W`` by nearest upsampling by the smallest integer factor
``m = ceil(H / h)`` (per axis), then adaptive average pooling: exactly the authors' 7 -> 14 -> 10 and
10 -> 20 -> 14 at 224.

Registered into timm (after ``import pipeline.models``)::

    timm.create_model("dvt_t2t_vit_12", num_classes=10, img_size=64, feature_reuse=True)

Training ``forward`` returns the three stages' logits (the loop's ``MultiExitTask`` sums their
losses); :meth:`DynamicVisionTransformer.forward_stage` runs one stage for early-exit inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, TypedDict

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipeline.models.checkpoints import explain_load_errors, make_filter
from pipeline.models.cost import count_macs
from pipeline.models.dvt_reuse import (
    REUSE_DIM,
    RelationReuse,
    ReuseAttention,
    ReuseBlock,
    ReuseState,
    resize_grid,
    stage_reuse_features,
)
from pipeline.models.t2t_vit import SOFT_SPLITS, SoftSplit, T2TViT

__all__ = [
    "DVT_PAPER",
    "DVT_PAPER_REUSE_DELTA",
    "DVT_PAPER_SINGLE_STAGE",
    "DVT_PAPER_SPEED",
    "DEIT_PATCH_EMBEDS",
    "T2T_FIRST_SPLITS",
    "DynamicVisionTransformer",
    "PaddedPatchEmbed",
    "RelationReuse",
    "ReuseAttention",
    "ReuseBlock",
    "ReuseState",
    "build_dvt",
    "resize_grid",
]

Backbone = Literal["t2t_vit", "deit"]

#: First soft split (kernel, stride, padding) per stage; the next two stay (3, 2, 1).
#: 224 gives 28 -> 14 -> 7, 38 -> 19 -> 10 and 56 -> 28 -> 14 tokens per side (arXiv:2105.15075).
T2T_FIRST_SPLITS: tuple[SoftSplit, ...] = ((14, 8, 3), (11, 6, 5), (7, 4, 2))

#: DeiT-S patch embedding per stage as (kernel = stride, padding): 7, 10 and 14 tokens per side at 224.
DEIT_PATCH_EMBEDS: tuple[tuple[int, int], ...] = ((32, 0), (23, 3), (16, 0))


class DVTPaperEntry(TypedDict):
    """Size and cost of one registered cascade at 224x224 in the authors' code (docs/dvt.md)."""

    params_all: int
    """Every tensor of the authors' code with both reuses on, frozen ones included."""
    stage_macs_g: tuple[float, float, float]
    """All-matmul GMACs of each stage alone, reuse modules counted in the stage that uses them."""


#: Wang et al., arXiv:2105.15075, recounted over the authors' code (github.com/blackfeather-wang/
#: Dynamic-Vision-Transformer) under the all-matmul convention of :mod:`pipeline.models.cost`.
#: Kept here rather than in :data:`pipeline.models.paper.PAPER`, whose rows are single-exit models.
DVT_PAPER: dict[str, DVTPaperEntry] = {
    "dvt_t2t_vit_12": DVTPaperEntry(params_all=22_461_516, stage_macs_g=(0.468, 0.978, 2.009)),
    "dvt_t2t_vit_14": DVTPaperEntry(params_all=67_881_836, stage_macs_g=(1.201, 2.618, 5.446)),
    "dvt_deit_small": DVTPaperEntry(params_all=70_442_232, stage_macs_g=(1.143, 2.500, 5.157)),
}

#: Wang et al., arXiv:2105.15075, Table 1: T2T-ViT-12 trained alone at 224 px on n x n tokens ->
#: (ImageNet top-1 %, GFLOPs). DVT-T2T-ViT-12's exits 1 and 3 see 7x7 and 14x14 tokens.
DVT_PAPER_SINGLE_STAGE: dict[int, tuple[float, float]] = {4: (60.8, 0.21), 7: (70.3, 0.47), 14: (76.7, 1.78)}

#: The same paper's throughput comparison on one 2080Ti at batch 128: (row, images/s, top-1 %); the
#: DVT rows are at the accuracy of the static model above them (top-1 None: not printed there).
DVT_PAPER_SPEED: tuple[tuple[str, int, float | None], ...] = (
    ("T2T-ViT-14", 619, 81.5),
    ("DVT at T2T-ViT-14's accuracy", 877, 81.5),
    ("T2T-ViT-19", 382, None),
    ("DVT at T2T-ViT-19's accuracy", 666, None),
)

#: The same paper's reuse ablation (T2T-ViT-12 cascade): top-1 change against both reuses on, in
#: points -- "about 4" without both, "about 2" without one.
DVT_PAPER_REUSE_DELTA: dict[tuple[bool, bool], float] = {
    (True, True): 0.0,
    (True, False): -2.0,
    (False, True): -2.0,
    (False, False): -4.0,
}


class _StageProbe(nn.Module):
    """Runs one stage of a cascade on given reuse inputs, so ``count_macs`` can count it alone."""

    def __init__(self, cascade: DynamicVisionTransformer, index: int, upstream: ReuseState | None) -> None:
        super().__init__()
        self.cascade, self.index, self.upstream = cascade, index, upstream
        self.state: ReuseState | None = None
        self.train(cascade.training)  # count_macs restores the probe's mode, hence the cascade's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, self.state = self.cascade.forward_stage(self.index, x, self.upstream)
        return logits


class DynamicVisionTransformer(nn.Module):
    """The DVT cascade: stages of increasing token count, each a classifier, chained by reuse.

    Args:
        stages: ``VisionTransformer`` backbones (any number >= 2, three in the paper) built with
            :class:`ReuseBlock` blocks; every stage after the first must have ``reuse_dim > 0`` in
            all its blocks iff ``feature_reuse``. They share no weights.
        feature_reuse: Feed each stage's blocks the previous stage's final tokens.
        relation_reuse: Add the previous stage's attention logits to each stage's attention.
        relation_hidden_ratio: Hidden channels of the relation MLP over its input channels.
    """

    def __init__(
        self,
        stages: Sequence[VisionTransformer],
        *,
        feature_reuse: bool = True,
        relation_reuse: bool = True,
        relation_hidden_ratio: int = 3,
    ) -> None:
        super().__init__()
        if len(stages) < 2:
            raise ValueError(f"a cascade needs at least two stages, got {len(stages)}")
        for index, stage in enumerate(stages):
            blocks = list(stage.blocks)
            if not all(isinstance(block, ReuseBlock) for block in blocks):
                raise ValueError(f"stage {index}: blocks must be ReuseBlock (pass block_fn=ReuseBlock)")
            reusing = [block.reuse_mlp is not None for block in blocks]
            expected = feature_reuse and index > 0
            if any(flag != expected for flag in reusing):
                raise ValueError(
                    f"stage {index}: feature_reuse={feature_reuse} needs reuse_dim "
                    f"{'> 0' if expected else '= 0'} in every block"
                )
        if len({stage.num_classes for stage in stages}) != 1:
            raise ValueError("every stage must have the same number of classes")
        if len({stage.num_prefix_tokens for stage in stages}) != 1:
            raise ValueError("every stage must have the same number of class/register tokens")
        self.stages = nn.ModuleList(stages)
        self.feature_reuse = feature_reuse
        self.relation_reuse = relation_reuse
        self.num_exits = len(stages)
        self.num_classes = stages[-1].num_classes
        self.num_prefix_tokens = stages[0].num_prefix_tokens
        dd = {"device": stages[0].cls_token.device if stages[0].cls_token is not None else None}
        # relation_adapters[k - 1] turns stage k-1's logits into stage k's biases.
        self.relation_adapters = nn.ModuleList(
            RelationReuse(_relation_channels(up), _relation_channels(stage), relation_hidden_ratio, **dd)
            for up, stage in zip(stages[:-1], stages[1:], strict=True)
            if relation_reuse
        )

    @property
    def grids(self) -> list[tuple[int, int]]:
        """Token grid ``(h, w)`` of every stage."""
        return [tuple(stage.patch_embed.grid_size) for stage in self.stages]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Each stage's no-decay parameters (class token, position table) under its prefix."""
        names: set[str] = set()
        for index, stage in enumerate(self.stages):
            names |= {f"stages.{index}.{name}" for name in stage.no_weight_decay()}
        return names

    def forward_stage(
        self, index: int, x: torch.Tensor, upstream: ReuseState | None = None
    ) -> tuple[torch.Tensor, ReuseState | None]:
        """Run stage ``index`` on images ``x``, reusing ``upstream`` (the previous stage's state).

        Args:
            index: Stage, 0-based.
            x: Images (B, C, H, W).
            upstream: The state stage ``index - 1`` returned for the same images; required for
                ``index > 0`` when any reuse is on.

        Returns:
            The stage's logits (B, classes) and the state for the next stage (None for the last).
        """
        stage = self.stages[index]
        reuses = index > 0 and (self.feature_reuse or self.relation_reuse)
        if reuses and upstream is None:
            raise ValueError(f"stage {index} reuses stage {index - 1}: pass its ReuseState")
        grid = tuple(stage.patch_embed.grid_size)
        prefix = stage.num_prefix_tokens
        tokens = stage.norm_pre(stage.patch_drop(stage._pos_embed(stage.patch_embed(x))))

        biases: Sequence[torch.Tensor | None] = [None] * len(stage.blocks)
        if self.relation_reuse and index > 0:
            bias = self.relation_adapters[index - 1](upstream.logits, upstream.grid, grid, prefix)
            biases = bias.to(tokens.dtype).chunk(len(stage.blocks), dim=1)
        is_last = index == self.num_exits - 1
        keep_logits = self.relation_reuse and not is_last

        features: Sequence[torch.Tensor | None] = [None] * len(stage.blocks)
        if self.feature_reuse and index > 0:
            features = stage_reuse_features(stage.blocks, upstream, grid, prefix)
        layer_logits = []
        for block, bias, reused in zip(stage.blocks, biases, features, strict=True):
            tokens, logits = block.forward_with_reuse(tokens, reused, bias, return_logits=keep_logits)
            if keep_logits:
                layer_logits.append(logits)
        out = stage.forward_head(stage.norm(tokens))
        if is_last:
            return out, None
        state = ReuseState(
            tokens=tokens if self.feature_reuse else None,
            logits=torch.cat(layer_logits, dim=1) if keep_logits else None,
            grid=grid,
            num_prefix_tokens=prefix,
        )
        return out, state

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's logits on every image, cheapest first (training and simulated exits)."""
        outputs, state = [], None
        for index in range(self.num_exits):
            logits, state = self.forward_stage(index, x, state)
            outputs.append(logits)
        return outputs

    def stage_macs(self, img_size: int | None = None) -> list[int]:
        """All-matmul MACs of each stage alone on one image, counted by :func:`count_macs`.

        Stage ``k`` runs on its reuse inputs (computed, uncounted, by the stages before it), so its
        count includes its reuse modules (``f_l``, the relation MLP) and nothing of the earlier
        stages. The cumulative sums are the costs of exiting at each stage. Works on the ``meta``
        device.

        Args:
            img_size: Image side; the size the stages were built for when None.

        Returns:
            MACs per stage.
        """
        first = self.stages[0]
        img_size = img_size or first.patch_embed.img_size[0]
        in_chans = first.patch_embed.proj.in_channels if hasattr(first.patch_embed, "proj") else 3
        macs, upstream = [], None
        for index in range(self.num_exits):
            probe = _StageProbe(self, index, upstream)
            macs.append(count_macs(probe, img_size, in_chans))
            upstream = probe.state
        return macs


def _relation_channels(stage: VisionTransformer) -> int:
    """Heads x layers of a stage: the channels of its stacked attention logits."""
    return sum(block.attn.num_heads for block in stage.blocks)


class PaddedPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with zero padding around the image (DVT's k23 s23 p3 tokenizer).

    The grid is ``(side + 2 * padding - patch) // patch + 1`` per axis.

    Args:
        img_size: Input side (or (height, width)).
        patch_size: Kernel and stride of the patch convolution.
        *args: Further ``PatchEmbed`` arguments.
        padding: Zero padding on every side.
        **kwargs: Further ``PatchEmbed`` arguments (``dynamic_img_pad`` must stay False).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        *args: Any,
        padding: int = 0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("dynamic_img_pad"):
            raise ValueError("PaddedPatchEmbed does not support dynamic_img_pad")
        super().__init__(img_size, patch_size, *args, **kwargs)
        self.padding = to_2tuple(padding)
        self.proj.padding = self.padding  # zeros padding mode: the conv reads this attribute per call
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)

    def _init_img_size(self, img_size: int | tuple[int, int]) -> tuple[Any, Any, Any]:
        padding = getattr(self, "padding", (0, 0))  # unset while the parent's __init__ calls this
        if img_size is None:
            return None, None, None
        img_size = to_2tuple(img_size)
        grid_size = self.dynamic_feat_size(img_size, padding)
        return img_size, grid_size, grid_size[0] * grid_size[1]

    def dynamic_feat_size(
        self, img_size: tuple[int, int], padding: tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """Token grid of an image of ``img_size``."""
        pad = padding if padding is not None else self.padding
        return tuple((s + 2 * p - k) // k + 1 for s, p, k in zip(img_size, pad, self.patch_size, strict=True))


def _t2t_stage(first_split: SoftSplit, reuse_dim: int, **kwargs: Any) -> T2TViT:
    return T2TViT(
        soft_splits=(first_split, *SOFT_SPLITS[1:]),
        block_fn=partial(ReuseBlock, reuse_dim=reuse_dim),
        attn_layer=ReuseAttention,
        **kwargs,
    )


def _deit_stage(patch: tuple[int, int], reuse_dim: int, **kwargs: Any) -> VisionTransformer:
    size, padding = patch
    return VisionTransformer(
        patch_size=size,
        embed_layer=partial(PaddedPatchEmbed, padding=padding),
        block_fn=partial(ReuseBlock, reuse_dim=reuse_dim),
        attn_layer=ReuseAttention,
        **kwargs,
    )


def build_dvt(
    backbone: Backbone,
    *,
    feature_reuse: bool = True,
    relation_reuse: bool = True,
    reuse_dim: int = REUSE_DIM,
    geometry: Sequence[Any] | None = None,
    **kwargs: Any,
) -> DynamicVisionTransformer:
    """Build three stages of one backbone and cascade them.

    Args:
        backbone: ``t2t_vit`` (:class:`T2TViT` stages) or ``deit`` (timm ``VisionTransformer`` stages).
        feature_reuse: Feature reuse on stages 2 and 3.
        relation_reuse: Relationship reuse on stages 2 and 3.
        reuse_dim: Channels of the reused features.
        geometry: Per-stage tokenizer: first soft splits (T2T) or (patch, padding) pairs (DeiT);
            :data:`T2T_FIRST_SPLITS` / :data:`DEIT_PATCH_EMBEDS` when None.
        **kwargs: Arguments of every stage (``embed_dim``, ``depth``, ``num_classes``, ``img_size``, ...).

    Returns:
        The cascade.
    """
    if backbone == "t2t_vit":
        make, geometry = _t2t_stage, geometry or T2T_FIRST_SPLITS
    elif backbone == "deit":
        make, geometry = _deit_stage, geometry or DEIT_PATCH_EMBEDS
    else:
        raise ValueError(f"backbone must be 't2t_vit' or 'deit', got {backbone!r}")
    stages = [
        make(tokenizer, reuse_dim if feature_reuse and index > 0 else 0, **kwargs)
        for index, tokenizer in enumerate(geometry)
    ]
    return DynamicVisionTransformer(stages, feature_reuse=feature_reuse, relation_reuse=relation_reuse)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """Data config of the T2T-ViT/DeiT evaluation the DVT authors use: resize 248, centre crop 224."""
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
        "classifier": ("stages.0.head", "stages.1.head", "stages.2.head"),
        "paper_ids": "arXiv:2105.15075",
        "paper_name": "Not All Images are Worth 16x16 Words: Dynamic Transformers for Efficient Image "
        "Recognition",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in DVT_PAPER})


def _create_dvt(variant: str, pretrained: bool = False, **kwargs: Any) -> DynamicVisionTransformer:
    # Loads the DVT authors' releases (their stage names) and this project's checkpoints alike.
    with explain_load_errors(pretrained, kwargs.get("pretrained_cfg_overlay")):
        return build_model_with_cfg(
            build_dvt, variant, pretrained, pretrained_filter_fn=make_filter(), **kwargs
        )


@register_model
def dvt_t2t_vit_12(pretrained: bool = False, **kwargs: Any) -> DynamicVisionTransformer:
    """DVT on T2T-ViT-12: three T2T-ViT-12 stages (7x7, 10x10, 14x14 tokens), both reuses on."""
    model_args = dict(backbone="t2t_vit", tokens_type="performer", embed_dim=256, depth=12, num_heads=4,
                      mlp_ratio=2.0)  # fmt: skip
    return _create_dvt("dvt_t2t_vit_12", pretrained, **dict(model_args, **kwargs))


@register_model
def dvt_t2t_vit_14(pretrained: bool = False, **kwargs: Any) -> DynamicVisionTransformer:
    """DVT on T2T-ViT-14: three T2T-ViT-14 stages (7x7, 10x10, 14x14 tokens), both reuses on."""
    model_args = dict(backbone="t2t_vit", tokens_type="performer", embed_dim=384, depth=14, num_heads=6,
                      mlp_ratio=3.0)  # fmt: skip
    return _create_dvt("dvt_t2t_vit_14", pretrained, **dict(model_args, **kwargs))


@register_model
def dvt_deit_small(pretrained: bool = False, **kwargs: Any) -> DynamicVisionTransformer:
    """DVT on DeiT-small: three DeiT-S stages (patches 32, 23 + padding 3, 16), both reuses on."""
    model_args = dict(backbone="deit", embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True)
    return _create_dvt("dvt_deit_small", pretrained, **dict(model_args, **kwargs))
