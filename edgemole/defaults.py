"""Per-method defaults: values a method trains well with, used unless the config file or a flag sets them.

The dataclass defaults of :mod:`edgemole.config` are one setting for every method, but the methods differ in what
learning rate (and, for the expert methods, which assignment) they need; a comparison run with one shared learning
rate would measure the learning rate, not the method. Precedence, highest first: the config file or a flag, the
method's entry here, the dataclass default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from edgemole.errors import ConfigError

#: the settings a method may have a default for: ``section.name`` as in the config file
TUNABLE = ("train.lr", "train.local_steps", "a2.b_lr_multiplier", "amole.holders", "amole.top_k",
           "amole.reassign_every", "amole.keep_bonus")

#: per-method values chosen by sweeps (docs/results.md "Per-method defaults": benchmarks/sweep.py and the
#: learning-rate ablation); ``section.name`` -> value. fedit, flexlora and lora-a2 train at 0.01: on the deployed
#: model (docs/deployed-model.md) it beat 0.02 on BANKING77 (fedit: 91.1 against 76.9% over 3 seeds) and 0.02 and
#: 0.005 on 20 Newsgroups, where 0.02 left the shared adapter at chance; 0.02 had been chosen on the received and
#: global figures, before devices deployed the model they train. fedamole-a2 keeps an expert's holders for a B
#: round and the A round after it (``reassign_every`` 2): the same or better accuracy in the sweep, and the A round's
#: assignment then carries only what changed (docs/protocol.md 4.4.1) instead of whole new experts; and its reverse
#: selection favours an expert's current holders (``keep_bonus`` 1: +1.3 points deployed over 0 on two seeds, 17%
#: less download).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "fedit": {"train.lr": 0.01},
    "ffa-lora": {"train.lr": 0.02},  # not swept on the deployed model (it is not in issue 23's comparison)
    "flexlora": {"train.lr": 0.01},
    "lora-a2": {"train.lr": 0.01, "a2.b_lr_multiplier": 1.0},
    "fedamole": {"train.lr": 0.005},
    "fedamole-a2": {"train.lr": 0.01, "a2.b_lr_multiplier": 1.0, "amole.reassign_every": 2, "amole.keep_bonus": 1.0},
}


@dataclass
class AppliedDefaults:
    """Which of a method's defaults a configuration took, and which it set itself (for the printed line)."""

    method: str
    applied: dict[str, Any] = field(default_factory=dict)
    explicit: list[str] = field(default_factory=list)
    #: settings a bench config gives this method alone (``[bench.method_settings]``): over defaults and shared values
    configured: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One line, e.g. ``fedamole-a2 defaults: train.lr=0.01 a2.b_lr_multiplier=1 (set in config:
        train.local_steps)``; empty when the method has no defaults."""
        if not self.applied and not self.explicit and not self.configured:
            return ""
        text = f"{self.method} defaults: {_values(self.applied) or 'none applied'}"
        text += f" (set in config: {' '.join(self.explicit)})" if self.explicit else ""
        return text + (f"; for this method in the bench config: {_values(self.configured)}" if self.configured else "")


def _values(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def explicit_keys(data: dict[str, Any]) -> set[str]:
    """``section.name`` of every value a config dict (file and flags, before dataclass defaults) sets."""
    return {f"{s}.{k}" for s, values in data.items() if isinstance(values, dict) for k in values}


def apply_method_defaults(data: dict[str, Any], method: str, explicit: set[str] | None = None) -> AppliedDefaults:
    """Write ``method``'s defaults into the plain config dict ``data`` (sections of dicts) where ``explicit`` (by
    default: what ``data`` already sets) has no value; returns what was applied."""
    explicit = explicit_keys(data) if explicit is None else explicit
    report = AppliedDefaults(method)
    for key, value in METHOD_DEFAULTS.get(method, {}).items():
        if key in explicit:
            report.explicit.append(key)
            continue
        section, name = key.split(".", 1)
        section_dict = data.setdefault(section, {})
        if isinstance(section_dict, dict):
            section_dict[name] = value
            report.applied[key] = value
    return report


def flatten_settings(where: str, settings: Any) -> dict[str, Any]:
    """``{"train": {"lr": 0.01}}`` or ``{"train.lr": 0.01}`` (TOML writes either) as ``{"train.lr": 0.01}``; a
    ConfigError unless every key is ``section.name`` of a config section (values are checked where they are used)."""
    from edgemole.config import Settings

    sections = {f.name for f in fields(Settings)}
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    if not isinstance(settings, dict):
        raise ConfigError(f"{where} must be a table of section.name = value")
    walk("", settings)
    for key in flat:
        if key.count(".") != 1 or key.split(".")[0] not in sections:
            raise ConfigError(f"{where}: '{key}' is not section.name of a config section "
                              f"({', '.join(sorted(sections))})")
    return flat
