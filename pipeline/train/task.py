"""What differs between models at training time lives here, not in the loop.

A task turns a batch's labels into targets (mixup/CutMix and label smoothing), a model's output
into a loss, and a model's output into the logits that accuracy is measured on. A model that
returns one tensor gets :class:`ClassificationTask`; a multi-exit model (a list of logits, one
per exit, such as DVT) gets :class:`MultiExitTask`, whose loss is the unweighted sum of the
exits' losses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationTask:
    """Cross-entropy on soft targets (mixup/CutMix) or label-smoothed hard targets."""

    def __init__(self, num_classes: int, aug: Any) -> None:
        from timm.data import Mixup

        self.smoothing = aug.label_smoothing
        self.mixup = None
        if aug.mixup_alpha > 0 or aug.cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=aug.mixup_alpha,
                cutmix_alpha=aug.cutmix_alpha,
                switch_prob=aug.mixup_switch_prob,
                label_smoothing=aug.label_smoothing,
                num_classes=num_classes,
            )

    def targets(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a training batch; returns images and (soft or hard) targets."""
        if self.mixup is not None:
            return self.mixup(images, labels)
        return images, labels

    def criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dtype.is_floating_point:  # soft targets from mixup, smoothing folded in
            return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), target, label_smoothing=self.smoothing)

    def loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(output, target)

    def logits(self, output: Any) -> torch.Tensor:
        """The logits accuracy is reported on."""
        return output

    def exits(self, output: Any) -> list[torch.Tensor]:
        """Logits of every exit, first to last (one for a single-exit model)."""
        return [output]


class MultiExitTask(ClassificationTask):
    """For models returning one logits tensor per exit: summed loss, last exit's accuracy."""

    def loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        return sum(self.criterion(o, target) for o in output)

    def logits(self, output: Any) -> torch.Tensor:
        return output[-1]

    def exits(self, output: Any) -> list[torch.Tensor]:
        return list(output)


def task_for(model: nn.Module, num_classes: int, aug: Any) -> ClassificationTask:
    """The task a model asks for: multi-exit models declare ``num_exits`` > 1."""
    if getattr(model, "num_exits", 1) > 1:
        return MultiExitTask(num_classes, aug)
    return ClassificationTask(num_classes, aug)
