"""``edgemole bench``: federated methods side by side on one dataset, over a grid of methods x ranks x Dirichlet
alphas x seeds, each run an in-memory fleet in this process (or in one of ``jobs`` worker processes). The alpha axis
is for Dirichlet label skew (the default); any other partition ``simulate`` takes (``iid``, ``quantity:ALPHA``,
``column:NAME``), given as ``[data] partition`` or ``--partition``, is one point of the grid instead.

A run is the fleet's own code (``EdgeClient``, ``AggregatorService``, the strategies, ``edgemole.protocol``) over
:mod:`fleet.memory_link`, so accuracy and the bytes on the wire are what an MQTT fleet would see; what it saves is
the processes, the broker and the waiting, which lets a grid fit the time budget of DESIGN.md 7a. The clients of a
run share one engine (one model in memory), and skip the evaluation after local training, which no figure here uses
(personalised accuracy is the received model's, measured at the start of the next round), so their updates carry two
metrics fewer. Every method of a (partition, seed) cell sees the same partitions. Each method runs with its own
defaults (:mod:`edgemole.defaults`) for what the config does not set.

Results are keyed by their whole configuration, so rerunning with a larger grid into the same folder only runs what
is missing, then rewrites the tables and plots from all runs (:mod:`fleet.bench_report`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from aggregator.assignment import feasible_holders
from aggregator.service import AggregatorService
from aggregator.strategies import Strategy, strategy_class
from edge_client.client import ClientOptions, EdgeClient
from edge_client.engines import ENGINES, TrainingEngine, make_engine
from edge_client.local_data import LocalData
from edgemole import __version__
from edgemole.adapters.lora.a2 import adapter_prefixes
from edgemole.config import (
    A2_METHODS,
    EXPERT_METHODS,
    Settings,
    TaskSpec,
    from_dict,
    merge_overrides,
    read_config_file,
)
from edgemole.data import JSONL_KEYS, TextDataset, load_table, write_jsonl
from edgemole.data.partition import parse_partition
from edgemole.data.source import load_source
from edgemole.defaults import (
    METHOD_DEFAULTS,
    AppliedDefaults,
    apply_method_defaults,
    explicit_keys,
    flatten_settings,
)
from edgemole.errors import ConfigError, EdgemoleError
from edgemole.mqtt import Inbound
from edgemole.protocol import Topics, decode
from fleet.memory_link import MemoryBroker, MemoryLink
from fleet.simulate import prepare_partitions, rejected_text
from fleet.units import fmt_bytes, fmt_pct

RESULTS_FILE = "results.json"
RESULTS_VERSION = 1
#: a round of an in-memory fleet ends when every client answered: no message is ever lost, and a deadline would
#: only cut off the clients whose turn comes late in a long round (a dead fleet is caught by the memory broker)
IN_MEMORY_DEADLINE_S = 7 * 24 * 3600.0
#: the fixed seed of the global test subsample, so that every run of a dataset is measured on the same examples
GLOBAL_TEST_SEED = 0
#: the Dirichlet alphas of a grid whose config gives neither alphas nor a partition
DEFAULT_ALPHAS = [0.5]

#: called with each round's :func:`round_brief` as the metrics topic shows it
OnRound = Callable[[dict[str, Any]], None]


def round_brief(record: dict[str, Any]) -> dict[str, Any]:
    """What progress shows of a round record (small and plain, for the queue from a worker process)."""
    return {"round": int(record["round"]), "phase": record.get("phase", ""),
            "answered": len(record.get("answered", [])), "selected": len(record.get("selected", [])),
            "accuracy": record.get("accuracy_deployed", record.get("accuracy_before")),
            "bytes_up": record.get("bytes_up", 0), "bytes_down": record.get("bytes_down", 0)}


@dataclass
class BenchConfig:
    """The ``[bench]`` section: the grid, the global test subsample, parallelism and where results go."""

    methods: list[str] = field(default_factory=lambda: ["fedit", "fedamole"])
    #: the LoRA rank r, or for lora-a2 / fedamole-a2 the device upload rank budget r_c (r is ``lora.r``)
    ranks: list[int] = field(default_factory=lambda: [8])
    #: Dirichlet alphas (the partition axis); None: [0.5], or the alpha of a ``dirichlet:ALPHA`` data.partition
    alphas: list[float] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    out: str = "bench-results"
    #: examples of the dataset's test split for global accuracy (fixed subsample; 0: all)
    global_test_size: int = 1000
    jobs: int = 1
    #: torch threads per process (a run, or a worker)
    threads: int = 1
    #: method -> settings for that method alone (``section.name`` -> value, or nested tables), over its defaults and
    #: over the shared sections and flags: e.g. a data set's own learning rates
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``section.name`` of every setting the config file or a flag gave (filled by :func:`load_bench_settings`):
    #: those win over the method defaults of each run
    explicit: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("methods", "ranks", "alphas", "seeds"):
            values = getattr(self, name)
            if values is None:
                continue
            if not values:
                raise ConfigError(f"bench.{name} must not be empty")
            setattr(self, name, list(dict.fromkeys(values)))
        for method in [*self.methods, *self.method_settings]:
            strategy_class(method)
        self.method_settings = {m: flatten_settings(f"bench.method_settings.{m}", v)
                                for m, v in self.method_settings.items()}
        if not all(1 <= r <= 256 for r in self.ranks):
            raise ConfigError(f"bench.ranks must be in [1, 256], got {self.ranks}")
        if not all(math.isfinite(a) and a > 0 for a in self.alphas or DEFAULT_ALPHAS):
            raise ConfigError(f"bench.alphas must be positive Dirichlet concentrations, got {self.alphas}")
        if not all(s >= 0 for s in self.seeds):
            raise ConfigError(f"bench.seeds must be >= 0, got {self.seeds}")
        if not self.out:
            raise ConfigError("bench.out must name a folder")
        if self.global_test_size < 0:
            raise ConfigError("bench.global_test_size must be >= 0 (0: the whole test split)")
        if not 1 <= self.jobs <= 64:
            raise ConfigError("bench.jobs must be in [1, 64]")
        if not 1 <= self.threads <= 256:
            raise ConfigError("bench.threads must be in [1, 256]")


def parse_list(text: str | list[str], kind: type, flag: str) -> list[Any]:
    """A comma-separated flag value as a list of ``kind`` (int or float), or a one-line ConfigError."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    try:
        values = [kind(t) for t in items if t]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated {kind.__name__}s, got {','.join(items)!r}") from None
    if not values:
        raise ConfigError(f"{flag} must not be empty")
    return values


