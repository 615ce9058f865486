"""FlexLoRA: the server averages the products of the factors, then hands back a rank-r SVD of the average.

W_m = sum_c p_c (alpha/r) B_c A_c per module; with W = U S V^T, a device of rank r gets
B = U[:, :r] diag(S[:r]) / (alpha/r) and A = V^T[:r, :] (DESIGN.md 5.4). Averaging products instead of factors
removes FedIT's discordance; truncating the SVD is what lets devices of different ranks share one update. A device
of rank r_c (its ``--upload-rank``) keeps the leading r_c components of the broadcast SVD, trains them and sends
``B[:, :r_c]`` and ``A[:r_c, :]`` (:mod:`edgemole.adapters.lora.flex`); the products are averaged whatever the
ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aggregator.robust import robust_average
from aggregator.strategies.base import Assignment, ClientUpdate, RoundPlan
from aggregator.strategies.fedit import FedIT
from edgemole.adapters.lora.a2 import adapter_prefixes
from edgemole.adapters.lora.flex import OWN_RANK, leading_rank_specs
from edgemole.protocol import spec_of


def svd_redistribute(W: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B, A)`` of rank ``r`` with ``scaling * B @ A`` the best rank-r approximation of ``W``."""
    U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    B = U[:, :r] * S[:r] / scaling
    A = Vh[:r, :]
    return B.to(W.dtype), A.to(W.dtype)


class FlexLoRA(FedIT):
    """FedIT's transport; the aggregation averages full-rank products and redistributes them by SVD."""

    name = "flexlora"

    def configure_train(self, rnd: int, clients: Sequence[str]) -> RoundPlan:
        expect = leading_rank_specs(spec_of(self.global_state, self.roles), adapter_prefixes(self.global_state))
        return RoundPlan("train", {c: Assignment(self.global_state, expect, {OWN_RANK: True}) for c in clients})

    def aggregate(self, rnd: int, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> dict:
        weights = [float(u.num_samples) for u in updates]
        scaling = self.task.lora.scaling
        for a_name in [n for n in self.global_state if self.roles.get(n) == "lora_A"]:
            b_name = a_name[: -len("lora_A")] + "lora_B"
            products = [scaling * u.tensors[b_name].double() @ u.tensors[a_name].double() for u in updates]
            W = robust_average(products, weights, self.robust)
            B, A = svd_redistribute(W, self.task.lora.r, scaling)
            self.global_state[b_name], self.global_state[a_name] = B.float(), A.float()
        for name in [n for n in self.global_state if self.roles.get(n) not in ("lora_A", "lora_B")]:
            self.global_state[name] = robust_average([u.tensors[name] for u in updates], weights, self.robust)
        ranks = [min((t.shape[0] for n, t in u.tensors.items() if self.roles.get(n) == "lora_A"), default=0)
                 for u in updates]
        return {"client_rank_min": min(ranks, default=0), "client_rank_max": max(ranks, default=0)}
