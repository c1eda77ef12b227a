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

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, TypedDict

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, ConvMlp, Mlp, PatchEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from pipeline.models.checkpoints import explain_load_errors, make_filter
from pipeline.models.cost import count_macs
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

#: Channels of the reused features and hidden width of each block's ``f_l`` (the authors' 48 and 128).
REUSE_DIM, REUSE_HIDDEN = 48, 128


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


def resize_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize the last two axes of ``x`` (a token grid) to ``size`` the way DVT resizes reused maps.

    Nearest upsampling by the smallest integer factor ``m = ceil(H / h)`` per axis (so every source
    cell is repeated ``m`` times), then adaptive average pooling to ``size``. At 224 this is the
    authors' 7 -> 14 -> 10 and 10 -> 20 -> 14; it is linear and acts on each axis separately.

    Args:
        x: Tensor of shape (..., h, w).
        size: Target grid ``(H, W)``.

    Returns:
        Tensor of shape (..., H, W).
    """
    return _resize_axes(x, x.dim() - 2, (int(size[0]), int(size[1])))


def _resize_axes(x: torch.Tensor, dim: int, size: tuple[int, int]) -> torch.Tensor:
    """:func:`resize_grid` on axes ``dim`` and ``dim + 1`` of ``x``, one axis at a time.

    Each output cell of an axis is a weighted sum of at most a few source cells (the upsampled cells
    its pooling bin covers), so the resize is a few gathers and additions: no upsampled copy, no
    pooling pass over many tiny maps, and no matrix product (MAC counts stay those of the paper).
    The gathers are fastest when the axes after ``dim + 1`` are large and contiguous (callers keep
    channels last).
    """
    for axis, target in ((dim + 1, size[1]), (dim, size[0])):
        if x.shape[axis] != target:
            out = None
            for index, weight in _resize_taps(x.shape[axis], target):
                part = x.index_select(axis, index.to(x.device))
                if weight is not None:
                    shape = [1] * x.dim()
                    shape[axis] = target
                    part = part * weight.to(device=x.device, dtype=x.dtype).view(shape)
                out = part if out is None else out + part
            x = out
    return x


@functools.lru_cache(maxsize=64)
def _resize_taps(source: int, target: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One axis of the resize as taps: output ``i`` = sum over taps of ``x[index[i]] * weight[i]``.

    Nearest upsampling by ``m = ceil(target / source)`` (upsampled cell ``c`` is source cell
    ``c // m``) followed by adaptive average pooling, whose bin ``i`` covers upsampled cells
    ``floor(i L / target) .. ceil((i + 1) L / target) - 1`` (``L = m * source``). Weight None: all 1.
    """
    factor = math.ceil(target / source)
    length = source * factor
    bins = [((i * length) // target, -((-(i + 1) * length) // target)) for i in range(target)]
    taps = max(end - start for start, end in bins)
    out = []
    for t in range(taps):
        index = torch.tensor([(start + min(t, end - start - 1)) // factor for start, end in bins])
        weight = torch.tensor([1.0 / (end - start) if t < end - start else 0.0 for start, end in bins])
        out.append((index, None if bool((weight == 1).all()) else weight))
    return out


def _resize_token_axis(
    x: torch.Tensor, dim: int, source: tuple[int, int], target: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """Resize axis ``dim`` of ``x`` from ``prefix + source`` tokens to ``prefix + target`` tokens."""
    dim = dim % x.dim()
    prefix = x.narrow(dim, 0, num_prefix_tokens)
    grid = x.narrow(dim, num_prefix_tokens, x.shape[dim] - num_prefix_tokens).unflatten(dim, source)
    grid = _resize_axes(grid, dim, target).flatten(dim, dim + 1)
    return torch.cat([prefix, grid], dim=dim)


class ReuseAttention(Attention):
    """timm's ``Attention`` that can add a bias to, and return, its pre-softmax logits.

    ``forward`` is timm's (fused attention where available); :meth:`forward_with_logits` computes the
    logits explicitly, as relationship reuse needs them.
    """

    def forward_with_logits(
        self, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over ``x`` (B, N, C), adding ``bias`` (B, heads, N, N) to the scaled logits.

        Returns:
            The output (B, N, C) and the logits after the bias, before the softmax (B, heads, N, N).
        """
        if self.gate is not None:
            raise NotImplementedError("gated attention is not supported by DVT's relationship reuse")
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        weights = self.attn_drop(logits.softmax(dim=-1))
        x = (weights @ v).transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        x = self.proj_drop(self.proj(self.norm(x)))
        return x, logits

    def forward_with_bias(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over ``x`` (B, N, C) adding ``bias`` (B, heads, N, N) to the scaled logits, without
        returning them: timm's fused kernel with the bias as its additive mask (the same numbers as
        :meth:`forward_with_logits` up to float rounding)."""
        if bias is None:
            return self(x)
        if self.gate is not None or not self.fused_attn:
            return self.forward_with_logits(x, bias)[0]
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class ReuseBlock(Block):
    """timm's pre-norm ``Block`` with DVT's feature-reuse hook and :class:`ReuseAttention`.

    With ``reuse_dim > 0`` the block owns ``f_l`` (:attr:`reuse_mlp`) and its second LayerNorm and
    MLP take ``dim + reuse_dim`` channels: ``z = z' + MLP(LN(concat(z', E)))``. Such a block needs
    the upstream features, so it only runs through :meth:`forward_with_reuse`; with ``reuse_dim = 0``
    it is exactly timm's block (same parameters, same ``forward``).

    Args:
        dim: Token width.
        num_heads: Attention heads.
        reuse_dim: Channels of the reused features (48 in the paper; 0 for none).
        reuse_hidden: Hidden width of ``f_l`` (128 in the paper).
        reuse_in_dim: Width of the upstream tokens (``dim`` when None).
        mlp_ratio: MLP hidden width over ``dim``.
        proj_bias: Bias on the output projections.
        proj_drop: Dropout after projections (and inside ``f_l``, as in the authors' code).
        act_layer: MLP activation.
        norm_layer: Normalization layer.
        mlp_layer: MLP class.
        scale_mlp_norm: Normalise inside the MLP (timm option).
        attn_layer: Must be timm's ``Attention`` or :class:`ReuseAttention`; the block uses the latter.
        device: Device of the weights.
        dtype: Dtype of the weights.
        **kwargs: Further ``Block`` arguments (``qkv_bias``, ``drop_path``, ``init_values``, ...).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        reuse_dim: int = 0,
        reuse_hidden: int = REUSE_HIDDEN,
        reuse_in_dim: int | None = None,
        mlp_ratio: float = 4.0,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        mlp_layer: type[nn.Module] = Mlp,
        scale_mlp_norm: bool = False,
        attn_layer: Any = ReuseAttention,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        if attn_layer not in (Attention, ReuseAttention):
            raise ValueError(f"ReuseBlock needs timm's Attention, got {attn_layer!r}")
        dd = {"device": device, "dtype": dtype}
        super().__init__(
            dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            proj_bias=proj_bias,
            proj_drop=proj_drop,
            act_layer=act_layer,
            norm_layer=norm_layer,
            mlp_layer=mlp_layer,
            scale_mlp_norm=scale_mlp_norm,
            attn_layer=ReuseAttention,
            **dd,
            **kwargs,
        )
        self.reuse_dim = reuse_dim
        self.reuse_mlp: nn.Module | None = None
        if reuse_dim:
            # Replace the parent's LN(dim) and MLP(dim -> dim) by their widened versions.
            self.norm2 = norm_layer(dim + reuse_dim, **dd)
            self.mlp = mlp_layer(
                in_features=dim + reuse_dim,
                hidden_features=int(dim * mlp_ratio),
                out_features=dim,
                act_layer=act_layer,
                norm_layer=norm_layer if scale_mlp_norm else None,
                bias=proj_bias,
                drop=proj_drop,
                **dd,
            )
            in_dim = reuse_in_dim or dim
            self.reuse_mlp = nn.Sequential(
                norm_layer(in_dim, **dd),
                Mlp(in_dim, reuse_hidden, reuse_dim, act_layer=act_layer, drop=proj_drop, **dd),
            )

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """timm's block forward; refuses to run a feature-reusing block without its features."""
        if self.reuse_mlp is not None:
            raise RuntimeError("a feature-reusing block needs upstream features: run it through the cascade")
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    def reuse_features(
        self, upstream: ReuseState, target_grid: tuple[int, int], num_prefix_tokens: int
    ) -> torch.Tensor:
        """``E_l``: this block's ``f_l`` of the upstream tokens, resized, with zero prefix slots.

        ``f_l`` runs on every upstream token and the class token's output is then dropped, as in the
        authors' code (and its MAC counts); dropping it first would save one token's worth.

        Args:
            upstream: The previous stage's state, with its final tokens (B, p + h*w, E_up).
            target_grid: This stage's grid ``(H, W)``.
            num_prefix_tokens: This stage's class (and register) tokens, given zero vectors.

        Returns:
            (B, num_prefix_tokens + H*W, reuse_dim).
        """
        if self.reuse_mlp is None:
            raise RuntimeError("this block was built without feature reuse (reuse_dim=0)")
        return _reuse_features([self], upstream, target_grid, num_prefix_tokens)[0]

    def forward_with_reuse(
        self,
        x: torch.Tensor,
        features: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block with reused features concatenated into its MLP input and a bias on its logits.

        Args:
            x: Tokens (B, N, dim).
            features: ``E_l`` from :meth:`reuse_features` (B, N, reuse_dim); required iff reuse_dim > 0.
            bias: Reused relations for this layer (B, heads, N, N), added to the scaled logits.
            return_logits: Also return the pre-softmax logits (computed explicitly, no fused kernel).

        Returns:
            The new tokens and the logits (None unless asked for and no bias forced them).
        """
        if (features is None) != (self.reuse_mlp is None):
            raise ValueError("features must be given exactly when the block was built with reuse_dim > 0")
        h = self.norm1(x)
        logits = None
        if return_logits:
            h, logits = self.attn.forward_with_logits(h, bias)
        else:
            h = self.attn.forward_with_bias(h, bias)
        x = x + self.drop_path1(self.ls1(h))
        h = x if features is None else torch.cat([x, features.to(x.dtype)], dim=-1)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(h))))
        return x, logits


class RelationReuse(nn.Module):
    """Relationship reuse: upstream attention logits -> a bias for every layer of the next stage.

    The stacked logits (B, h*L, n, n) go through a 1x1-convolution MLP (timm's ``ConvMlp``,
    ``in -> 3 in -> out``, GELU), are resized on the key axis and then on the query axis with
    :func:`resize_grid` (class-token rows and columns kept as they are) and returned as (B, out, N, N)
    for the caller to split per layer.

    Args:
        in_channels: Upstream heads x layers.
        out_channels: This stage's heads x layers.
        hidden_ratio: MLP hidden channels over ``in_channels`` (3 in the paper).
        device: Device of the weights.
        dtype: Dtype of the weights.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_ratio: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.mlp = ConvMlp(
            in_channels,
            in_channels * hidden_ratio,
            out_channels,
            act_layer=nn.GELU,
            device=device,
            dtype=dtype,
        )

    def forward(
        self,
        logits: torch.Tensor,
        source_grid: tuple[int, int],
        target_grid: tuple[int, int],
        num_prefix_tokens: int,
    ) -> torch.Tensor:
        """Map (B, in, p + h*w, p + h*w) upstream logits to a (B, out, p + H*W, p + H*W) bias."""
        # Resized as (queries, keys, B, channels): each gather then moves whole B x channels slices.
        x = self.mlp(logits).permute(2, 3, 0, 1).contiguous()
        x = _resize_token_axis(x, 1, source_grid, target_grid, num_prefix_tokens)  # keys
        x = _resize_token_axis(x, 0, source_grid, target_grid, num_prefix_tokens)  # queries
        return x.permute(2, 3, 0, 1).contiguous()


@dataclass(frozen=True)
class ReuseState:
    """What one stage hands to the next.

    Attributes:
        tokens: Final tokens before the last LayerNorm (B, p + h*w, E); None without feature reuse.
        logits: Pre-softmax attention logits of all layers, stacked (B, heads*L, p + h*w, p + h*w);
            None without relationship reuse.
        grid: The stage's token grid ``(h, w)``.
        num_prefix_tokens: Class (and register) tokens ``p`` in front of the grid.
    """

    tokens: torch.Tensor | None
    logits: torch.Tensor | None
    grid: tuple[int, int]
    num_prefix_tokens: int

    def index_select(self, index: torch.Tensor) -> ReuseState:
        """The state of the samples ``index`` only (early exit keeps the samples that go on)."""
        return replace(
            self,
            tokens=None if self.tokens is None else self.tokens.index_select(0, index),
            logits=None if self.logits is None else self.logits.index_select(0, index),
        )


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
            features = _reuse_features(stage.blocks, upstream, grid, prefix)
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


def _reuse_features(
    blocks: Sequence[ReuseBlock], upstream: ReuseState, grid: tuple[int, int], num_prefix_tokens: int
) -> list[torch.Tensor]:
    """Every block's ``E_l`` (:meth:`ReuseBlock.reuse_features`), with one resize for all of them.

    Each ``f_l`` runs on the upstream tokens as before; the maps are then resized together (resizing
    acts per channel), which saves a resize and its copies per block.
    """
    if upstream.tokens is None:
        raise ValueError("the upstream state carries no tokens (built without feature reuse)")
    prefix = upstream.num_prefix_tokens
    maps = torch.cat([block.reuse_mlp(upstream.tokens)[:, prefix:] for block in blocks], -1)
    maps = _resize_axes(maps.unflatten(1, upstream.grid), 1, grid).flatten(1, 2)  # (B, H*W, channels)
    maps = F.pad(maps, (0, 0, num_prefix_tokens, 0))
    return list(maps.split([block.reuse_dim for block in blocks], dim=-1))


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