def load_bench_settings(path: str | Path | None, overrides: dict[str, dict[str, Any]],
                        bench_overrides: dict[str, Any]) -> tuple[Settings, BenchConfig]:
    """Settings and the bench grid from an optional config file, with flags (non-None values) on top."""
    data = read_config_file(path, ("bench",)) if path else {}
    merge_overrides(data, {**overrides, "bench": bench_overrides})
    bench = from_dict(BenchConfig, data.pop("bench"), "bench")
    bench.explicit = explicit_keys(data)
    return from_dict(Settings, data, ""), bench


# -- the grid ---------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One run of the grid; plain data, so that it can be sent to a worker process."""

    method: str
    rank: int
    #: the Dirichlet alpha; None for a partition of another kind
    alpha: float | None
    seed: int
    settings: dict[str, Any]
    key: str
    setup: str
    global_test_size: int
    threads: int
    partition: str = ""
    #: ``section.name`` -> value of the method defaults this run took
    method_defaults: dict[str, Any] = field(default_factory=dict)
    #: filled once the run's (partition, seed) cell is prepared
    labels: list[str] = field(default_factory=list)
    data_dir: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} r{self.rank} {partition_label(self.partition)} s{self.seed}"

    def build(self) -> Settings:
        return from_dict(Settings, self.settings, "")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def partition_label(partition: str) -> str:
    """Short form of a run's partition for progress lines: ``a0.5`` for Dirichlet, else the partition itself."""
    return f"a{partition.split(':', 1)[1]}" if partition.startswith("dirichlet:") else partition


