"""The Tokens-to-Token module of T2T-ViT (Yuan et al., arXiv:2101.11986): soft splits and T2T layers.

A soft split unfolds overlapping k x k patches into tokens; between two soft splits a narrow (width
64) attention layer re-structures the tokens: a Performer layer (T2T-ViT, linear attention with 32
fixed random features) or a single-head Transformer layer (T2T-ViT_t). The definitions follow the
authors' code (github.com/yitu-opensource/T2T-ViT) to the parameter; :mod:`pipeline.models.t2t_vit`
builds the models on them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp, to_2tuple
from torch import nn

TokensType = Literal["performer", "transformer"]

#: (kernel, stride, padding) of one soft split.
SoftSplit = tuple[int, int, int]

#: (kernel, stride, padding) of the three soft splits; the strides multiply to the patch size 16.
SOFT_SPLITS: tuple[SoftSplit, ...] = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
PATCH_SIZE = math.prod(stride for _, stride, _ in SOFT_SPLITS)


def nominal_patch_size(soft_splits: Sequence[SoftSplit]) -> int:
    """The product of the soft splits' strides: the patch size the splits stand in for."""
    return math.prod(stride for _, stride, _ in soft_splits)


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed position table of "Attention Is All You Need", shape ``(1, num_positions, dim)``.

    ``angle(pos, j) = pos / 10000^(2 * (j // 2) / dim)``; sine on even channels, cosine on odd ones.
    Computed in float64 (as the authors' numpy code) and returned as float32.
    """
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    exponent = (2 * (torch.arange(dim) // 2)).to(torch.float64) / dim
    angle = position / torch.pow(10000.0, exponent)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float().unsqueeze(0)


def _split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Side of the grid an unfold leaves: ``floor((size + 2p - k) / s) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A context that disables autocast on ``device_type`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class PerformerTokenAttention(nn.Module):
    """Single-head Performer (FAVOR+) attention that narrows tokens from ``dim`` to ``dim_out``.

    ``k, q, v`` come from one linear layer, in that order. With the positive random-feature map
    ``phi(u) = exp(W u - |u|^2 / 2) / sqrt(m)`` the output is
    ``phi(q) (sum_t phi(k_t) v_t^T) / (phi(q) . sum_t phi(k_t) + eps)``, computed in float32 with
    autocast off: in fp16 ``eps = 1e-8`` underflows and the division gives NaN. In float32 the map is
    bounded above by ``exp(|w|^2 / 2) = e^16`` (rows of ``W`` have norm sqrt(m)), so nothing
    overflows, and when every feature underflows the output is 0, not NaN. The residual is ``v``
    because the width changes.

    Args:
        dim: Input token width (``k * k * c`` of the preceding soft split).
        dim_out: Output width (64 in the paper).
        num_features: Random features ``m`` (the authors' kernel ratio 0.5 of 64 = 32).
        proj_drop: Dropout after the output projection (the authors hard-code 0.1).
        eps: Added to the normaliser.
        device: Device of the weights.
        dtype: Dtype of the weights.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int = 64,
        *,
        num_features: int = 32,
        proj_drop: float = 0.1,
        eps: float = 1e-8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim_out = dim_out
        self.eps = eps
        self.kqv = nn.Linear(dim, 3 * dim_out, **dd)
        self.proj = nn.Linear(dim_out, dim_out, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        # Drawn once on the CPU (a QR there works for any target device, 'meta' included) and never
        # trained. A frozen Parameter rather than a buffer, as in the authors' checkpoints.
        features = nn.init.orthogonal_(torch.empty(num_features, dim_out)) * math.sqrt(num_features)
        self.random_features = nn.Parameter(features.to(**dd), requires_grad=False)

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` for float32 ``x`` of shape (B, T, d): (B, T, m)."""
        weight = self.random_features.float()
        projection = torch.einsum("btd,md->btm", x, weight)
        half_sq_norm = x.pow(2).sum(dim=-1, keepdim=True) / 2
        return torch.exp(projection - half_sq_norm) / math.sqrt(weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the tokens of ``x`` (B, T, dim); returns (B, T, dim_out)."""
        k, q, v = self.kqv(x).split(self.dim_out, dim=-1)
        with autocast_off(x.device.type):
            kp, qp = self._feature_map(k.float()), self._feature_map(q.float())
            normaliser = torch.einsum("btm,bm->bt", qp, kp.sum(dim=1)).unsqueeze(-1)
            context = torch.einsum("btd,btm->bdm", v.float(), kp)
            y = torch.einsum("btm,bdm->btd", qp, context) / (normaliser + self.eps)
        return v + self.proj_drop(self.proj(y.to(v.dtype)))


class TokenAttention(nn.Module):
    """Single-head softmax attention that narrows tokens from ``dim`` to ``dim_out`` (T2T-ViT_t).

    The scale is ``dim ** -0.5`` (147^-0.5, 576^-0.5): the authors derive it from the input width,
    not from the 64-wide head. The residual is ``v`` because the width changes.

    Args:
        dim: Input token width.
        dim_out: Output width (64 in the paper).
        qkv_bias: Bias on the qkv projection (the authors have none).
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        device: Device of the weights.
        dtype: Dtype of the weights.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int = 64,
        *,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim_out = dim_out
        self.scale = dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim_out, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim_out, dim_out, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the tokens of ``x`` (B, T, dim); returns (B, T, dim_out)."""
        q, k, v = self.qkv(x).split(self.dim_out, dim=-1)
        # A fused kernel keeps the 3136 x 3136 attention map of a 224 image out of memory; the head
        # axis is added because FlopCounterMode's formula for it expects (B, H, T, d).
        y = F.scaled_dot_product_attention(
            q.unsqueeze(1),
            k.unsqueeze(1),
            v.unsqueeze(1),
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        ).squeeze(1)
        return v + self.proj_drop(self.proj(y))


class TokenLayer(nn.Module):
    """One T2T re-structurization layer: ``y = attn(LN(x))``, then ``y + MLP(LN(y))``.

    The attention layer changes the width from ``dim`` to ``dim_out`` and carries its own residual,
    so only the MLP has one here.

    Args:
        dim: Input token width.
        dim_out: Output width.
        attn_layer: :class:`PerformerTokenAttention` or :class:`TokenAttention` (or a partial).
        mlp_ratio: MLP hidden width over ``dim_out`` (1 in the paper).
        proj_drop: Dropout after the attention projection and after the MLP.
        norm_layer: Normalization layer.
        act_layer: MLP activation.
        device: Device of the weights.
        dtype: Dtype of the weights.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int = 64,
        *,
        attn_layer: Callable[..., nn.Module],
        mlp_ratio: float = 1.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = attn_layer(dim, dim_out, proj_drop=proj_drop, **dd)
        self.norm2 = norm_layer(dim_out, **dd)
        # The authors' MLP drops only its output, not after the activation.
        self.mlp = Mlp(
            dim_out, int(dim_out * mlp_ratio), dim_out, act_layer=act_layer, drop=(0.0, proj_drop), **dd
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, T, dim) tokens to (B, T, dim_out)."""
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TModule(nn.Module):
    """The Tokens-to-Token embedding, a drop-in for timm's ``PatchEmbed`` (its ``embed_layer`` hook).

    ``soft_split0 -> attention1 -> reshape -> soft_split1 -> attention2 -> reshape -> soft_split2 ->
    project``. A 224 image gives 56x56 -> 28x28 -> 14x14 = 196 tokens.

    Args:
        img_size: Input side (or (height, width)); every side divisible by 16 gives side / 16 tokens.
        patch_size: Must be the product of the soft-split strides, 16 by default (accepted for the hook).
        in_chans: Image channels.
        embed_dim: Backbone width the last tokens are projected to.
        tokens_type: ``performer`` (T2T-ViT) or ``transformer`` (T2T-ViT_t).
        token_dim: Width of the T2T layers (64).
        drop_rate: Dropout inside the T2T layers; None takes the authors' value (0.1 for Performer
            layers, 0 for Transformer layers).
        bias: Bias on the final projection (timm passes ``not pre_norm``).
        dynamic_img_pad: Unsupported; accepted so timm's hook can pass False.
        soft_splits: (kernel, stride, padding) of the three soft splits; the paper's by default (DVT
            changes the first one to get fewer tokens from the same image).
        device: Device of the weights.
        dtype: Dtype of the weights.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = PATCH_SIZE,
        in_chans: int = 3,
        embed_dim: int = 768,
        *,
        tokens_type: TokensType = "performer",
        token_dim: int = 64,
        drop_rate: float | None = None,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        soft_splits: Sequence[SoftSplit] = SOFT_SPLITS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(soft_splits) != 3:
            raise ValueError(f"T2T-ViT has three soft splits, got {len(soft_splits)}")
        self.soft_splits: tuple[SoftSplit, ...] = tuple(tuple(split) for split in soft_splits)
        patch = nominal_patch_size(self.soft_splits)
        if to_2tuple(patch_size) != (patch, patch):
            raise ValueError(f"T2T-ViT's soft splits fix patch_size at {patch}, got {patch_size}")
        if dynamic_img_pad:
            raise ValueError("T2T-ViT does not support dynamic_img_pad")
        dd = {"device": device, "dtype": dtype}
        self.img_size: tuple[int, int] = to_2tuple(img_size)
        self.patch_size = (patch, patch)
        self.grid_size: tuple[int, int] = (self._grid(self.img_size[0]), self._grid(self.img_size[1]))
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = self.soft_splits
        self.soft_split0 = nn.Unfold(kernel_size=k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(kernel_size=k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(kernel_size=k2, stride=s2, padding=p2)
        if tokens_type == "performer":
            attn_layer: Callable[..., nn.Module] = PerformerTokenAttention
            default_drop = 0.1
        elif tokens_type == "transformer":
            attn_layer, default_drop = TokenAttention, 0.0
        else:
            raise ValueError(f"tokens_type must be 'performer' or 'transformer', got {tokens_type!r}")
        layer = partial(
            TokenLayer,
            attn_layer=attn_layer,
            proj_drop=default_drop if drop_rate is None else drop_rate,
            **dd,
        )
        self.attention1 = layer(in_chans * k0 * k0, token_dim)
        self.attention2 = layer(token_dim * k1 * k1, token_dim)
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim, bias=bias, **dd)

    def _grid(self, side: int) -> int:
        for kernel, stride, padding in self.soft_splits:
            side = _split_size(side, kernel, stride, padding)
        return side

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid of an image of ``img_size`` (timm's ``forward_intermediates`` reshapes with it)."""
        return self._grid(img_size[0]), self._grid(img_size[1])

    def _stages(self) -> Iterator[tuple[nn.Module, nn.Module, tuple[int, int, int]]]:
        """(T2T layer, the soft split after it, that split's (kernel, stride, padding))."""
        yield self.attention1, self.soft_split1, self.soft_splits[1]
        yield self.attention2, self.soft_split2, self.soft_splits[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, C, H, W) to (B, num_patches, embed_dim) tokens."""
        batch, _, height, width = x.shape
        if (height, width) != self.img_size:
            raise ValueError(f"input is {height}x{width}, the model was built for {self.img_size}")
        x = self.soft_split0(x).transpose(1, 2)
        height, width = (_split_size(side, *self.soft_splits[0]) for side in (height, width))
        for layer, soft_split, geometry in self._stages():
            x = layer(x).transpose(1, 2).reshape(batch, -1, height, width)
            x = soft_split(x).transpose(1, 2)
            height, width = (_split_size(side, *geometry) for side in (height, width))
        return self.project(x)
