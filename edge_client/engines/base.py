"""The training-engine interface: load weights, take optimizer steps, evaluate, hand weights back.

An engine owns one model built for the fleet's task. The eager PyTorch engine implements it now;
an ExecuTorch engine (the program a phone runs) implements the same calls, so that the client,
the wire format and the aggregator stay unchanged when the engine changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from edgemole.model import WireState
from edgemole.protocol import TensorSpec


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


@dataclass
class TrainStats:
    loss: float
    steps: int
    samples: int
    seconds: float
    #: the loss of every step, in order
    losses: list[float] = field(default_factory=list)


@dataclass
class EvalStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float


class TrainingEngine(ABC):
    """What a client needs from whatever runs the model. An engine exposes its trainable tensors (wherever their
    memory lives) through a :class:`~edgemole.model.WireState`, which maps them to and from the wire."""

    name: str
    #: the Hugging Face tokenizer of the task's model; the client tokenises its data with it
    tokenizer: object
    wire: WireState

    def expected_state(self, body: dict) -> dict[str, TensorSpec]:
        """Names, shapes, dtypes and roles of the tensors an assignment with this body must carry
        (raises ProtocolError when the body's expert map does not fit the model's slots)."""
        return self.wire.assignment_spec(body)

    def set_state(self, state: dict[str, torch.Tensor], body: dict) -> None:
        """Load a validated assignment into the model (for AMoLE: experts into slots, mask the rest)."""
        self.wire.load(state, body)

    def get_state(self, body: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The trained tensors to upload, keyed and with roles as on the wire."""
        return self.wire.state(body)

    @abstractmethod
    def embeddings(self, batches: Iterable[Batch], body: dict) -> dict[str, torch.Tensor]:
        """RSEA embeddings (t_c, e_ic per module) over ``batches`` with the current weights; {} without experts."""

    @abstractmethod
    def train(self, batches: Iterator[Batch], steps: int, lr: float, weight_decay: float,
              roles: Collection[str] | None = None, *, role_lr: Mapping[str, float] | None = None,
              after_step: Callable[[], None] | None = None) -> TrainStats:
        """Take ``steps`` optimizer steps on batches drawn from ``batches`` (a fresh optimizer per call), changing
        only tensors whose wire role is in ``roles`` (all trainable tensors when None).

        ``role_lr`` multiplies the learning rate of the tensors of a role (LoRA-A2 trains B 5x faster than A);
        ``after_step`` runs after every optimizer step (LoRA-A2 puts masked entries back there).
        """

    @abstractmethod
    def evaluate(self, batches: Iterable[Batch]) -> EvalStats:
        """Mean loss and accuracy over the batches, without changing any weight."""


def make_optimizer(name: str, groups: Mapping[float, list[torch.Tensor]], weight_decay: float) -> torch.optim.Optimizer:
    """PyTorch's AdamW or SGD over parameter groups keyed by learning rate (the same for every engine)."""
    param_groups = [{"params": ps, "lr": group_lr} for group_lr, ps in groups.items()]
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], weight_decay=weight_decay)
    return torch.optim.AdamW(param_groups, lr=param_groups[0]["lr"], weight_decay=weight_decay)