def grid_partitions(base: Settings, bench: BenchConfig) -> list[tuple[str, float | None]]:
    """The grid's partitions as (``data.partition`` value, Dirichlet alpha or None).

    ``bench.alphas`` varies a Dirichlet label skew: it applies when ``data.partition`` is unset or Dirichlet (whose
    alpha must then agree); any other partition is the grid's only one, and ``bench.alphas`` with it is an error."""
    given = base.data.partition.strip()
    if not given:
        return [(f"dirichlet:{a:g}", a) for a in bench.alphas or DEFAULT_ALPHAS]
    spec = parse_partition(given)
    if spec.kind == "dirichlet":
        assert spec.alpha is not None
        if bench.alphas is not None and bench.alphas != [spec.alpha]:
            raise ConfigError(f"data.partition {spec} and bench.alphas {','.join(f'{a:g}' for a in bench.alphas)} "
                              "disagree: give the Dirichlet alphas in one of them")
        return [(str(spec), spec.alpha)]
    if bench.alphas is not None:
        raise ConfigError(f"bench.alphas varies a Dirichlet partition, but data.partition is {spec}: drop one")
    return [(str(spec), None)]


def run_settings(base: Settings, method: str, rank: int, partition: str, seed: int,
                 explicit: set[str] | None = None,
                 method_settings: dict[str, Any] | None = None) -> tuple[Settings, AppliedDefaults]:
    """``base`` with the grid's point applied, ``method``'s defaults where ``explicit`` (the settings the config
    file or flags gave) has no value, and ``method_settings`` (the bench config's for this method) over all of them;
    the grid rank is ``a2.upload_rank`` for LoRA-A2 methods, else ``lora.r``. Built through :func:`from_dict` so
    that every value is validated again."""
    d = base.to_dict()
    applied = apply_method_defaults(d, method, explicit if explicit is not None else set())
    for key, value in (method_settings or {}).items():
        section, name = key.split(".", 1)
        d[section][name] = applied.configured[key] = value
    d["fleet"].update(method=method, seed=seed, min_clients=d["simulate"]["clients"],
                      round_deadline_s=IN_MEMORY_DEADLINE_S, wait_clients_s=IN_MEMORY_DEADLINE_S)
    d["data"]["partition"] = partition
    if method in A2_METHODS:
        d["a2"]["upload_rank"] = rank
    else:
        d["lora"]["r"] = rank
    return from_dict(Settings, d, ""), applied


#: settings added after results were first recorded: left out of a run's key while they hold their default, so
#: that runs recorded before them keep their keys (and are not run again)
KEY_STABLE_DEFAULTS: dict[tuple[str, str], Any] = {
    ("train", "dropout"): True, ("train", "optimizer"): "adamw", ("amole", "reassign_every"): 1,
    ("fleet", "update_norm_factor"): 10.0, ("fleet", "robust"): "none", ("fleet", "max_samples"): 1_000_000,
    ("fleet", "max_update_value"): 1e6, ("simulate", "native_clients"): 0, ("a2", "router_every_round"): False,
    ("a2", "warm_start"): False, ("amole", "keep_bonus"): 0.0,
}
#: ``amole.holders`` before "auto" (0) became its default; see :func:`_legacy_holders`
LEGACY_HOLDERS = 2


def _legacy_holders(config: dict[str, Any]) -> None:
    """Key an automatic C (``amole.holders = 0``) as the old default C = 2 wherever that ran the same fleet: every
    plain-LoRA method (which has no experts) and expert fleets where C = 2 resolved to the same C as "auto" does,
    so that runs recorded before the change keep their keys."""
    a, n = config["amole"], config["simulate"]["clients"]
    if a.get("holders") != 0:
        return
    if config["fleet"]["method"] in EXPERT_METHODS:
        try:
            same = (feasible_holders(a["experts"], n, 0, a["top_k"], a["slots"])
                    == feasible_holders(a["experts"], n, LEGACY_HOLDERS, a["top_k"], a["slots"]))
        except ConfigError:
            same = False
        if not same:
            return
    a["holders"] = LEGACY_HOLDERS


