"""The strategy interface, after Flower's: configure a round, aggregate its results.

The service owns transport, validation and timing; a strategy owns the model state and the math.
Each aggregation method (FedIT now; FFA-LoRA, FlexLoRA, LoRA-A2, FedAMoLE later) is one class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from edgemole.config import TaskSpec
from edgemole.protocol import TensorSpec


@dataclass
class ClientUpdate:
    """A validated update: what one client sent back for the open round."""

    client: str
    num_samples: int
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Assignment:
    """What one client receives, and the tensors it must send back (the validator's expectation)."""

    tensors: dict[str, torch.Tensor]
    expect: dict[str, TensorSpec]
    body: dict[str, Any] = field(default_factory=dict)
    """Client-specific fields of the assignment message (e.g. the experts it holds)."""


@dataclass
class RoundPlan:
    phase: str
    assignments: dict[str, Assignment]
    hparams: dict[str, float | int | str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    """What the round record should show about the plan (e.g. every client's expert sets)."""


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_c w_c x_c / sum_c w_c, accumulated in float64 so that the result does not depend on order."""
    if not tensors or len(tensors) != len(weights):
        raise ValueError("need one weight per tensor and at least one tensor")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights, strict=True):
        acc += t.to(torch.float64) * (float(w) / total)
    return acc.to(tensors[0].dtype)


class Strategy(ABC):
    """One federated method's server side. Subclasses set ``name`` and implement the abstract calls."""

    name: ClassVar[str]
    #: ``fleet.robust``: how the plain-LoRA methods average (aggregator/robust.py); the expert methods ignore it
    robust: str = "none"

    def __init__(self, initial_state: dict[str, torch.Tensor], roles: dict[str, str], task: TaskSpec) -> None:
        self.roles = dict(roles)
        self.task = task

    @abstractmethod
    def configure_train(self, rnd: int, clients: Sequence[str]) -> RoundPlan:
        """Assignments of training round ``rnd`` (1-based) for the selected clients."""

    @abstractmethod
    def aggregate(self, rnd: int, plan: RoundPlan, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """Fold the round's validated updates into the state; returns strategy metrics for the record."""

    @abstractmethod
    def model_for(self, client: str) -> dict[str, torch.Tensor]:
        """The adapter weights that are ``client``'s model now (the global one for single-model methods)."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors needed to resume (checkpointed with safetensors); the rest is :meth:`extra_state`."""

    def extra_state(self) -> dict[str, Any]:
        """Non-tensor state the next round depends on (assignments, RNG state), JSON-serialisable: with
        :meth:`state_dict` a resumed run continues exactly as the uninterrupted one would have."""
        return {}

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None) -> None:
        """Restore what :meth:`state_dict` and :meth:`extra_state` returned; ValueError if they do not fit."""

    @property
    def min_clients(self) -> int:
        """The fewest clients a round of this method can run with."""
        return 1

    def configure_evaluate(self, clients: Sequence[str]) -> RoundPlan:
        """Evaluation only: every client gets its model and sends metrics, no tensors."""
        return RoundPlan("eval", {c: Assignment(self.model_for(c), {}) for c in clients})
