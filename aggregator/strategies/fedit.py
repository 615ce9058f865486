"""FedIT (FL + LoRA): sample-weighted FedAvg of every trainable tensor, A and B separately."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aggregator.robust import robust_average
from aggregator.strategies.base import Assignment, ClientUpdate, RoundPlan, Strategy
from edgemole.config import TaskSpec
from edgemole.protocol import spec_of


class FedIT(Strategy):
    """One global adapter; each client trains all of it and the server averages by sample count."""

    name = "fedit"

    def __init__(self, initial_state: dict[str, torch.Tensor], roles: dict[str, str], task: TaskSpec) -> None:
        super().__init__(initial_state, roles, task)
        self.global_state = {k: v.detach().clone() for k, v in initial_state.items()}

    def configure_train(self, rnd: int, clients: Sequence[str]) -> RoundPlan:
        expect = spec_of(self.global_state, self.roles)
        return RoundPlan("train", {c: Assignment(self.global_state, expect) for c in clients})

    def aggregate(self, rnd: int, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        weights = [u.num_samples for u in updates]
        self.global_state = {
            name: robust_average([u.tensors[name] for u in updates], weights, self.robust)
            for name in self.global_state
        }
        return {}

    def model_for(self, client: str) -> dict[str, torch.Tensor]:
        return self.global_state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.global_state)

    def load_state_dict(self, state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> None:
        # FFA-LoRA, FlexLoRA and LoRA-A2 keep nothing else: their phase and frozen factors follow from the round
        if set(state) != set(self.global_state):
            raise ValueError("checkpoint tensors do not match this model's adapters")
        self.global_state = {k: v.clone() for k, v in state.items()}