def _identity(settings: dict[str, Any], global_test_size: int, per_method: set[str] | None = None) -> tuple[str, str]:
    """(key of the run, key of its setup): the run's whole config; the setup is that config without the grid's
    axes and the settings that ``per_method`` names (``section.name`` the methods' defaults decide), so that the
    runs of one grid share a setup and summaries never mix runs of different setups."""
    config = json.loads(json.dumps(settings))
    config["simulate"].pop("threads", None)  # how fast, not what
    config["simulate"].pop("artifact", None)
    for (section, name), default in KEY_STABLE_DEFAULTS.items():
        if config[section].get(name) == default:
            config[section].pop(name)
    config["global_test_size"] = global_test_size
    # Since the deployed model (docs/deployed-model.md) every device holds out a validation split, which changes
    # what it trains on and what personalised accuracy means: runs recorded before it must not count as done.
    config["device"] = {"val_fraction": ClientOptions.val_fraction}
    # Since 2026-12-05 devices build the run's initial state themselves (docs/protocol.md 4.4.1: round 1 downloads
    # nothing) and seed dropout per round (a run no longer depends on what its worker process ran before it): runs
    # recorded before are run again.
    config["device"]["behaviour"] = "2026-12-05"
    # Since 2026-12-05 (later) an assignment sent by version carries one digest of the whole model instead of a digest
    # per kept tensor (docs/protocol.md 4.4.1): the same models, fewer bytes down. Runs recorded before keep their
    # bytes under their own setup, never averaged with these.
    config["device"]["download"] = "model-digest"
    setup = json.loads(json.dumps(config))  # "auto" C for every method: one setup for the grid
    _legacy_holders(config)
    if config["fleet"]["method"] in EXPERT_METHODS:
        # Since the final evaluation keeps the expert sets of the last round (aggregator/strategies/fedamole.py), the
        # expert methods' final figures are of other models than before: their earlier runs must not count as done.
        config["amole"]["final_sets"] = "kept"
    for section, name in (("fleet", "method"), ("fleet", "seed"), ("data", "partition"), ("lora", "r"),
                          ("a2", "upload_rank")):
        setup[section].pop(name, None)
    for dotted in per_method or ():
        section, name = dotted.split(".", 1)
        setup[section].pop(name, None)
    return _digest(config), _digest(setup)


def plan_runs(base: Settings, bench: BenchConfig) -> list[RunSpec]:
    """Every run of the grid, cells (partition, seed) outermost so that a cell's partitions are made once."""
    if base.simulate.engine not in ENGINES:
        raise ConfigError(f"unknown engine {base.simulate.engine!r} (available: {', '.join(ENGINES)})")
    partitions = grid_partitions(base, bench)
    # every setting some method has a default for, unless the config sets it: the same for every grid, so that the
    # setups of grids of other methods (run into the same folder) agree
    per_method = {k for defaults in METHOD_DEFAULTS.values() for k in defaults} - bench.explicit
    per_method |= {k for settings in bench.method_settings.values() for k in settings}
    specs = []
    for partition, alpha in partitions:
        for seed in bench.seeds:
            for method in bench.methods:
                for rank in bench.ranks:
                    built, applied = run_settings(base, method, rank, partition, seed, bench.explicit,
                                                  bench.method_settings.get(method))
                    if method in EXPERT_METHODS:
                        am = built.amole
                        feasible_holders(am.experts, built.simulate.clients, am.holders, am.top_k, am.slots)
                    settings = built.to_dict()
                    key, setup = _identity(settings, bench.global_test_size, per_method)
                    specs.append(RunSpec(method, rank, alpha, seed, settings, key, setup, bench.global_test_size,
                                         bench.threads, partition, {**applied.applied, **applied.configured}))
    return specs


def defaults_lines(base: Settings, bench: BenchConfig) -> list[str]:
    """One line per method of the grid saying which of its defaults apply (and which the config sets)."""
    lines = []
    for method in bench.methods:
        line = run_settings(base, method, bench.ranks[0], "iid", 0, bench.explicit,
                            bench.method_settings.get(method))[1].line()
        if line:
            lines.append(line)
    return lines


