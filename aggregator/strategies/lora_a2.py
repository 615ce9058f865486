"""LoRA-A2 (arXiv 2410.22815, DESIGN.md 5.3) on one global LoRA, and on FedAMoLE's experts (``fedamole-a2``).

Odd rounds train B with A frozen, even rounds A with B frozen, so that averaging the trained factor is exact
(no discordance); each device uploads only the slices of its top-scoring ranks with their indices, and the server
adds the zero-filled, weighted sum of the slices' changes. The scores, masks and slicing run on the device
(:mod:`edgemole.adapters.lora.a2`); the same module's :func:`aggregate_slices` runs here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aggregator.robust import robust_average, robust_slices
from aggregator.strategies.base import Assignment, ClientUpdate, RoundPlan, weighted_average
from aggregator.strategies.fedamole import FedAMoLE
from aggregator.strategies.fedit import FedIT
from edgemole.adapters.amole.model import ROUTER_ROLE
from edgemole.adapters.lora.a2 import (
    active_factor,
    adapter_prefixes,
    aggregate_slices,
    phase_for_round,
    slice_specs,
)
from edgemole.protocol import TensorSpec, spec_of

FACTOR_ROLES = ("lora_A", "lora_B")


def a2_expectation(tensors: dict[str, torch.Tensor], roles: dict[str, str],
                   phase: str, router_every_round: bool = False) -> tuple[dict[str, TensorSpec], list[str]]:
    """What a device sends back in an alternating round, and the roles it trains: rank slices of the active
    factor of every adapter it received, plus every other trainable tensor in full: the head always, AMoLE routers
    in A rounds (every round with ``router_every_round``). A router W_t projects x like the experts' A (routing
    compares A_i x with W_t x), so by default it is frozen with them in B rounds: routing stays fixed while B
    trains, and B rounds upload no router."""
    full = spec_of(tensors, roles)
    frozen_router = active_factor(phase) == "lora_B" and not router_every_round
    others = {n: s for n, s in full.items() if s.role not in FACTOR_ROLES
              and not (s.role == ROUTER_ROLE and frozen_router)}
    expect = {**slice_specs(full, adapter_prefixes(tensors), phase), **others}
    return expect, [active_factor(phase), *sorted({s.role for s in others.values()})]


def upload_stats(updates: Sequence[ClientUpdate]) -> dict[str, Any]:
    """How many ranks the devices uploaded this round, for the round record."""
    counts = [sum(int(t.numel()) for n, t in u.tensors.items() if n.endswith(".ranks")) for u in updates]
    return {"ranks_uploaded_mean": sum(counts) / len(counts) if counts else 0.0,
            "ranks_uploaded_min": min(counts, default=0), "ranks_uploaded_max": max(counts, default=0)}


class LoRAA2(FedIT):
    """One global LoRA trained in alternating phases with rank-selective uploads."""

    name = "lora-a2"

    def configure_train(self, rnd: int, clients: Sequence[str]) -> RoundPlan:
        phase = phase_for_round(rnd, self.task.a2.warm_start)
        if phase == "train":  # warm start: one FedIT round
            return super().configure_train(rnd, clients)
        expect, train_roles = a2_expectation(self.global_state, self.roles, phase)
        return RoundPlan(phase, {c: Assignment(self.global_state, expect, {"train_roles": train_roles})
                                 for c in clients})

    def aggregate(self, rnd: int, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        if plan.phase == "train":
            return super().aggregate(rnd, plan, updates)
        factor = active_factor(plan.phase)
        total = float(sum(u.num_samples for u in updates))
        weighted = [(u.tensors, u.num_samples / total) for u in updates]
        for p in adapter_prefixes(self.global_state):
            name = f"{p}.{factor}"
            self.global_state[name] = (aggregate_slices(self.global_state[name], weighted, p, plan.phase)
                                       if self.robust == "none" else
                                       robust_slices(self.global_state[name], weighted, p, factor, self.robust))
        for name in [n for n in self.global_state if self.roles.get(n) not in FACTOR_ROLES]:
            self.global_state[name] = robust_average([u.tensors[name] for u in updates],
                                                     [u.num_samples for u in updates], self.robust)
        return upload_stats(updates)


class FedAMoLEA2(FedAMoLE):
    """FedAMoLE's personal expert sets, with LoRA-A2's alternating phases and rank selection over every held
    expert and the shared expert of every module (the edgemole default)."""

    name = "fedamole-a2"

    def configure_train(self, rnd: int, clients: Sequence[str]) -> RoundPlan:
        return self._plan(phase_for_round(rnd, self.task.a2.warm_start), rnd, clients)

    def expected_tensors(self, phase: str, tensors: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
        if phase == "train":  # warm start: one FedAMoLE round
            return super().expected_tensors(phase, tensors)
        return a2_expectation(tensors, self.roles, phase, self.task.a2.router_every_round)[0]

    def assignment_body(self, phase: str) -> dict[str, Any]:
        if phase in ("eval", "train"):
            return {}
        roles = a2_expectation({n: self.state[n] for n in self.common}, self.roles, phase,
                               self.task.a2.router_every_round)[1]
        return {"train_roles": roles}

    def aggregate(self, rnd: int, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        if plan.phase == "train":
            return super().aggregate(rnd, plan, updates)
        factor = active_factor(plan.phase)
        for p in adapter_prefixes(self.state):
            # an expert's holders this round (everyone for the shared expert), by what they were sent
            holders = [u for u in updates if f"{p}.lora_A" in plan.assignments[u.client].tensors]
            if holders:
                total = sum(self.weight(u) for u in holders)
                name = f"{p}.{factor}"
                self.state[name] = aggregate_slices(self.state[name], [(u.tensors, self.weight(u) / total)
                                                                       for u in holders], p, plan.phase)
        for name in [n for n in self.common if self.roles.get(n) not in FACTOR_ROLES]:  # routers (A rounds), head
            senders = [u for u in updates if name in u.tensors]
            if senders:
                self.state[name] = weighted_average([u.tensors[name] for u in senders],
                                                    [self.weight(u) for u in senders])
        self.update_embeddings(updates)
        return upload_stats(updates)


__all__ = ["FedAMoLEA2", "LoRAA2", "a2_expectation"]
