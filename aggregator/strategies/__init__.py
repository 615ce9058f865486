"""Aggregation methods, selectable by name with ``--method``."""

from aggregator.strategies.base import Assignment, ClientUpdate, RoundPlan, Strategy, weighted_average
from aggregator.strategies.fedamole import FedAMoLE
from aggregator.strategies.fedit import FedIT
from aggregator.strategies.ffa_lora import FFALoRA
from aggregator.strategies.flexlora import FlexLoRA
from aggregator.strategies.lora_a2 import FedAMoLEA2, LoRAA2
from edgemole.errors import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedIT, FFALoRA, FlexLoRA, LoRAA2, FedAMoLE,
                                                               FedAMoLEA2)}


def strategy_class(name: str) -> type[Strategy]:
    """The strategy called ``name``, or a one-line error listing the available ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r} (available: {', '.join(sorted(STRATEGIES))})") from None


__all__ = [
    "STRATEGIES",
    "Assignment",
    "ClientUpdate",
    "FedAMoLE",
    "FedAMoLEA2",
    "FFALoRA",
    "FedIT",
    "FlexLoRA",
    "LoRAA2",
    "RoundPlan",
    "Strategy",
    "strategy_class",
    "weighted_average",
]
