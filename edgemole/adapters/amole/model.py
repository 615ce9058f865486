"""AMoLE in a model: injection, the wire names of experts, loading a device's experts into slots, RSEA.

The fleet has E experts per module; a device's model has M slots. The aggregator sends a device the
experts it holds under their fleet-wide ids; the device puts them into its first slots in id order and
switches the rest off. Names on the wire (see docs/protocol.md):

    <module>.expert.<id>.lora_A (r, d_in)   <module>.expert.<id>.lora_B (d_out, r)
    <module>.shared.lora_A / .lora_B        <module>.router (r, d_in)
    <module>.embed.token (r,)               <module>.embed.expert.<id> (r,)     (RSEA, device -> aggregator)
"""

from __future__ import annotations

import torch
from torch import nn

from edgemole.adapters.amole.config import AMoLEConfig
from edgemole.adapters.amole.layer import AMoLELinear
from edgemole.adapters.lora.config import LoRAConfig
from edgemole.adapters.lora.layer import init_lora_A
from edgemole.adapters.targets import inject
from edgemole.errors import ProtocolError
from edgemole.protocol import TensorSpec

EMBEDDING_ROLE = "embedding"
ROUTER_ROLE = "router"


def inject_amole(model: nn.Module, lora: LoRAConfig, cfg: AMoLEConfig) -> list[str]:
    """Wrap every target linear layer of ``model`` in an :class:`AMoLELinear`; returns their names."""
    return inject(model, lora.target_modules,
                  lambda base: AMoLELinear(base, cfg.slots, lora.r, lora.alpha, lora.dropout, cfg.top_k))


def amole_layers(model: nn.Module) -> dict[str, AMoLELinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AMoLELinear)}


def expert_name(module: str, expert: int, factor: str) -> str:
    return f"{module}.expert.{expert}.{factor}"


def adapter_module(prefix: str) -> str:
    """The target module an adapter belongs to: ``<module>`` of ``<module>.expert.<id>`` or ``<module>.shared``
    (a plain LoRA's prefix is its module)."""
    if ".expert." in prefix:
        return prefix.rsplit(".expert.", 1)[0]
    return prefix.removesuffix(".shared")


def expert_embedding_name(module: str, expert: int) -> str:
    return f"{module}.embed.expert.{expert}"


def token_embedding_name(module: str) -> str:
    return f"{module}.embed.token"


def parse_expert_sets(value: object, layers: dict[str, AMoLELinear], num_experts: int) -> dict[str, list[int]]:
    """Check an assignment's ``experts`` map (module -> sorted expert ids) against this model's slots."""
    if not isinstance(value, dict) or set(value) != set(layers):
        raise ProtocolError("assignment 'experts' must map exactly this model's AMoLE modules to expert ids")
    sets = {}
    for module, ids in value.items():
        if (not isinstance(ids, list) or not 1 <= len(ids) <= layers[module].slots
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_experts for i in ids)
                or len(set(ids)) != len(ids)):
            raise ProtocolError(f"experts of {module} must be 1 to {layers[module].slots} distinct ids in "
                                f"[0, {num_experts}), got {ids!r}"[:300])
        sets[module] = sorted(ids)
    return sets


def state_specs(layers: dict[str, AMoLELinear], experts: dict[str, list[int]],
                embeddings: bool = False) -> dict[str, TensorSpec]:
    """Names, shapes and roles of a device's AMoLE tensors for the given expert sets (and its RSEA vectors)."""
    specs = {}
    for module, layer in layers.items():
        r, d_in = layer.shared_A.shape
        d_out = layer.shared_B.shape[0]
        for eid in experts[module]:
            specs[expert_name(module, eid, "lora_A")] = TensorSpec((r, d_in), role="lora_A")
            specs[expert_name(module, eid, "lora_B")] = TensorSpec((d_out, r), role="lora_B")
            if embeddings:
                specs[expert_embedding_name(module, eid)] = TensorSpec((r,), role=EMBEDDING_ROLE)
        specs[f"{module}.shared.lora_A"] = TensorSpec((r, d_in), role="lora_A")
        specs[f"{module}.shared.lora_B"] = TensorSpec((d_out, r), role="lora_B")
        specs[f"{module}.router"] = TensorSpec((r, d_in), role=ROUTER_ROLE)
        if embeddings:
            specs[token_embedding_name(module)] = TensorSpec((r,), role=EMBEDDING_ROLE)
    return specs


def load_experts(layers: dict[str, AMoLELinear], tensors: dict[str, torch.Tensor],
                 experts: dict[str, list[int]]) -> None:
    """Copy the held experts into the first slots (id order), the shared expert and router; mask the rest."""
    with torch.no_grad():
        for module, layer in layers.items():
            ids = experts[module]
            for slot, eid in enumerate(ids):
                layer.experts_A[slot].copy_(tensors[expert_name(module, eid, "lora_A")])
                layer.experts_B[slot].copy_(tensors[expert_name(module, eid, "lora_B")])
            layer.experts_A[len(ids):].zero_()
            layer.experts_B[len(ids):].zero_()
            layer.set_active(len(ids))
            layer.shared_A.copy_(tensors[f"{module}.shared.lora_A"])
            layer.shared_B.copy_(tensors[f"{module}.shared.lora_B"])
            layer.router.copy_(tensors[f"{module}.router"])


def held_state(layers: dict[str, AMoLELinear], experts: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The device's current AMoLE weights under their wire names (the inverse of :func:`load_experts`)."""
    state = {}
    for module, layer in layers.items():
        for slot, eid in enumerate(experts[module]):
            state[expert_name(module, eid, "lora_A")] = layer.experts_A[slot].detach().clone()
            state[expert_name(module, eid, "lora_B")] = layer.experts_B[slot].detach().clone()
        state[f"{module}.shared.lora_A"] = layer.shared_A.detach().clone()
        state[f"{module}.shared.lora_B"] = layer.shared_B.detach().clone()
        state[f"{module}.router"] = layer.router.detach().clone()
    return state


def fleet_initial_state(layers: dict[str, AMoLELinear], num_experts: int, seed: int) -> dict[str, torch.Tensor]:
    """All E experts of every module, the shared expert and router, initialised from ``seed`` (server side)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, layer in layers.items():
        r, d_in = layer.shared_A.shape
        d_out = layer.shared_B.shape[0]
        for eid in range(num_experts):
            state[expert_name(module, eid, "lora_A")] = init_lora_A(torch.empty(r, d_in), gen)
            state[expert_name(module, eid, "lora_B")] = torch.zeros(d_out, r)
        state[f"{module}.shared.lora_A"] = init_lora_A(torch.empty(r, d_in), gen)
        state[f"{module}.shared.lora_B"] = torch.zeros(d_out, r)
        state[f"{module}.router"] = init_lora_A(torch.empty(r, d_in), gen)
    return state


def auxiliary_loss(layers: dict[str, AMoLELinear]) -> torch.Tensor:
    """Sum of the layers' load-balance losses from the last forward (to be scaled by its weight)."""
    return sum((layer.lb_loss for layer in layers.values()), torch.zeros(()))


def set_token_mask(layers: dict[str, AMoLELinear], mask: torch.Tensor | None) -> None:
    for layer in layers.values():
        layer.token_mask = mask
