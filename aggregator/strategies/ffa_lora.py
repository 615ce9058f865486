"""FFA-LoRA: A stays random and frozen for ever; devices train only B (and the head), the server averages them.

With A identical on every device, averaging B is exact (sum_c w_c B_c A = (sum_c w_c B_c) A), at the price of
never adapting A. A baseline of DESIGN.md 5.4.
"""

from __future__ import annotations

from collections.abc import Sequence

from aggregator.robust import robust_average
from aggregator.strategies.base import Assignment, ClientUpdate, RoundPlan
from aggregator.strategies.fedit import FedIT
from edgemole.protocol import spec_of

TRAINED_ROLES = ["lora_B", "head"]


class FFALoRA(FedIT):
    """FedIT's global adapter, with every ``lora_A`` frozen at its random initial value."""

    name = "ffa-lora"

    def configure_train(self, rnd: int, clients: Sequence[str]) -> RoundPlan:
        trained = {n: t for n, t in self.global_state.items() if self.roles.get(n) in TRAINED_ROLES}
        expect = spec_of(trained, self.roles)
        body = {"train_roles": [r for r in TRAINED_ROLES if r in self.roles.values()]}  # no head when frozen
        return RoundPlan("train", {c: Assignment(self.global_state, expect, body) for c in clients})

    def aggregate(self, rnd: int, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> dict:
        weights = [u.num_samples for u in updates]
        for name in updates[0].tensors:
            self.global_state[name] = robust_average([u.tensors[name] for u in updates], weights, self.robust)
        return {}
