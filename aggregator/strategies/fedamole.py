"""FedAMoLE: every device holds its own set of AMoLE experts, chosen each round by reverse selection.

Server side of DESIGN.md 5.1/5.2: each domain expert is averaged over the devices that held it this round,
the shared expert, router and head over all participants (unweighted as in the paper, or by samples);
then every expert scores every device from their RSEA embeddings and the b-matching solver assigns each
expert to exactly C devices, each device between k and M experts, per module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from aggregator.assignment import assign_experts_all, feasible_holders, random_assignment
from aggregator.strategies.base import Assignment, ClientUpdate, RoundPlan, Strategy, weighted_average
from edgemole.adapters.amole.model import EMBEDDING_ROLE, expert_embedding_name, expert_name, token_embedding_name
from edgemole.adapters.amole.rsea import expert_choice_probabilities
from edgemole.config import TaskSpec
from edgemole.errors import ConfigError
from edgemole.protocol import TensorSpec, spec_of

log = logging.getLogger("edgemole.aggregator")

ExpertSets = dict[str, list[int]]  # module -> expert ids held
#: checkpoint tensor prefix of a device's latest token embeddings (modules x r)
TOKENS = "rsea.tokens."


class FedAMoLE(Strategy):
    """Personal expert sets per device; reverse-selection assignment every round."""

    name = "fedamole"

    def __init__(self, initial_state: dict[str, torch.Tensor], roles: dict[str, str], task: TaskSpec) -> None:
        super().__init__(initial_state, roles, task)
        self.state = {k: v.detach().clone() for k, v in initial_state.items()}
        self.cfg = task.amole
        self.modules = sorted({n.split(".expert.")[0] for n in self.state if ".expert." in n})
        if not self.modules:
            raise ConfigError("fedamole needs a model built with AMoLE experts")
        self.r = self.state[f"{self.modules[0]}.router"].shape[0]
        self.common = [n for n in self.state if ".expert." not in n]  # shared experts, routers, head
        #: latest e_i per module (E x r) and which experts have one; latest t_c per device and module
        self.expert_embed = {m: torch.zeros(self.cfg.experts, self.r) for m in self.modules}
        self.embedded = {m: torch.zeros(self.cfg.experts, dtype=torch.bool) for m in self.modules}
        self.token_embed: dict[str, dict[str, torch.Tensor]] = {}
        self.sets: dict[str, ExpertSets] = {}
        #: who the latest assignment was made for, and the latest training round (what ``reassign_every`` needs)
        self.assigned_clients: tuple[str, ...] = ()
        self.last_round = 0
        self.rng = np.random.default_rng(task.seed)
        self._warned_sizes: set[int] = set()
        #: C of the latest assignment, for the round record
        self.holders_used = 0

    @property
    def min_clients(self) -> int:
        """E experts need at least ceil(E / M) devices of M slots to be held at all."""
        return math.ceil(self.cfg.experts / self.cfg.slots)

    # -- assignment ------------------------------------------------------------------------------
    def _holders(self, n_clients: int) -> int:
        """C: the smallest feasible for ``amole.holders`` 0, else as configured, lowered or raised within the
        constraints when too few or too many devices answer (warned once per fleet size, not every round)."""
        cfg = self.cfg
        holders = feasible_holders(cfg.experts, n_clients, cfg.holders, cfg.top_k, cfg.slots)
        if cfg.holders and holders != cfg.holders and n_clients not in self._warned_sizes:
            self._warned_sizes.add(n_clients)
            log.warning("%d devices cannot hold %d experts x C=%d within [%d, %d] each: using C=%d",
                        n_clients, cfg.experts, cfg.holders, cfg.top_k, cfg.slots, holders)
        self.holders_used = holders
        return holders

    def assign(self, clients: Sequence[str]) -> dict[str, ExpertSets]:
        """Expert sets of ``clients``: reverse selection once embeddings exist, random before."""
        cfg, n = self.cfg, len(clients)
        holders = self._holders(n)
        if not any(bool(e.any()) for e in self.embedded.values()):
            xs = [random_assignment(cfg.experts, n, holders, cfg.top_k, cfg.slots, self.rng) for _ in self.modules]
        else:
            xs = assign_experts_all([self.assignment_scores(m, clients) for m in self.modules], holders, cfg.top_k,
                                    cfg.slots)
        return {c: {m: np.flatnonzero(x[:, j]).tolist() for m, x in zip(self.modules, xs, strict=True)}
                for j, c in enumerate(clients)}

    def assignment_scores(self, module: str, clients: Sequence[str]) -> np.ndarray:
        """What the assignment maximises for one module: P, plus ``amole.keep_bonus * mean(P)`` for every expert a
        device holds now (an expert that stays is patched, one that moves arrives whole)."""
        P = self.probabilities(module, clients)
        if not self.cfg.keep_bonus:
            return P
        held = np.zeros_like(P)
        for j, c in enumerate(clients):
            held[self.sets.get(c, {}).get(module, []), j] = 1.0
        return P + self.cfg.keep_bonus * float(P.mean()) * held

    def expert_sets(self, rnd: int, clients: Sequence[str], keep: bool = False) -> dict[str, ExpertSets]:
        """The sets of round ``rnd``: a new assignment on the first round of every period of ``reassign_every``
        rounds (never when ``keep``); within a period every device keeps its experts, unless other devices answer
        than those the sets were made for (each expert's C holders would not hold then), or after a restart from a
        checkpoint."""
        if keep or (rnd - 1) % self.cfg.reassign_every != 0:
            if tuple(clients) == self.assigned_clients:
                return {c: self.sets[c] for c in clients}
            log.info("round %d: no assignment to keep for these devices (other devices, or a restart): "
                     "assigning anew", rnd)
        sets = self.assign(clients)
        self.assigned_clients = tuple(clients)
        return sets

    def probabilities(self, module: str, clients: Sequence[str]) -> np.ndarray:
        """P for one module: experts' preferences over ``clients`` (devices never seen get the mean t)."""
        known = [self.token_embed[c][module] for c in clients if c in self.token_embed]
        fallback = torch.stack(known).mean(0) if known else torch.zeros(self.r)
        tokens = torch.stack([self.token_embed.get(c, {}).get(module, fallback) for c in clients])
        return expert_choice_probabilities(self.expert_embed[module], tokens).numpy()

    # -- rounds ----------------------------------------------------------------------------------
    def _tensors(self, sets: ExpertSets) -> dict[str, torch.Tensor]:
        held = {expert_name(m, e, f): self.state[expert_name(m, e, f)]
                for m, ids in sets.items() for e in ids for f in ("lora_A", "lora_B")}
        return {**held, **{n: self.state[n] for n in self.common}}

    def _plan(self, phase: str, rnd: int, clients: Sequence[str]) -> RoundPlan:
        """Round ``rnd``'s assignments. The final evaluation keeps the sets of the last round trained: those are the
        experts each device trained and will serve (a fresh assignment would send experts no round will train on
        it, and send them whole)."""
        if phase != "eval":
            self.last_round = rnd
        sets = self.expert_sets(rnd, clients, keep=phase == "eval")
        self.sets.update(sets)
        assignments = {}
        for c in clients:
            tensors = self._tensors(sets[c])
            expect: dict[str, TensorSpec] = {}
            if phase != "eval":
                expect = self.expected_tensors(phase, tensors)
                for m, ids in sets[c].items():
                    expect[token_embedding_name(m)] = TensorSpec((self.r,), role=EMBEDDING_ROLE)
                    expect.update({expert_embedding_name(m, e): TensorSpec((self.r,), role=EMBEDDING_ROLE)
                                   for e in ids})
            assignments[c] = Assignment(tensors, expect, {"experts": sets[c], **self.assignment_body(phase)})
        return RoundPlan(phase, assignments, info={"experts": sets, "holders": self.holders_used,
                                                   **expert_set_stats(sets)})

    def expected_tensors(self, phase: str, tensors: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
        """What a device must send back for the weights it received (RSEA embeddings are added to it)."""
        return spec_of(tensors, self.roles)

    def assignment_body(self, phase: str) -> dict[str, Any]:
        """Fields every assignment of a round carries besides the expert map."""
        return {}

    def configure_train(self, rnd: int, clients: Sequence[str]) -> RoundPlan:
        return self._plan("train", rnd, clients)

    def configure_evaluate(self, clients: Sequence[str]) -> RoundPlan:
        return self._plan("eval", self.last_round + 1, clients)

    def weight(self, update: ClientUpdate) -> float:
        """A device's weight in every average: 1 (the paper's) or its sample count."""
        return float(update.num_samples) if self.cfg.sample_weighted else 1.0

    def aggregate(self, rnd: int, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        for name in list(self.state):
            holders = [u for u in updates if name in u.tensors]
            if holders:  # domain experts: their holders this round; shared, router, head: everyone
                self.state[name] = weighted_average([u.tensors[name] for u in holders],
                                                    [self.weight(u) for u in holders])
        self.update_embeddings(updates)
        return {}

    def update_embeddings(self, updates: Sequence[ClientUpdate]) -> None:
        """Keep the latest RSEA vectors: e_i averaged over this round's holders, t_c per device."""
        for m in self.modules:
            for eid in range(self.cfg.experts):
                vectors = [u.tensors[expert_embedding_name(m, eid)] for u in updates
                           if expert_embedding_name(m, eid) in u.tensors]
                if vectors:
                    self.expert_embed[m][eid] = torch.stack(vectors).mean(0)
                    self.embedded[m][eid] = True
        for u in updates:
            self.token_embed[u.client] = {m: u.tensors[token_embedding_name(m)] for m in self.modules}

    def model_for(self, client: str) -> dict[str, torch.Tensor]:
        return self._tensors(self.sets[client])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The experts, shared experts, routers and head, plus the RSEA state reverse selection scores with:
        every expert's latest e_i (and whether it has one) and every device's latest t_c."""
        rsea = {f"rsea.{m}.experts": self.expert_embed[m] for m in self.modules}
        rsea.update({f"rsea.{m}.embedded": self.embedded[m] for m in self.modules})
        rsea.update({f"{TOKENS}{c}": torch.stack([t[m] for m in self.modules]) for c, t in self.token_embed.items()})
        return {**self.state, **rsea}

    def extra_state(self) -> dict[str, Any]:
        """The expert sets in force, whom they were made for, the last round planned and the numpy RNG (random
        assignments before the first embeddings): what :meth:`expert_sets` of the next round reads."""
        return {"sets": self.sets, "assigned_clients": list(self.assigned_clients), "last_round": self.last_round,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> None:
        required = set(self.state) | {f"rsea.{m}.experts" for m in self.modules}
        optional = {f"rsea.{m}.embedded" for m in self.modules}
        tokens = {k for k in state if k.startswith(TOKENS)}
        if not required <= set(state) or set(state) - required - optional - tokens:
            raise ValueError("checkpoint tensors do not match this model's experts")
        if any(state[k].shape != (len(self.modules), self.r) for k in tokens):
            raise ValueError("checkpoint token embeddings do not match this model's modules")
        for m in self.modules:
            self.expert_embed[m] = state[f"rsea.{m}.experts"].clone()
            flags = state.get(f"rsea.{m}.embedded")
            self.embedded[m] = flags.clone().bool() if flags is not None else self.expert_embed[m].abs().sum(1) > 0
        self.token_embed = {k[len(TOKENS):]: {m: state[k][i].clone() for i, m in enumerate(self.modules)}
                            for k in tokens}
        self.state = {k: state[k].clone() for k in self.state}
        if extra:
            try:
                self.sets = {c: {m: [int(e) for e in ids] for m, ids in per.items()}
                             for c, per in extra.get("sets", {}).items()}
                self.assigned_clients = tuple(extra.get("assigned_clients", ()))
                self.last_round = int(extra.get("last_round", 0))
                if "rng" in extra:
                    self.rng.bit_generator.state = extra["rng"]
            except (TypeError, ValueError, AttributeError, KeyError) as exc:
                raise ValueError(f"checkpoint's expert assignment state is invalid: {exc}") from None

def expert_set_stats(sets: dict[str, ExpertSets]) -> dict[str, Any]:
    """How many experts devices hold and how many distinct architectures the fleet has this round."""
    counts = [len(ids) for per_module in sets.values() for ids in per_module.values()]
    signatures = {tuple(tuple(ids) for _, ids in sorted(per_module.items())) for per_module in sets.values()}
    return {
        "experts_per_module_mean": float(np.mean(counts)) if counts else 0.0,
        "experts_per_module_min": min(counts, default=0),
        "experts_per_module_max": max(counts, default=0),
        "distinct_architectures": len(signatures),
    }
