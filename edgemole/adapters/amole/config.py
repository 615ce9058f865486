"""Configuration of AMoLE, FedAMoLE's adaptive mixture of LoRA experts."""

from __future__ import annotations

from dataclasses import dataclass

from edgemole.errors import ConfigError


@dataclass
class AMoLEConfig:
    """Expert counts and routing of AMoLE; rank, alpha, dropout and targets come from ``[lora]``.

    Defaults are sized for the edge (E=8 experts, M=4 slots per device, C chosen for the fleet's size); the
    paper's setting is E=30, M=8, C=2, k=2 (with r=8 in ``[lora]``).
    """

    experts: int = 8
    """E: domain experts per target module in the whole fleet."""
    slots: int = 4
    """M: expert slots per module on a device, the most experts one device holds."""
    holders: int = 0
    """C: devices that hold each expert in a round; 0 (the default) chooses the smallest C that gives every device
    at least ``top_k`` experts (k*N <= E*C <= M*N), which depends on how many devices answer."""
    reassign_every: int = 1
    """Rounds an expert assignment lasts: 1 runs reverse selection before every round (the paper's); 2 keeps each
    device's experts for a B round and the A round after it in ``fedamole-a2``, so that the same holders train
    both factors of an expert. Devices keep their sets only while the same devices take part."""
    keep_bonus: float = 0.0
    """How much reverse selection favours an expert's current holders, in units of the mean preference: each
    (expert, device) pair of the latest assignment scores ``keep_bonus * mean(P)`` more. 0 is the paper's assignment;
    a positive value moves fewer experts, and every expert that moves reaches its new device whole (the download)."""
    top_k: int = 2
    """k: experts mixed per token; also the fewest experts a device holds."""
    load_balance_weight: float = 0.001
    sample_weighted: bool = False
    """Average experts, shared expert and router by sample count instead of unweighted (the paper's)."""
    dp_eta: float = 0.0
    """Differential privacy on the RSEA embeddings: Gamma-scaled uniform noise with rate eta (0: off)."""
    aux_fraction: float = 0.05
    aux_max: int = 200

    def __post_init__(self) -> None:
        if not 1 <= self.experts <= 1024:
            raise ConfigError("amole.experts must be in [1, 1024]")
        if not 1 <= self.top_k <= self.slots <= 64:
            raise ConfigError("amole needs 1 <= top_k <= slots <= 64")
        if self.slots > self.experts:
            raise ConfigError("amole.slots cannot exceed amole.experts")
        if self.holders < 0:
            raise ConfigError("amole.holders must be >= 1, or 0 for the smallest feasible C")
        if not 1 <= self.reassign_every <= 1000:
            raise ConfigError("amole.reassign_every must be in [1, 1000] (1: re-assign before every round)")
        if not 0 <= self.keep_bonus <= 1000:
            raise ConfigError("amole.keep_bonus must be in [0, 1000] (0: the paper's assignment)")
        if not 0 <= self.load_balance_weight < 10:
            raise ConfigError("amole.load_balance_weight must be in [0, 10)")
        if self.dp_eta < 0:
            raise ConfigError("amole.dp_eta must be >= 0 (0 turns the noise off)")
        if not 0 < self.aux_fraction <= 1 or self.aux_max < 1:
            raise ConfigError("amole.aux_fraction must be in (0, 1] and amole.aux_max >= 1")