def prepare_cell(settings: Settings, directory: Path, global_test_size: int) -> dict[str, Any]:
    """Partitions of one (partition, seed) cell and its global test set (the dataset's test split, or the union of the
    clients' test splits when it has none), subsampled with a fixed seed; returns the data report."""
    directory.mkdir(parents=True, exist_ok=True)
    report = prepare_partitions(settings, directory)
    _, test = load_source(settings.data, settings.fleet.seed)
    source = "test split"
    if test is None:
        test = TextDataset.concat([load_table(directory / f"{c}.test.jsonl") for c in report["clients"]])
        source = "union of the clients' test splits"
    if len(test) == 0:
        raise EdgemoleError(f"dataset {settings.data.dataset!r} leaves no examples for global accuracy")
    if 0 < global_test_size < len(test):
        test = test.subset(sorted(random.Random(GLOBAL_TEST_SEED).sample(range(len(test)), global_test_size)))
    write_jsonl(directory / "global_test.jsonl", test.without_columns(JSONL_KEYS))
    return {**report, "global_test": {"source": source, "examples": len(test)}}


def prepare_cells(specs: list[RunSpec], work: Path) -> list[RunSpec]:
    """``specs`` with their data: each (partition, seed) cell is partitioned once, into a folder under ``work``."""
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    ready = []
    for spec in specs:
        name = f"alpha{spec.alpha:g}" if spec.alpha is not None else re.sub(r"[^A-Za-z0-9_.-]", "_", spec.partition)
        directory = work / f"{name}-seed{spec.seed}"
        if (spec.partition, spec.seed) not in cells:
            cells[spec.partition, spec.seed] = prepare_cell(spec.build(), directory, spec.global_test_size)
        cell = cells[spec.partition, spec.seed]
        ready.append(dataclasses.replace(spec, labels=cell["labels"], data_dir=str(directory), data=cell))
    return ready


# -- one run ----------------------------------------------------------------------------------------------------
class SharedEngine:
    """Engine factory for the clients of one run: one model for all of them.

    Sharing is safe because clients run one at a time and every assignment loads the whole trainable state (for
    AMoLE, the held experts into the first slots, the other slots zeroed and masked) before anything reads it.
    """

    def __init__(self, name: str, threads: int) -> None:
        self.name, self.threads = name, threads
        self.engine: TrainingEngine | None = None
        self.task: TaskSpec | None = None

    def __call__(self, task: TaskSpec) -> TrainingEngine:
        if self.engine is None or task != self.task:
            self.engine, self.task = make_engine(self.name, task, threads=self.threads), task
        return self.engine


def _global_accuracy(engine: TrainingEngine, strategy: Strategy, final: dict[str, Any], test_path: Path,
                     uses_experts: bool, eval_batch_size: int, max_length: int,
                     labels: list[str]) -> tuple[float, float | None, float]:
    """DESIGN.md 5.5: the aggregated model on the global test set; for expert methods, the mean (and spread) over
    clients of each client's own model. Returns (mean, std or None, seconds)."""
    started = time.perf_counter()
    data = LocalData(test_path, test_path=test_path)  # tokenised exactly like a device's test split
    data.prepare(labels, engine.tokenizer, max_length)
    clients = final["answered"] if uses_experts else final["answered"][:1]
    accuracies = []
    for client in clients:
        body = {"experts": final["experts"][client]} if uses_experts else {}
        engine.set_state(strategy.model_for(client), body)
        accuracies.append(engine.evaluate(data.test_batches(eval_batch_size)).accuracy)
    mean = sum(accuracies) / len(accuracies)
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / len(accuracies)) if uses_experts else None
    return mean, std, time.perf_counter() - started


def rank_budget(settings: Settings, strategy: Strategy, rounds: list[dict[str, Any]]) -> dict[str, float | None]:
    """A rank-selective method's budget as used: ranks a device uploaded per update, and the ranks it held (the
    LoRA rank times its adapters: every module's LoRA, or for fedamole-a2 each held expert and the shared expert
    of every module), means over devices and training rounds; None for the other methods."""
    method = settings.fleet.method
    uploaded = [r["ranks_uploaded_mean"] for r in rounds if r.get("ranks_uploaded_mean") is not None]
    if method not in A2_METHODS or not uploaded:
        return {"ranks_uploaded_mean": None, "ranks_held_mean": None}
    if method in EXPERT_METHODS:
        held = [sum(len(ids) + 1 for ids in per_module.values())
                for r in rounds for c, per_module in r.get("experts", {}).items() if c in r["answered"]]
        adapters = sum(held) / len(held) if held else None
    else:
        adapters = float(len(adapter_prefixes(getattr(strategy, "global_state", {}))))
    return {"ranks_uploaded_mean": sum(uploaded) / len(uploaded),
            "ranks_held_mean": None if adapters is None else adapters * settings.lora.r}


