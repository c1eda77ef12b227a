"""Model cost accounting: parameter counts and multiply-accumulates (MACs).

MACs follow the **all-matmul** convention of the T2T-ViT paper's final (ICCV) tables and the
authors' README: every linear layer, both attention products (QK^T and AV) and the Performer's
products count; LayerNorm, softmax, GELU, unfold and additions do not. ``count_macs`` measures it
by tracing one real forward pass with :class:`torch.utils.flop_counter.FlopCounterMode`, whose
FLOPs are exactly 2 x MACs for matrix products (mm, bmm, addmm, einsum, fused attention). Over the
authors' models this reproduces the all-matmul column of docs/models.md (T2T-ViT-14: 4.783 G), not
fvcore's (4.800 G, which also counts some elementwise work) nor the paper's first-version figures
(5.2 G).

Why the count does not depend on the torch build: the models call
``F.scaled_dot_product_attention``, which dispatches to a fused kernel chosen per build and device
(flash or memory-efficient on CUDA, a flash kernel on CPU since torch 2.3). FlopCounterMode knows a
FLOP formula only for some of those kernels, and which ones differs between releases: on torch
2.14.1's CPU build the fused CPU kernel has none, so both attention products went uncounted
(T2T-ViT-14: 4.366 G). ``count_macs`` therefore runs the forward pass with only the MATH backend
enabled (:func:`torch.nn.attention.sdpa_kernel`). That backend is a composite of ``matmul`` and
``softmax``, so the counter sees two ``bmm`` calls, whose formula every build registers; the result
is the same on every device and build, and equals the count on the ``meta`` device.

A module may compute at run time, as a matrix product, something the convention counts at zero:
DVT's resizes of reused maps (nearest upsampling then average pooling in the paper, linear maps
that this code runs as small matrix products because gathers were ten times slower). Such a module
asks :func:`counting_macs` and takes its uncounted form while ``count_macs`` traces it, so the
count stays the paper's.
"""

from __future__ import annotations

import contextvars

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_params", "counting_macs"]

_COUNTING = contextvars.ContextVar("counting_macs", default=False)


def counting_macs() -> bool:
    """True while :func:`count_macs` traces a forward pass (see the module docstring)."""
    return _COUNTING.get()


def count_params(model: nn.Module) -> tuple[int, int]:
    """Count a model's weights.

    Frozen weights (T2T-ViT's sinusoidal position table, the Performer's random features) are
    non-trainable ``nn.Parameter``s in this model zoo, as in the authors' code, so "all" is every
    parameter and matches the "all" count of the authors' code (docs/models.md); buffers are not
    weights and are not counted.

    Args:
        model: Any module; parameters on the ``meta`` device count too.

    Returns:
        ``(all, trainable)`` element counts.
    """
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def count_macs(model: nn.Module, img_size: int, in_chans: int = 3) -> int:
    """All-matmul MACs of one forward pass on a single ``in_chans x img_size x img_size`` image.

    The model runs in eval mode under ``torch.no_grad`` (its training flag is restored afterwards)
    on the device and dtype of its parameters, with attention forced onto its MATH backend so the
    count is the same on every torch build (see the module docstring); on the ``meta`` device
    nothing is computed.

    Args:
        model: An image classifier taking (B, C, H, W).
        img_size: Image side, which must match the size the model was built for.
        in_chans: Image channels.

    Returns:
        Multiply-accumulates (FlopCounterMode's FLOPs / 2).
    """
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    image = torch.zeros(1, in_chans, img_size, img_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    counting = _COUNTING.set(True)
    try:
        with (
            torch.no_grad(),
            sdpa_kernel(SDPBackend.MATH),
            FlopCounterMode(display=False) as counter,
        ):
            model(image)
    finally:
        _COUNTING.reset(counting)
        model.train(was_training)
    return counter.get_total_flops() // 2
