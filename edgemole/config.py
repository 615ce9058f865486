"""Configuration dataclasses and their strict loading from TOML/JSON files, flags and MQTT task messages.

Every value goes through :func:`from_dict`, which rejects unknown keys and wrong types with a
one-line :class:`ConfigError` naming the key, so a typo in a config file never goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgemole.adapters.amole.config import AMoLEConfig
from edgemole.adapters.lora.config import A2Config, LoRAConfig
from edgemole.defaults import AppliedDefaults, apply_method_defaults
from edgemole.errors import ConfigError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
#: methods whose devices hold a personal set of AMoLE experts instead of one LoRA per module
EXPERT_METHODS = ("fedamole", "fedamole-a2")
#: methods that alternate the trained LoRA factor and upload only each device's top ranks (LoRA-A2)
A2_METHODS = ("lora-a2", "fedamole-a2")

T = TypeVar("T")


@dataclass
class ModelConfig:
    """Base model and tokenisation; ``name`` is a Hugging Face id, a local path, or the bundled default."""

    name: str = DEFAULT_MODEL
    max_length: int = 32

    def __post_init__(self) -> None:
        _require(1 <= self.max_length <= 8192, "model.max_length must be in [1, 8192]")


@dataclass
class TrainConfig:
    """Local training on a device, the same for every client of a round (sent in the task message)."""

    local_steps: int = 10
    """10 for the default run's small synthetic task, which over-fits at 16 (README demo); the comparison configs of
    `benchmarks/` set 16, which issue 23's sweep chose on BANKING77 and 20 Newsgroups (docs/results.md)."""
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    dropout: bool = True
    """Dropout layers (the model's and LoRA's) active during local training. Exported ExecuTorch programs have
    none, so a fleet that trains with the executorch engine runs with false."""
    optimizer: str = "adamw"
    """``adamw`` (written over the gradients on every engine) or ``sgd`` (the ExecuTorch runtime's own SGD on the
    executorch engine, PyTorch's on the eager engine); weight decay applies to both."""

    def __post_init__(self) -> None:
        _require(self.local_steps >= 1, "train.local_steps must be >= 1")
        _require(1 <= self.batch_size <= 4096, "train.batch_size must be in [1, 4096]")
        _require(1 <= self.eval_batch_size <= 4096, "train.eval_batch_size must be in [1, 4096]")
        _require(0 < self.lr < 10, "train.lr must be in (0, 10)")
        _require(0 <= self.weight_decay < 1, "train.weight_decay must be in [0, 1)")
        _require(self.optimizer in ("adamw", "sgd"), f"train.optimizer must be adamw or sgd, got {self.optimizer!r}")


@dataclass
class FleetConfig:
    """How the aggregator runs rounds."""

    fleet: str = "default"
    topic_prefix: str = "edgemole"
    #: personal expert sets (FedAMoLE) trained with alternating factors and rank-selective upload (LoRA-A2)
    method: str = "fedamole-a2"
    rounds: int = 5
    min_clients: int = 1
    clients_per_round: float = 1.0
    quorum: float = 0.5
    round_deadline_s: float = 300.0
    wait_clients_s: float = 300.0
    seed: int = 0
    max_message_bytes: int = 16 * 1024 * 1024
    max_update_value: float = 1e6
    """Largest |value| an update's float tensor may hold; beyond it the update is rejected (aggregator/bounds.py)."""
    update_norm_factor: float = 10.0
    """An update tensor whose L2 norm exceeds this many times max(the norm sent, the round's lower median) is
    rejected with its whole update."""
    max_samples: int = 1_000_000
    """Largest ``num_samples`` an update may claim (also never above the ``num_train`` of the device's status)."""
    robust: str = "none"
    """Aggregation of the plain-LoRA methods: none (weighted mean), clip (each update clipped to the round's median
    norm), trimmed-mean:F (coordinate-wise, F of the values cut at each end) or median (coordinate-wise)."""

    def __post_init__(self) -> None:
        _require(0 < self.max_update_value < math.inf, "fleet.max_update_value must be a positive finite number")
        _require(self.update_norm_factor >= 1, "fleet.update_norm_factor must be >= 1")
        _require(1 <= self.max_samples <= 10**9, "fleet.max_samples must be in [1, 1000000000]")
        check_robust(self.robust)
        _require(1 <= self.rounds <= 100_000, "fleet.rounds must be in [1, 100000]")
        _require(self.min_clients >= 1, "fleet.min_clients must be >= 1")
        _require(0 < self.clients_per_round <= 1, "fleet.clients_per_round must be a fraction in (0, 1]")
        _require(0 < self.quorum <= 1, "fleet.quorum must be a fraction in (0, 1]")
        _require(self.round_deadline_s > 0, "fleet.round_deadline_s must be > 0")
        _require(self.wait_clients_s > 0, "fleet.wait_clients_s must be > 0")
        _require(self.max_message_bytes >= 1024, "fleet.max_message_bytes must be >= 1024")


@dataclass
class DataConfig:
    """Where the fleet's data comes from and how an emulated fleet splits it.

    ``labels`` fixes the label set (and its order) of a standalone aggregator; when empty, the label
    set is every label found in ``dataset``.
    """

    dataset: str = "synthetic"
    labels: list[str] = field(default_factory=list)
    partition: str = ""
    text_column: str = ""
    label_column: str = ""
    test_fraction: float = 0.2
    samples_per_domain: int = 200

    def __post_init__(self) -> None:
        _require(0 <= self.test_fraction < 1, "data.test_fraction must be in [0, 1)")
        _require(self.samples_per_domain >= 10, "data.samples_per_domain must be >= 10")


