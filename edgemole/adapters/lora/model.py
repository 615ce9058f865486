"""Injection of LoRA layers into a model by target-module name."""

from __future__ import annotations

from torch import nn

from edgemole.adapters.lora.config import LoRAConfig
from edgemole.adapters.lora.layer import LoRALinear
from edgemole.adapters.targets import inject


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every target linear layer of ``model`` in a :class:`LoRALinear`; returns their names."""
    return inject(model, config.target_modules,
                  lambda base: LoRALinear(base, config.r, config.alpha, config.dropout))