def run_one(spec: RunSpec, on_round: OnRound | None = None) -> dict[str, Any]:
    """One in-memory fleet: aggregator and clients over a :class:`MemoryBroker`; returns the run's record."""
    started = time.perf_counter()
    settings = spec.build()
    settings.data.labels = spec.labels
    task = settings.task(spec.labels)
    topics = Topics(settings.fleet.fleet, settings.fleet.topic_prefix)
    broker = MemoryBroker()
    engines = SharedEngine(settings.simulate.engine, spec.threads)
    service = AggregatorService(settings.fleet, task, link=MemoryLink(broker, topics.mqtt_client_id("aggregator")))
    clients = []
    data = Path(spec.data_dir)
    budgets = settings.simulate.upload_ranks  # per-device LoRA-A2 budgets, given in turn as simulate does
    for i, name in enumerate(spec.data["clients"]):
        opts = ClientOptions(broker="memory", client_id=name, data=str(data / f"{name}.train.jsonl"),
                             test_data=str(data / f"{name}.test.jsonl"), fleet=settings.fleet.fleet,
                             topic_prefix=settings.fleet.topic_prefix, engine=settings.simulate.engine,
                             threads=spec.threads, eval_after_training=False,
                             upload_rank=budgets[i % len(budgets)] if budgets else None)
        link = MemoryLink(broker, topics.device_mqtt_id(name))
        client = EdgeClient(opts, link=link, engine_factory=engines)
        client.start()
        link.serve(client.handle)
        clients.append(client)
    observer = MemoryLink(broker, topics.mqtt_client_id("observer"))  # the metrics topic, as simulate watches it
    observer.connect()
    observer.subscribe(topics.metrics)

    def watch(inbound: Inbound) -> None:
        if on_round is not None:
            body = decode(inbound.payload, settings.fleet.max_message_bytes).body
            on_round(round_brief(body))

    observer.serve(watch)
    summary = service.run()
    while observer.inbox:  # the final evaluation's record arrives after the aggregator's last receive
        watch(observer.inbox.popleft())
    for client in clients:
        client.stop()
    assert service.strategy is not None and engines.engine is not None
    global_acc, global_std, global_s = _global_accuracy(
        engines.engine, service.strategy, summary["final"], data / "global_test.jsonl", task.uses_experts,
        settings.train.eval_batch_size, settings.model.max_length, spec.labels)
    wall = time.perf_counter() - started
    return {
        "key": spec.key,
        "setup": spec.setup,
        "method": spec.method,
        "rank": spec.rank,
        "lora_r": settings.lora.r,
        "alpha": spec.alpha,
        "partition": spec.partition,
        "seed": spec.seed,
        "dataset": settings.data.dataset,
        "clients": settings.simulate.clients,
        "rounds": settings.fleet.rounds,
        "local_steps": settings.train.local_steps,
        "method_defaults": spec.method_defaults,
        "personalised_accuracy": summary["final_personalised_accuracy"],
        "personalised_accuracy_std": summary["final_personalised_accuracy_std"],
        # the received (aggregated) and the locally trained model, beside the deployed (personalised) one
        "received_accuracy": summary.get("final_received_accuracy"),
        "received_accuracy_std": summary.get("final_received_accuracy_std"),
        "trained_accuracy": summary.get("final_trained_accuracy"),
        "trained_accuracy_std": summary.get("final_trained_accuracy_std"),
        **rank_budget(settings, service.strategy, summary["rounds"]),
        "rejected": sum(summary.get("rejected", {}).values()),
        "global_accuracy": global_acc,
        "global_accuracy_std": global_std,
        "accuracy_curve": summary["accuracy_curve"],
        "params_up": summary["params_up_total"],
        "params_down": summary["params_down_total"],
        "bytes_up": summary["bytes_up_total"],
        "bytes_down": summary["bytes_down_total"],
        "wall_s": wall,
        "rounds_wall_s": summary["rounds_wall_s_total"],
        "global_eval_s": global_s,
        "global_test": spec.data["global_test"],
        "threads": spec.threads,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "edgemole_version": __version__,
        "config": {**spec.settings, "global_test_size": spec.global_test_size},
        "data": {k: v for k, v in spec.data.items() if k != "labels"},
        "service": summary,
    }


