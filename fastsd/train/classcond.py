"""Class conditioning for fastsd's own UNet, through the same cross-attention path SD uses for text.

Each class has a learned embedding vector; one extra "null" class (index `num_classes`) stands for "no
label" and is what classifier-free guidance uses as its unconditional branch. The embedding is fed to the
UNet as a one-token context (B, 1, context_dim), where the prompt's CLIP hidden states would go in SD1.x.
An unconditional model is the same module with num_classes = 0 (only the null class).
"""
from __future__ import annotations

import torch
from torch import nn

from fastsd.config import UNetConfig
from fastsd.models.unet import UNet


class ClassConditionedUNet(nn.Module):
    def __init__(self, cfg: UNetConfig, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.unet = UNet(cfg)
        self.class_embed = nn.Embedding(num_classes + 1, cfg.context_dim)
        nn.init.normal_(self.class_embed.weight, std=1.0)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) int64 class ids (null_class = unconditional) -> (B, 1, context_dim)."""
        return self.class_embed(labels)[:, None, :]

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, self.context(labels))
