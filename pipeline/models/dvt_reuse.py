"""DVT's reuse mechanisms (Wang et al., arXiv:2105.15075): the blocks, attention and state that let a
later stage of the cascade build on the one before it. The cascade itself is
:class:`pipeline.models.dvt.DynamicVisionTransformer`.

* **Feature reuse**: every block ``l`` of a later stage has its own ``f_l = LN -> MLP(E -> 128 -> 48,
  GELU)`` applied to the upstream stage's final tokens; the class token is dropped, the map is resized
  to the current grid (:func:`resize_grid`), a zero vector fills the class-token slot, and the result
  is concatenated into the block's MLP input (:class:`ReuseBlock`).
* **Relationship reuse**: the upstream stage's pre-softmax attention logits of all layers go through
  one 1x1-convolution MLP, are resized on the key and query axes and added to each layer's scaled
  logits (:class:`RelationReuse`, :class:`ReuseAttention`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, ConvMlp, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from pipeline.models.cost import counting_macs

__all__ = [
    "REUSE_DIM",
    "REUSE_HIDDEN",
    "RelationReuse",
    "ReuseAttention",
    "ReuseBlock",
    "ReuseState",
    "resize_grid",
    "stage_reuse_features",
]

#: Channels of the reused features and hidden width of each block's ``f_l`` (the authors' 48 and 128).
REUSE_DIM, REUSE_HIDDEN = 48, 128


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
    pooling pass over many tiny maps, and no matrix product. This is the form MACs are counted on
    (zero, as in the paper); the cascade's reused maps run through :func:`_resize_matrix` instead.
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


@functools.lru_cache(maxsize=64)
def _resize_matrix(source: tuple[int, int], target: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """:func:`resize_grid` from grid ``source`` to ``target`` on flattened tokens, as one matrix
    ``M`` (p + H*W, p + h*w): ``M @ tokens`` resizes the grid tokens and keeps the ``p`` prefix
    tokens as they are. Built from :func:`_resize_taps` (the Kronecker product of the two axes'
    maps); float32 on the CPU, cast at use.
    """
    axes = []
    for src, tgt in zip(source, target, strict=True):
        m = torch.zeros(tgt, src)
        for index, weight in _resize_taps(src, tgt):
            m[torch.arange(tgt), index] += 1.0 if weight is None else weight
        axes.append(m)
    grid = torch.kron(axes[0], axes[1])
    out = torch.zeros(num_prefix_tokens + grid.shape[0], num_prefix_tokens + grid.shape[1])
    out[:num_prefix_tokens, :num_prefix_tokens] = torch.eye(num_prefix_tokens)
    out[num_prefix_tokens:, num_prefix_tokens:] = grid
    return out


@functools.lru_cache(maxsize=64)
def _resize_matrix_t(
    source: tuple[int, int],
    target: tuple[int, int],
    num_prefix_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``M^T`` of :func:`_resize_matrix` on ``device`` in ``dtype``, made once per device and dtype
    (not copied to the GPU on every forward pass)."""
    return _resize_matrix(source, target, num_prefix_tokens).t().contiguous().to(device=device, dtype=dtype)


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
        return stage_reuse_features([self], upstream, target_grid, num_prefix_tokens)[0]

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
        """Map (B, in, p + h*w, p + h*w) upstream logits to a (B, out, p + H*W, p + H*W) bias.

        Both token axes are resized at once as ``M X M^T`` (:func:`_resize_matrix`): two small
        matrix products per map, ten times faster than the gathers of :func:`resize_grid` on these
        (B, channels, n, n) stacks. While :func:`~pipeline.models.cost.count_macs` counts, the
        gathers run instead: the paper counts the resize at zero MACs.
        """
        x = self.mlp(logits)
        if tuple(source_grid) == tuple(target_grid):
            return x
        if counting_macs():
            # Resized as (queries, keys, B, channels): each gather then moves whole B x channels slices.
            x = x.permute(2, 3, 0, 1).contiguous()
            x = _resize_token_axis(x, 1, source_grid, target_grid, num_prefix_tokens)  # keys
            x = _resize_token_axis(x, 0, source_grid, target_grid, num_prefix_tokens)  # queries
            return x.permute(2, 3, 0, 1).contiguous()
        m_t = _resize_matrix_t(tuple(source_grid), tuple(target_grid), num_prefix_tokens, x.device, x.dtype)
        # (X^T M^T)^T M^T = M X M^T: keys, then queries.
        return torch.matmul(torch.matmul(x.mT, m_t).mT, m_t)


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


def stage_reuse_features(
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
    if counting_macs():  # the gathers, counted at zero MACs as in the paper (see RelationReuse)
        maps = _resize_axes(maps.unflatten(1, upstream.grid), 1, grid).flatten(1, 2)  # (B, H*W, channels)
    elif tuple(upstream.grid) != tuple(grid):
        m_t = _resize_matrix_t(tuple(upstream.grid), tuple(grid), 0, maps.device, maps.dtype)
        maps = torch.matmul(m_t.mT, maps)
    maps = F.pad(maps, (0, 0, num_prefix_tokens, 0))
    return list(maps.split([block.reuse_dim for block in blocks], dim=-1))
