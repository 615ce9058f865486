"""Plain LoRA: one low-rank adapter per target linear layer."""

from edgemole.adapters.lora.config import A2Config, LoRAConfig
from edgemole.adapters.lora.layer import LoRALinear
from edgemole.adapters.lora.model import inject_lora

__all__ = ["A2Config", "LoRAConfig", "LoRALinear", "inject_lora"]