# -- worker processes -------------------------------------------------------------------------------------------
_QUEUE: Any = None


def exit_with_parent(poll_s: float = 1.0) -> None:
    """End this process (from a daemon thread) once its parent is gone: a bench killed with SIGTERM or SIGKILL must
    not leave its workers running their current run (up to an hour) with nobody to record it."""

    def watch(parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, args=(os.getppid(),), daemon=True).start()


def _worker_init(queue: Any, threads: int) -> None:
    global _QUEUE
    import torch

    exit_with_parent()
    _QUEUE = queue
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _worker_run(spec: RunSpec) -> dict[str, Any]:
    return run_one(spec, lambda brief: _QUEUE.put((spec.key, brief)))


def _execute(specs: list[RunSpec], jobs: int, threads: int, on_round: Callable[[RunSpec, dict[str, Any]], None],
             on_start: Callable[[RunSpec], None]) -> Iterator[dict[str, Any]]:
    """Run ``specs`` here (one job) or in ``jobs`` spawned worker processes; yields records as runs finish."""
    if jobs == 1 or len(specs) == 1:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for spec in specs:
                on_start(spec)
                yield run_one(spec, lambda brief, s=spec: on_round(s, brief))
        finally:
            torch.set_num_threads(before)
        return
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    by_key = {s.key: s for s in specs}
    env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the spawned interpreters at start-up
    try:
        with ProcessPoolExecutor(min(jobs, len(specs)), mp_context=ctx, initializer=_worker_init,
                                 initargs=(queue, threads)) as pool:
            futures: dict[Future, RunSpec] = {}
            for spec in specs:
                futures[pool.submit(_worker_run, spec)] = spec
            started: set[str] = set()
            try:
                while futures:
                    done, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                    while not queue.empty():
                        key, brief = queue.get()
                        if key not in started:
                            started.add(key)
                            on_start(by_key[key])
                        on_round(by_key[key], brief)
                    for future in done:
                        futures.pop(future)
                        yield future.result()
            finally:
                for future in futures:
                    future.cancel()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- results folder ---------------------------------------------------------------------------------------------
def prepare_out(path: str) -> Path:
    """The results folder, created if needed; a one-line error if it cannot be."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        # a name of its own: benches started side by side on one folder must not delete each other's probe
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write results to '{out}': {exc.strerror or exc}") from None
    return out


def load_results(out: Path) -> list[dict[str, Any]]:
    """The runs already in ``out/results.json`` (none if it does not exist)."""
    path = out / RESULTS_FILE
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        runs = data["runs"]
        if data.get("version") != RESULTS_VERSION or not all(isinstance(r, dict) and "key" in r for r in runs):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"'{path}' is not an edgemole bench results file; choose another --out") from None
    return runs


def save_results(out: Path, runs: list[dict[str, Any]]) -> None:
    """Replace ``results.json`` atomically, so an interrupted bench never leaves half a file."""
    tmp = out / f".{RESULTS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"version": RESULTS_VERSION, "runs": runs}, indent=1))
    tmp.replace(out / RESULTS_FILE)


def relabel_setups(out: Path, setups: dict[str, str]) -> list[dict[str, Any]]:
    """Give the runs of ``out`` whose key is in ``setups`` that setup label (under the lock of :func:`add_result`);
    returns every run."""
    folder = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        runs = load_results(out)
        for r in runs:
            r["setup"] = setups.get(r["key"], r["setup"])
        save_results(out, runs)
    finally:
        os.close(folder)
    return runs


def add_result(out: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Add one finished run to ``results.json`` and return every run in it.

    The file is read again under an exclusive lock before writing, so two benches filling the same folder (say, two
    alphas started side by side) keep each other's runs instead of the last writer's list winning.
    """
    folder = os.open(out, os.O_RDONLY)  # the lock is on the folder itself, so it leaves no file behind
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        runs = [r for r in load_results(out) if r["key"] != record["key"]]
        runs.append(record)
        save_results(out, runs)
    finally:
        os.close(folder)  # closing releases the lock
    return runs