@dataclass
class SimulateConfig:
    """The emulated fleet: how many client processes, which engine, how many torch threads each (0: auto)."""

    clients: int = 4
    engine: str = "eager"
    threads: int = 0
    upload_ranks: list[int] = field(default_factory=list)
    """Per-device LoRA-A2 upload rank budgets, given to the clients in turn (empty: the task's for all)."""
    artifact: str = ""
    """``edgemole export`` folder for the executorch engine (empty: export the task's program first)."""
    native_clients: int = 0
    """How many of the clients run as the native C++ client (``edgemole-device``, devices/native) instead of the
    Python client; they train the same artifact as executorch clients."""

    def __post_init__(self) -> None:
        _require(1 <= self.clients <= 256, "simulate.clients must be in [1, 256]")
        _require(0 <= self.native_clients <= self.clients, "simulate.native_clients must be in [0, clients]")
        _require(self.threads >= 0, "simulate.threads must be >= 0")
        _require(all(1 <= r <= 4096 for r in self.upload_ranks), "simulate.upload_ranks must be in [1, 4096]")


@dataclass
class TaskSpec:
    """What every client needs to build and train its model; published retained on the task topic."""

    labels: list[str]
    method: str = "fedit"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    amole: AMoLEConfig = field(default_factory=AMoLEConfig)
    a2: A2Config = field(default_factory=A2Config)

    @property
    def uses_experts(self) -> bool:
        return self.method in EXPERT_METHODS

    def __post_init__(self) -> None:
        _require(len(self.labels) >= 2, "a task needs at least 2 labels")
        _require(len(set(self.labels)) == len(self.labels), "task labels must be unique")

    def to_body(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> TaskSpec:
        return from_dict(cls, body, "task")


def check_robust(mode: str) -> tuple[str, float]:
    """Parse ``fleet.robust``: the mode and, for ``trimmed-mean:F``, the fraction F in [0, 0.5) cut at each end."""
    if mode in ("none", "clip", "median"):
        return mode, 0.0
    name, _, frac = mode.partition(":")
    if name == "trimmed-mean":
        try:
            f = float(frac)
        except ValueError:
            f = -1.0
        if 0 <= f < 0.5:
            return name, f
    raise ConfigError(f"fleet.robust must be none, clip, median or trimmed-mean:F with F in [0, 0.5), got {mode!r}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _brief(value: Any) -> str:
    """repr of a value from a file or the network, cut so that an error stays one short line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if tp is typing.Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table/object, got {_brief(value)}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(k, key_type, where): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {_brief(value)}")
        (item,) = typing.get_args(tp)[:1]
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_brief(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_brief(value)}")
        return value
    if tp is float:
        # an int beyond the float range (JSON allows 4300 digits) would overflow math.isfinite and float()
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                abs(value) > sys.float_info.max if isinstance(value, int) else not math.isfinite(value)):
            raise ConfigError(f"{where} must be a finite number, got {_brief(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_brief(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table/object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # init=False: derived, never read
    unknown = sorted(set(data) - set(fields))
    prefix = f"{where}." if where else ""
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


@dataclass
class Settings:
    """All sections of a config file; the CLI overlays its flags on top."""

    fleet: FleetConfig = field(default_factory=FleetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    amole: AMoLEConfig = field(default_factory=AMoLEConfig)
    a2: A2Config = field(default_factory=A2Config)

    def task(self, labels: list[str]) -> TaskSpec:
        return TaskSpec(labels=labels, method=self.fleet.method, seed=self.fleet.seed, model=self.model,
                        lora=self.lora, train=self.train, amole=self.amole, a2=self.a2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Settings))


def load_settings(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Settings from an optional config file, then ``overrides`` (``{section: {key: value}}``) on top, then the
    method's defaults (:mod:`edgemole.defaults`) for what neither sets."""
    return load_settings_with_defaults(path, overrides)[0]


def load_settings_with_defaults(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None
                                ) -> tuple[Settings, AppliedDefaults]:
    """:func:`load_settings`, also returning which method defaults applied (for the line simulate prints)."""
    data = read_config_file(path) if path else {}
    merge_overrides(data, overrides or {})
    method = data.get("fleet", {}).get("method", FleetConfig.method) if isinstance(data.get("fleet", {}), dict) \
        else FleetConfig.method
    applied = apply_method_defaults(data, method if isinstance(method, str) else "")
    return from_dict(Settings, data, ""), applied


def merge_overrides(data: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> None:
    """Put the non-None ``overrides`` (``{section: {key: value}}``, from flags) over a config file's ``data``."""
    for section, values in overrides.items():
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"config section '{section}' must be a table")
        data[section].update({k: v for k, v in values.items() if v is not None})


def read_config_file(path: str | Path, extra_sections: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a TOML or JSON config file; its top-level tables are the sections of :class:`Settings` (and
    ``extra_sections``, e.g. ``bench`` for ``edgemole bench``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file '{p}' must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{p}' is malformed: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a table of sections")
    unknown = sorted(set(data) - {*SECTIONS, *extra_sections})
    if unknown:
        raise ConfigError(f"config file '{p}' has unknown section '{unknown[0]}'")
    return data
