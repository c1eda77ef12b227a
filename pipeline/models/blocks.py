"""Layers for the "From CNN to ViT" study of Tokens-to-Token ViT (Yuan et al., arXiv:2101.11986).

The paper carries five CNN design ideas into ViT and T2T-ViT. Two need no new layer (wide/deep
shapes and ResNeXt's "more heads" are configurations); the other three are injected into timm's
``Block``/``VisionTransformer`` through their ``attn_layer``, ``mlp_layer`` and ``block_fn`` hooks:

* squeeze-excitation (SENet, arXiv:1709.01507): :class:`SqueezeExciteAttention`;
* the ghost operation (GhostNet, arXiv:1911.11907): :class:`GhostAttention` and :class:`GhostMlp`;
* dense connection (DenseNet, arXiv:1608.06993): :class:`DenseBlock` laid out by
  :func:`dense_layout`.

Each mirrors the authors' released code (github.com/yitu-opensource/T2T-ViT, ``models/
t2t_vit_se.py``, ``t2t_vit_ghost.py``, ``t2t_vit_dense.py``) tensor for tensor, so the registered
variants reproduce its parameter counts exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import nn

__all__ = [
    "DenseBlock",
    "GhostAttention",
    "GhostLinear",
    "GhostMlp",
    "SqueezeExciteAttention",
    "TokenSqueezeExcite",
    "dense_layout",
]


class TokenSqueezeExcite(nn.Module):
    """Squeeze-excitation over tokens: gate each channel by a function of its mean over all tokens.

    ``x * sigmoid(fc2(relu(fc1(mean_t x_t))))`` with ``fc1: C -> C * rd_ratio`` and ``fc2`` back,
    both without bias as in the authors' ``SELayer``. The mean includes the class token. The two
    linears are timm's ``Mlp`` (``fc1``/``fc2``), so timm's ViT init draws them like every linear.

    Args:
        channels: Token width ``C``.
        rd_ratio: Bottleneck width over ``channels`` (1/16 in the paper).
        act_layer: Bottleneck activation.
        device: Device of the weights.
        dtype: Dtype of the weights.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1 / 16,
        *,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.fc = Mlp(
            channels, int(channels * rd_ratio), act_layer=act_layer, bias=False, device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate (B, N, C) tokens channel-wise."""
        return x * self.fc(x.mean(dim=1, keepdim=True)).sigmoid()


class SqueezeExciteAttention(Attention):
    """timm's ``Attention`` with a :class:`TokenSqueezeExcite` gate after the output projection.

    The authors apply the projection dropout after the gate, so the parent's ``proj_drop`` is
    built as a no-op and the real dropout (``gate_drop``) follows the gate.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        se_ratio: Bottleneck width of the gate over ``dim``.
        proj_drop: Dropout after the gate.
        **kwargs: Further ``timm.layers.Attention`` arguments (``qkv_bias``, ``attn_drop``, ...).
    """

    def __init__(
        self, dim: int, num_heads: int = 8, *, se_ratio: float = 1 / 16, proj_drop: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(dim, num_heads, proj_drop=0.0, **kwargs)
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.se = TokenSqueezeExcite(self.proj.out_features, se_ratio, **dd)
        self.gate_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Self-attention over (B, N, C) tokens, then the channel gate."""
        return self.gate_drop(self.se(super().forward(x, attn_mask=attn_mask, is_causal=is_causal)))


def _channel_maps(
    channels: int, maps: int, device: torch.device | str | None, dtype: torch.dtype | None
) -> nn.Conv1d:
    """GhostNet's cheap operation on tokens: ``maps`` learned scalars per channel, no bias.

    A depthwise, kernel-1 ``Conv1d`` as in the authors' code rather than a bare scale vector: it keeps
    PyTorch's default conv init (uniform in [-1, 1]) that the authors' runs started from, and
    FlopCounterMode counts its ``channels * maps`` MACs per token, which the all-matmul count of the
    authors' code includes (docs/models.md; an elementwise product would go uncounted).
    """
    return nn.Conv1d(channels, channels * maps, 1, groups=channels, bias=False, device=device, dtype=dtype)


class GhostLinear(nn.Module):
    """A linear layer whose output is half computed and half "ghosted" from the computed half.

    ``y = [W x, s * (W x)]`` with ``W: in -> out / 2`` and a learned per-channel scale ``s``. With
    ``groups > 1`` the output is ``groups`` such pairs side by side: for a fused q/k/v projection
    (``groups=3``), q is ``[W_q x, s_q * W_q x]``, so the ghost channels land in the last heads of
    q, k and v exactly as the authors' separate ``q``/``k``/``v`` linears arrange them.

    Args:
        in_features: Input width.
        out_features: Output width; a multiple of ``2 * groups``.
        groups: Independent (computed, ghost) pairs along the output.
        bias: Bias on the computed half.
        device: Device of the weights.
        dtype: Dtype of the weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if out_features % (2 * groups):
            raise ValueError(f"out_features {out_features} is not a multiple of 2 * groups = {2 * groups}")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.primary = nn.Linear(in_features, out_features // 2, bias=bias, device=device, dtype=dtype)
        self.cheap = _channel_maps(out_features // 2, 1, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, N, in_features) to (B, N, out_features)."""
        primary = self.primary(x)
        ghost = self.cheap(primary.transpose(1, 2)).transpose(1, 2)
        pairs = (primary.unflatten(-1, (self.groups, -1)), ghost.unflatten(-1, (self.groups, -1)))
        return torch.cat(pairs, dim=-1).flatten(-2)


class GhostAttention(Attention):
    """timm's ``Attention`` whose q, k and v each come half from a linear layer, half ghosted.

    Only ``qkv`` changes (to a :class:`GhostLinear` of three groups); the attention and the
    full-width output projection are timm's.

    Args:
        dim: Token width (even, so that q, k and v split into a computed and a ghost half).
        num_heads: Attention heads.
        qkv_bias: Bias on the computed half of q, k and v.
        **kwargs: Further ``timm.layers.Attention`` arguments.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, **kwargs)
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.qkv = GhostLinear(dim, 3 * self.attn_dim, groups=3, bias=qkv_bias, **dd)


class GhostMlp(Mlp):
    """timm's ``Mlp`` whose hidden layer is one computed slice plus cheap ghost slices of it.

    ``a = act(fc1(x))`` with ``fc1: in -> in``; the other ``hidden / in - 1`` slices are
    ``act(s_j * a)`` with learned per-channel scales ``s_j``; ``fc2`` maps the concatenation back,
    as in the authors' ``Mlp_ghost`` (hidden = 3 x in for MLP ratio 3).

    Args:
        in_features: Input width.
        hidden_features: Hidden width, a multiple of ``in_features``.
        out_features: Output width (default ``in_features``).
        act_layer: Activation, applied to the computed and to the ghost slices.
        norm_layer: Optional norm on the hidden layer (timm's ``scale_mlp_norm``).
        bias: Bias on ``fc1`` and ``fc2`` (one value or a pair).
        drop: Dropout after the hidden layer and after ``fc2`` (one value or a pair).
        device: Device of the weights.
        dtype: Dtype of the weights.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        hidden_features = hidden_features or in_features
        if hidden_features % in_features:
            raise ValueError(
                f"ghost MLP needs hidden {hidden_features} to be a multiple of input {in_features}"
            )
        dd = {"device": device, "dtype": dtype}
        super().__init__(
            in_features,
            hidden_features,
            out_features,
            act_layer=act_layer,
            norm_layer=norm_layer,
            bias=bias,
            drop=drop,
            **dd,
        )
        # Only the first slice of the hidden layer is computed; the parent built fc1 full width.
        self.fc1 = nn.Linear(in_features, in_features, bias=self.fc1.bias is not None, **dd)
        self.cheap = _channel_maps(in_features, hidden_features // in_features - 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, N, in_features) to (B, N, out_features)."""
        computed = self.act(self.fc1(x))
        ghosts = self.act(self.cheap(computed.transpose(1, 2)).transpose(1, 2))
        x = self.drop1(torch.cat((computed, ghosts), dim=-1))
        return self.drop2(self.fc2(self.norm(x)))


def dense_layout(
    start_dim: int, block_config: Sequence[int], growth_rate: int
) -> list[tuple[int, int | None]]:
    """Input width and following transition of every layer of a densely connected backbone.

    Layer ``j`` of a dense block sees ``width + j * growth_rate`` channels and appends
    ``growth_rate``; after every dense block but the last, a transition halves the width. For the
    authors' T2T-ViT-Dense (``start_dim`` 128, blocks 3/6/6/4, growth 64) the widths run
    128 -> 320 | 160 -> 544 | 272 -> 656 | 328 -> 584.

    Args:
        start_dim: Width of the tokens entering the first layer.
        block_config: Layers per dense block.
        growth_rate: Channels each layer appends.

    Returns:
        Per layer ``(input width, transition output width or None)``; the last layer's output is
        ``layout[-1][0] + growth_rate``.
    """
    layout: list[tuple[int, int | None]] = []
    width = start_dim
    for stage, num_layers in enumerate(block_config):
        for j in range(num_layers):
            out = width + (j + 1) * growth_rate
            last_of_block = j == num_layers - 1 and stage < len(block_config) - 1
            layout.append((width + j * growth_rate, out // 2 if last_of_block else None))
        width = (width + num_layers * growth_rate) // 2
    return layout


class DenseBlock(Block):
    """timm's ``Block`` made a DenseNet layer: its output, narrowed to ``growth_rate``, is appended.

    ``y = x ++ dense_linear(Block(x))``; an optional transition (linear to ``transition_dim``,
    then the activation, as the authors' ``Transition``) closes a dense block.

    Args:
        dim: Input width.
        num_heads: Attention heads (the authors keep 8 at every width).
        growth_rate: Channels appended.
        transition_dim: Width of the transition after this layer; None for none.
        act_layer: MLP and transition activation.
        **kwargs: Further ``timm`` ``Block`` arguments (``mlp_ratio``, ``drop_path``, ``depth``, ...).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        growth_rate: int,
        transition_dim: int | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        **kwargs: Any,
    ) -> None:
        super().__init__(dim, num_heads, act_layer=act_layer, **kwargs)
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.out_dim = transition_dim or dim + growth_rate
        self.dense_linear = nn.Linear(dim, growth_rate, **dd)
        self.transition: nn.Module = nn.Identity()
        if transition_dim is not None:
            self.transition = nn.Sequential(nn.Linear(dim + growth_rate, transition_dim, **dd), act_layer())

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """Map (B, N, dim) tokens to (B, N, out_dim)."""
        new = self.dense_linear(super().forward(x, attn_mask=attn_mask, is_causal=is_causal))
        return self.transition(torch.cat((x, new), dim=-1))
