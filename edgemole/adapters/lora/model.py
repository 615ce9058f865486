"""Injection of LoRA layers into a model by target-module name (PEFT's ``inject_adapter`` idea)."""

from __future__ import annotations

from torch import nn

from edgemole.adapters.lora.config import LoRAConfig
from edgemole.adapters.lora.layer import LoRALinear
from edgemole.errors import ModelError


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replace every ``nn.Linear`` whose last name component is a target by a :class:`LoRALinear`.

    Returns the qualified names of the wrapped modules; fails if no target matched, listing what the
    model's linear layers are called so that the user can fix ``target_modules``.
    """
    targets = set(config.target_modules)
    matches = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not matches:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ModelError(
            f"no linear layer named {sorted(targets)} in the model (its linear layers are: {', '.join(linear)})"
        )
    for name in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, LoRALinear(base, config.r, config.alpha, config.dropout))
    return matches
