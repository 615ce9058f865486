"""Finding and replacing target linear layers by name, shared by every adapter method (PEFT's injection idea)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from edgemole.errors import ModelError


def inject(model: nn.Module, target_modules: tuple[str, ...], wrap: Callable[[nn.Linear], nn.Module]) -> list[str]:
    """Replace every ``nn.Linear`` whose last name component is a target by ``wrap(linear)``.

    Returns the qualified names of the wrapped modules; fails if no target matched, listing what the
    model's linear layers are called so that the user can fix ``target_modules``.
    """
    targets = set(target_modules)
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
        setattr(parent, child, wrap(getattr(parent, child)))
    return matches
