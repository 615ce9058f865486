"""Configuration of plain LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass

from edgemole.errors import ConfigError


@dataclass
class LoRAConfig:
    """LoRA on the linear layers whose name ends with one of ``target_modules``.

    ``train_head`` decides whether the task head is trained and aggregated with the adapters
    (a classifier over a new label set needs it; LoRA-A2's setup freezes it).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")
    train_head: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.r <= 256:
            raise ConfigError("lora.r must be in [1, 256]")
        if self.alpha <= 0:
            raise ConfigError("lora.alpha must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError("lora.dropout must be in [0, 1)")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError("lora.target_modules must be a non-empty list of module names")
        self.target_modules = tuple(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass
class A2Config:
    """LoRA-A2 on the device: alternating freeze and adaptive rank upload (DESIGN.md 5.3).

    ``upload_rank`` is r_c, the device's upload rank budget (r_c x modules (module, rank) pairs per round);
    0 means the LoRA rank. A device may override it in its own config (heterogeneous budgets).
    """

    upload_rank: int = 0
    b_lr_multiplier: float = 5.0
    """Learning rate of B as a multiple of A's (LoRA+ style); applied in B rounds."""
    probe_steps: int = 0
    """Steps of the rank-scoring probe from the global weights; 0 means the round's local steps."""
    warm_start: bool = False
    """Round 1 trains and uploads both factors of every adapter in full (a FedIT/FedAMoLE round), so that the first
    B round does not train against a random A; alternation (B first) starts in round 2."""
    router_every_round: bool = False
    """fedamole-a2: train and upload the AMoLE routers in B rounds too (by default they are frozen with A, which they
    resemble, and travel in A rounds only)."""

    def __post_init__(self) -> None:
        if not 0 <= self.upload_rank <= 4096:
            raise ConfigError("a2.upload_rank must be in [0, 4096] (0: the LoRA rank)")
        if not 0 < self.b_lr_multiplier <= 1000:
            raise ConfigError("a2.b_lr_multiplier must be in (0, 1000]")
        if not 0 <= self.probe_steps <= 1_000_000:
            raise ConfigError("a2.probe_steps must be in [0, 1000000] (0: the round's local steps)")
