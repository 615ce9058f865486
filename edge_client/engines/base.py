"""The training-engine interface: load weights, take optimizer steps, evaluate, hand weights back.

An engine owns one model built for the fleet's task. The eager PyTorch engine implements it now;
an ExecuTorch engine (the program a phone runs) implements the same calls, so that the client,
the wire format and the aggregator stay unchanged when the engine changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

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


@dataclass
class EvalStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float


class TrainingEngine(ABC):
    """What a client needs from whatever runs the model."""

    name: str
    #: the Hugging Face tokenizer of the task's model; the client tokenises its data with it
    tokenizer: object

    @property
    @abstractmethod
    def roles(self) -> dict[str, str]:
        """Wire role of every trainable tensor (``lora_A``, ``lora_B``, ``head``)."""

    @abstractmethod
    def expected_state(self) -> dict[str, TensorSpec]:
        """Names, shapes, dtypes and roles of the trainable tensors an assignment must carry."""

    @abstractmethod
    def set_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load validated weights into the trainable tensors."""

    @abstractmethod
    def get_state(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable tensors, keyed as in :meth:`expected_state`."""

    @abstractmethod
    def train(self, batches: Iterator[Batch], steps: int, lr: float, weight_decay: float) -> TrainStats:
        """Take ``steps`` optimizer steps on batches drawn from ``batches`` (a fresh optimizer per call)."""

    @abstractmethod
    def evaluate(self, batches: Iterable[Batch]) -> EvalStats:
        """Mean loss and accuracy over the batches, without changing any weight."""
