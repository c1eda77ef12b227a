"""The plain reference formulation of the zoo's attention layers, switched on in place for a benchmark.

The models compute attention the fast way: timm's ``Attention`` and T2T-ViT_t's token attention call
``F.scaled_dot_product_attention`` (a fused kernel), and the Performer T2T layer computes FAVOR+
(Choromanski et al., arXiv:2009.14794) with broadcasting einsums. :func:`plain_attention` switches a
built model, weights untouched, to the textbook formulation of the same maths, so a benchmark can
time both on the same weights and check that they agree:

* softmax attention: ``softmax(Q K^T * scale) V`` with the (B, heads, N, N) matrix materialised
  (timm's own non-fused branch, selected through its public ``fused_attn`` flag);
* T2T-ViT_t's single-head token attention: the same, written out;
* the Performer: "unfused" -- every intermediate of the formula materialised at full size, as a
  line-by-line reading of it gives: the squared norm repeated over the random features, the two
  feature maps, the normaliser repeated over the output channels. Still linear in the tokens, in
  float32 with autocast off like the model's.

Used by ``benchmarks/gpu_suite.py`` (part b); ``tests/test_gpu_suite.py`` checks that both
formulations give the same outputs.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import torch
from timm.layers import Attention
from torch import nn

from pipeline.models.t2t_vit import PerformerTokenAttention, TokenAttention, autocast_off

__all__ = ["plain_attention"]


def _token_attention_plain(self: TokenAttention, x: torch.Tensor) -> torch.Tensor:
    """:class:`TokenAttention` with the (B, T, T) attention matrix materialised."""
    q, k, v = self.qkv(x).split(self.dim_out, dim=-1)
    weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    weights = nn.functional.dropout(weights, self.attn_drop, self.training)
    return v + self.proj_drop(self.proj(weights @ v))


def _performer_plain(self: PerformerTokenAttention, x: torch.Tensor) -> torch.Tensor:
    """:class:`PerformerTokenAttention` with every intermediate materialised (no broadcasting)."""
    k, q, v = self.kqv(x).split(self.dim_out, dim=-1)
    features = self.random_features.float()  # (m, d)
    m = features.shape[0]
    with autocast_off(x.device.type):
        k, q, v = k.float(), q.float(), v.float()

        def feature_map(u: torch.Tensor) -> torch.Tensor:
            squared = (u * u).sum(dim=-1, keepdim=True).repeat(1, 1, m) / 2  # (B, T, m)
            projected = torch.einsum("btd,md->btm", u, features)
            return torch.exp(projected - squared) / math.sqrt(m)

        k_features, q_features = feature_map(k), feature_map(q)
        key_sum = k_features.sum(dim=1)  # (B, m)
        normaliser = torch.einsum("btm,bm->bt", q_features, key_sum).unsqueeze(-1)
        normaliser = normaliser.repeat(1, 1, self.dim_out)  # (B, T, dim_out)
        key_value = torch.einsum("btm,btd->bmd", k_features, v)  # (B, m, dim_out)
        y = torch.einsum("btm,bmd->btd", q_features, key_value) / (normaliser + self.eps)
    return v + self.proj_drop(self.proj(y.to(v.dtype)))


@contextlib.contextmanager
def plain_attention(model: nn.Module) -> Iterator[int]:
    """Run ``model``'s attention layers in the plain reference formulation inside the block.

    The weights are not touched; on exit every layer is restored (also after an exception).

    Args:
        model: Any model of the zoo (or any module holding timm ``Attention`` layers).

    Yields:
        How many layers were switched (0 means the model has none of the known kinds).
    """
    restore: list[tuple[nn.Module, bool | None]] = []
    try:
        for module in model.modules():
            if isinstance(module, Attention):
                restore.append((module, module.fused_attn))
                module.fused_attn = False
            elif isinstance(module, TokenAttention):
                module.forward = types.MethodType(_token_attention_plain, module)
                restore.append((module, None))
            elif isinstance(module, PerformerTokenAttention):
                module.forward = types.MethodType(_performer_plain, module)
                restore.append((module, None))
        yield len(restore)
    finally:
        for module, fused in restore:
            if fused is None:
                del module.forward  # the class's forward again
            else:
                module.fused_attn = fused
