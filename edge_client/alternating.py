"""A LoRA-A2 round on the device (DESIGN.md 5.3), on any :class:`TrainingEngine`.

A probe from the global weights scores every rank of every adapter; the device keeps its top r_c x N
(adapter, rank) pairs; training restarts from the global weights with everything else of the active factor
put back after every optimizer step; the upload is the selected slices with their indices plus the other
trained tensors (head, router) in full. The formulas live in :mod:`edgemole.adapters.lora.a2`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from edge_client.engines import Batch, TrainingEngine, TrainStats
from edgemole.adapters.amole.model import adapter_module
from edgemole.adapters.lora.a2 import (
    active_factor,
    adapter_prefixes,
    encode_slices,
    factor_deltas,
    score_state,
    select_ranks,
    selection_masks,
)
from edgemole.config import TaskSpec
from edgemole.protocol import RANKS_ROLE


@dataclass
class AlternatingRound:
    """What a LoRA-A2 round produced: the training stats and the update's tensors and roles."""

    stats: TrainStats
    probe_s: float
    selection: dict[str, list[int]]
    tensors: dict[str, torch.Tensor]
    roles: dict[str, str]

    @property
    def ranks(self) -> int:
        return sum(len(r) for r in self.selection.values())


def train_alternating(engine: TrainingEngine, body: dict, phase: str, batches: Callable[[], Iterator[Batch]],
                      task: TaskSpec, steps: int, upload_rank: int,
                      train_roles: list[str] | None = None) -> AlternatingRound:
    """Run one ``train-A``/``train-B`` round from the weights loaded in ``engine``.

    ``batches()`` gives the round's batch stream (called twice: the probe and the training see the same data);
    ``upload_rank`` is r_c; ``train_roles`` the roles the assignment trains (default: the active factor only).
    """
    factor = active_factor(phase)
    roles_trained = train_roles or [factor]
    role_lr = {"lora_B": task.a2.b_lr_multiplier}
    lr, wd = task.train.lr, task.train.weight_decay
    global_state, wire_roles = engine.get_state(body)
    prefixes = adapter_prefixes(global_state)
    probe = engine.train(batches(), task.a2.probe_steps or steps, lr, wd, roles_trained, role_lr=role_lr)
    probed, _ = engine.get_state(body)
    scores = score_state(global_state, factor_deltas(global_state, probed, prefixes, phase), phase)
    selection = select_ranks(scores, upload_rank * len({adapter_module(p) for p in prefixes}))
    masks = selection_masks(global_state, selection, phase)

    def hold_unselected() -> None:  # AdamW's decay and momentum must not move what is not uploaded
        current, _ = engine.get_state(body)
        current.update({n: torch.where(m, current[n], global_state[n]) for n, m in masks.items()})
        engine.set_state(current, body)

    engine.set_state(global_state, body)
    stats = engine.train(batches(), steps, lr, wd, roles_trained, role_lr=role_lr, after_step=hold_unselected)
    trained, _ = engine.get_state(body)
    factors = {f"{p}.{f}" for p in prefixes for f in ("lora_A", "lora_B")}
    tensors = {n: t for n, t in trained.items() if wire_roles[n] in roles_trained and n not in factors}
    roles = {n: wire_roles[n] for n in tensors}
    slices = encode_slices(trained, selection, phase)
    tensors.update(slices)
    roles.update({n: RANKS_ROLE if n.endswith(".ranks") else factor for n in slices})
    return AlternatingRound(stats, probe.seconds, selection, tensors, roles)