def bench(settings: Settings, cfg: BenchConfig, *, console: Console | None = None) -> list[dict[str, Any]]:
    """Run the grid's missing runs, then write the tables and plots of every run in ``cfg.out``; returns all runs."""
    from fleet.bench_report import print_summary, write_reports

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: wide enough for the summary table
            console = Console(width=180)
    specs = plan_runs(settings, cfg)  # bad input fails before anything is written
    out = prepare_out(cfg.out)
    runs = load_results(out)
    setups = {s.key: s.setup for s in specs}
    if any(r["key"] in setups and r["setup"] != setups[r["key"]] for r in runs):
        # a run recorded by an earlier grid is the same run (same key), but its setup label may be of another
        # grid's per-method settings: relabel it, so that this grid's summary shows it with the new runs
        runs = relabel_setups(out, setups)
    done = {r["key"] for r in runs}
    pending = [s for s in specs if s.key not in done]
    partitions = ", ".join(dict.fromkeys(s.partition for s in specs))
    console.print(f"{len(specs)} runs in the grid: {len(specs) - len(pending)} already in {out / RESULTS_FILE}, "
                  f"{len(pending)} to run ({settings.simulate.clients} clients, {settings.fleet.rounds} rounds, "
                  f"partition {partitions}, {cfg.jobs} job(s) x {cfg.threads} thread(s))")
    for line in defaults_lines(settings, cfg):
        console.print(line, highlight=False)
    try:
        if pending:
            _run_pending(settings, cfg, pending, runs, out, console)
    finally:
        if runs:
            written = write_reports(out, runs)
            print_summary(runs, console)
            console.print(f"results in {out}: " + ", ".join(p.name for p in written))
    return runs


def _run_pending(settings: Settings, cfg: BenchConfig, pending: list[RunSpec], runs: list[dict[str, Any]],
                 out: Path, console: Console) -> None:
    with tempfile.TemporaryDirectory(prefix="edgemole-bench-") as work:
        pending = prepare_cells(pending, Path(work))
        rounds = settings.fleet.rounds + 1
        # bars on a terminal; in a log or a pipe, where bars only show at the end, a plain line per round instead
        plain = not console.is_terminal
        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, disable=plain)
        runs_task = progress.add_task("runs", total=len(pending))
        rounds_task = progress.add_task("rounds (+ final eval), all runs", total=len(pending) * rounds)

        def on_start(spec: RunSpec) -> None:
            progress.update(runs_task, description=f"runs (now: {spec.label})")

        def on_round(spec: RunSpec, r: dict[str, Any]) -> None:
            progress.advance(rounds_task)
            progress.update(rounds_task,
                            description=f"rounds: {spec.label} round {r['round']} acc {fmt_pct(r['accuracy'])}")
            if plain:
                console.print(f"{spec.label} round {r['round']} {r['phase']}: {r['answered']}/{r['selected']} "
                              f"clients, acc {fmt_pct(r['accuracy'])}, up {fmt_bytes(r['bytes_up'])}, down "
                              f"{fmt_bytes(r['bytes_down'])}", highlight=False, soft_wrap=True)

        with progress:
            for record in _execute(pending, cfg.jobs, cfg.threads, on_round, on_start):
                runs[:] = add_result(out, record)
                progress.advance(runs_task)
                progress.console.print(
                    f"{record['method']} r{record['rank']} {partition_label(record['partition'])} s{record['seed']}: "
                    f"personalised {fmt_pct(record['personalised_accuracy'])}, global "
                    f"{fmt_pct(record['global_accuracy'])}, up {fmt_bytes(record['bytes_up'])}, down "
                    f"{fmt_bytes(record['bytes_down'])}, {record['local_steps']} local steps, "
                    f"{rejected_text(record['service'].get('rejected', {}))}, {record['wall_s']:.0f} s",
                    highlight=False)
