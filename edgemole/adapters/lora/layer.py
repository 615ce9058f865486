"""The LoRA layer: y = W0 x + (alpha/r) B A dropout(x), with W0 frozen."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` with factors ``lora_A`` (r x d_in) and ``lora_B`` (d_out x r).

    B starts at zero so the wrapped model initially computes exactly what the base model does.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r = r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        init_lora_A(self.lora_A)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * delta


def init_lora_A(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Kaiming-uniform with a = sqrt(5) (bound 1/sqrt(d_in)) in place: the LoRA A init, for every A-like tensor."""
    bound = 1.0 / math.sqrt(t.shape[-1])
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)
