"""``edgemole simulate``: an emulated fleet on one machine, each role in its own OS process.

The simulator partitions the data, starts a broker (embedded amqtt unless ``--broker`` is given),
the aggregator and N clients exactly as a user would start them by hand (``python -m fleet ...``),
then watches the metrics topic to show progress and collects the results.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from aggregator.assignment import feasible_holders
from edgemole.adapters.amole.config import AMoLEConfig
from edgemole.broker import embedded_broker
from edgemole.config import EXPERT_METHODS, Settings
from edgemole.data import JSONL_KEYS, partition, split_train_test, write_jsonl
from edgemole.data.partition import parse_partition
from edgemole.data.source import default_partition, load_source
from edgemole.errors import ConfigError, EdgemoleError, ProtocolError
from edgemole.mqtt import MQTT_VERSION_ENV, BrokerCredentials, MqttLink
from edgemole.protocol import Kind, Topics, decode
from edgemole.protocol.messages import json_safe
from fleet.native import find_native_binary
from fleet.report import plot_run
from fleet.units import fmt_bytes, fmt_pct


def rejected_text(rejected: dict[str, int]) -> str:
    """The aggregator's rejected messages for a summary: ``0 rejected`` or ``3 rejected (reason 2, other 1)``."""
    total = sum(rejected.values())
    if not total:
        return "0 rejected"
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(rejected.items(), key=lambda kv: -kv[1]))
    return f"{total} rejected ({reasons})"


#: longest partition value (e.g. a domain) carried in a client's name
NAME_TAG_CHARS = 16


def client_name(index: int, tag: str | None = None) -> str:
    """``client-3``, or ``client-3-banking`` with the client's column value (sanitised to the protocol's name
    characters and cut short), so that logs and tables show which share a client has."""
    name = f"client-{index}"
    cleaned = re.sub(r"[^A-Za-z0-9_.]+", "_", tag or "").strip("_.")[:NAME_TAG_CHARS].rstrip("_.")
    return f"{name}-{cleaned}" if cleaned else name


def holders_used(amole: AMoLEConfig, clients: int, records: list[dict[str, Any]]) -> int | None:
    """C as the fleet used it: the last round record's ``holders``, else what ``amole.holders`` resolves to for
    ``clients`` devices (0: the smallest feasible C); None when no C is feasible."""
    for record in reversed(records):
        if isinstance(record.get("holders"), int) and record["holders"] > 0:  # 0: sets kept from a checkpoint
            return record["holders"]
    try:
        return feasible_holders(amole.experts, clients, amole.holders, amole.top_k, amole.slots)
    except ConfigError:
        return None


def experts_line(amole: AMoLEConfig, clients: int, records: list[dict[str, Any]]) -> str:
    """The expert configuration with the C actually used (``auto`` when the smallest feasible C was chosen)."""
    used = holders_used(amole, clients, records)
    how = "auto" if amole.holders == 0 else (f"configured {amole.holders}" if used != amole.holders else "")
    return (f"experts: E={amole.experts}, M={amole.slots}, C={'-' if used is None else used}"
            f"{f' ({how})' if how else ''}, k={amole.top_k}")


def _last_error(log_path: Path) -> str:
    """The last ``error: ...`` (or last) line of a role's log, to explain why it stopped."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def prepare_partitions(settings: Settings, data_dir: Path, tag_names: bool = True) -> dict[str, Any]:
    """Split the data over the clients and write each client's train/test JSONL; returns the data report, whose
    ``clients`` are in client order. With ``tag_names`` and a ``column:NAME`` partition a client's name carries its
    (most frequent) value of the column, e.g. ``client-0-banking``."""
    seed, n = settings.fleet.seed, settings.simulate.clients
    train, test = load_source(settings.data, seed)
    labels = settings.data.labels or sorted(set(train.labels) | set(test.labels if test is not None else []))
    spec = default_partition(settings.data)
    parts = partition(train, n, spec, seed)
    parsed = parse_partition(spec)
    column = (train.labels if parsed.column == "label" else train.columns.get(parsed.column or "")) \
        if parsed.kind == "column" and tag_names else None
    # clients read their files with the default text/label keys, so source columns of those names (20 Newsgroups'
    # numeric ``label`` next to the chosen ``label_name``) are dropped rather than clash with them
    train = train.without_columns(JSONL_KEYS)
    clients = {}
    for i, indices in enumerate(parts):
        tr, te = split_train_test(indices, train.labels, settings.data.test_fraction, seed + i)
        name = client_name(i, Counter(column[j] for j in indices).most_common(1)[0][0] if column and indices
                           else None)
        write_jsonl(data_dir / f"{name}.train.jsonl", train.subset(tr))
        write_jsonl(data_dir / f"{name}.test.jsonl", train.subset(te))
        clients[name] = {"train": len(tr), "test": len(te), "labels": len({train.labels[j] for j in tr})}
    return {"dataset": settings.data.dataset, "partition": spec, "labels": labels, "clients": clients}


#: optional round-record accuracies, shown as table columns once a record has them: (key, column)
EXTRA_ACCURACIES = (("accuracy_trained", "acc trained"), ("accuracy_deployed", "acc deployed"))


def round_line(r: dict[str, Any]) -> str:
    """One plain line of a round record, for logs (output that is not a terminal)."""
    extra = "".join(f", {col} {fmt_pct(r.get(key))}" for key, col in EXTRA_ACCURACIES if key in r)
    return (f"round {r['round']} {r['phase']}: {len(r['answered'])}/{len(r['selected'])} clients, acc in "
            f"{fmt_pct(r['accuracy_before'])}, acc local {fmt_pct(r['accuracy_after_local'])}{extra}, "
            f"up {fmt_bytes(r['bytes_up'])}, down {fmt_bytes(r['bytes_down'])}, {r['wall_s']:.0f} s")


class _Display:
    """Progress bar and per-round table, refreshed as metrics arrive on a terminal; elsewhere (a log, a pipe) one
    plain line per round, and the table once at the end."""

    def __init__(self, console: Console, rounds: int, clients: int) -> None:
        self.console = console
        self.records: list[dict[str, Any]] = []
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console)
        self.ready = self.progress.add_task("clients ready", total=clients)
        self.rounds = self.progress.add_task("rounds (+ final eval)", total=rounds + 1)
        self.live = Live(self._group(), console=console, refresh_per_second=4) if console.is_terminal else None

    def table(self) -> Table:
        """The round table; the optional accuracy columns appear once a record carries them."""
        extra = [(key, col) for key, col in EXTRA_ACCURACIES if any(key in r for r in self.records)]
        table = Table(title="edgemole simulate", header_style="bold",
                      caption="acc in: the received (aggregated) model on each client's test split; acc local: "
                      "after local training; acc trained: the model kept from the last round's training; acc "
                      "deployed: the one the device serves (docs/deployed-model.md); means over clients; experts: "
                      "held per module / distinct expert sets; "
                      "up/down in binary units (1 MiB = 2^20 bytes)")
        for col in ("round", "phase", "clients", "acc in", "acc local", *(c for _, c in extra), "loss", "experts",
                    "up", "down", "secs"):
            table.add_column(col, justify="right", no_wrap=True)
        for r in self.records:
            table.add_row(
                str(r["round"]), r["phase"], f"{len(r['answered'])}/{len(r['selected'])}",
                fmt_pct(r["accuracy_before"]), fmt_pct(r["accuracy_after_local"]),
                *(fmt_pct(r.get(key)) for key, _ in extra),
                "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}",
                f"{r['experts_per_module_mean']:.1f}/{r['distinct_architectures']}" if "distinct_architectures" in r
                else "-",
                fmt_bytes(r["bytes_up"]), fmt_bytes(r["bytes_down"]), f"{r['wall_s']:.0f}",
            )
        return table

    def _group(self) -> Group:
        return Group(self.table(), self.progress)

    def set_ready(self, count: int) -> None:
        self.progress.update(self.ready, completed=count)

    def add(self, r: dict[str, Any]) -> None:
        self.records.append(r)
        self.progress.advance(self.rounds)
        if self.live is not None:
            self.live.update(self._group())
        else:
            self.console.print(round_line(r), highlight=False, soft_wrap=True)

    def __enter__(self) -> _Display:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()
        elif self.records:
            self.console.print(self.table())


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """Set one environment variable (seen by the child processes started meanwhile), then restore it."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _spawn(args: list[str], log_path: Path, threads: int | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if "--cert-file" in args or "--username" in args:  # an identity of its own: none inherited from this shell
        env = {k: v for k, v in env.items() if not k.startswith("EDGEMOLE_MQTT_") or k == MQTT_VERSION_ENV}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "fleet", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, stdin=subprocess.DEVNULL)


def _spawn_native(binary: Path, settings: Settings, url: str, name: str, work: Path, artifact: Path | None,
                  threads: int, identity: list[str]) -> subprocess.Popen:
    """A native client (``edgemole-device``) with the same data, fleet and budget as a Python one would get."""
    ranks = settings.simulate.upload_ranks
    index = int(name.split("-")[1])
    args = [str(binary), "--broker", url, "--client-id", name, "--fleet", settings.fleet.fleet,
            "--topic-prefix", settings.fleet.topic_prefix, "--artifact", str(artifact),
            "--data", str(work / "data" / f"{name}.train.jsonl"),
            "--test-data", str(work / "data" / f"{name}.test.jsonl"), "--threads", str(threads),
            *(["--upload-rank", str(ranks[index % len(ranks)])] if ranks else []), *identity]
    with open(work / "logs" / f"{name}.log", "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = 0.0) -> None:
    """Give processes ``timeout_s`` to exit by themselves, then terminate, then kill what is left."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def _artifact(settings: Settings, work: Path, console: Console) -> Path | None:
    """The program the executorch clients train with: the configured artifact, else the task's, exported once
    into the work folder (every client loads the same files)."""
    if settings.simulate.engine != "executorch" and not settings.simulate.native_clients:
        if settings.simulate.artifact:
            raise EdgemoleError("simulate.artifact is for the executorch engine and native clients")
        return None
    if settings.simulate.artifact:
        return Path(settings.simulate.artifact).resolve()
    from export.artifact import write_artifact

    out = work / "artifact"
    with console.status("exporting the training program for the executorch clients"):
        started = time.monotonic()
        manifest = write_artifact(settings.task(settings.data.labels), out, force=True)
    console.print(f"exported {manifest.adapter} program: {manifest.program.bytes / 1e6:.1f} MB program, "
                  f"{manifest.data.bytes / 1e6:.1f} MB base weights, {time.monotonic() - started:.0f} s")
    return out


def credential_flags(creds: BrokerCredentials | None) -> list[str]:
    """The command-line flags that give a role process these credentials (the password only as its file)."""
    if creds is None:
        return []
    pairs = (("--ca-file", creds.ca_file), ("--cert-file", creds.cert_file), ("--key-file", creds.key_file),
             ("--username", creds.username), ("--password-file", creds.password_file))
    return [x for flag, value in pairs if value for x in (flag, value)]


def _fleet_identities(settings: Settings, secure_dir: str | Path | None, credentials: BrokerCredentials | None,
                      broker: str | None) -> tuple[str | None, Callable[[str], BrokerCredentials | None]]:
    """The broker URL and each role's credentials: its own identity from a ``broker init`` directory, else the
    same ``credentials`` for every role."""
    if secure_dir is None:
        if credentials is not None and broker is None:
            raise ConfigError("broker credentials need --broker: the embedded broker is plain MQTT on loopback")
        return broker, lambda name: credentials
    from edgemole.security import FleetDir

    fd = FleetDir.load(secure_dir)
    if (fd.meta["fleet"], fd.meta["prefix"]) != (settings.fleet.fleet, settings.fleet.topic_prefix):
        raise ConfigError(f"{secure_dir} is for fleet {fd.meta['fleet']!r} (prefix {fd.meta['prefix']!r}), not "
                          f"{settings.fleet.fleet!r} ({settings.fleet.topic_prefix!r}): pass --fleet")
    names = [client_name(i) for i in range(settings.simulate.clients)]
    if missing := [n for n in names if n not in fd.meta["identities"]]:
        raise ConfigError(f"{secure_dir} has no identity for {', '.join(missing)} (edgemole broker add-device)")
    return broker or fd.url(), fd.credentials


def simulate(settings: Settings, *, broker: str | None = None, json_out: str | None = None,
             plot_out: str | None = None, work_dir: str | None = None, log_level: str = "WARNING",
             console: Console | None = None, credentials: BrokerCredentials | None = None,
             secure_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the emulated fleet to the end and return (and optionally write) its results.

    ``secure_dir`` (a ``broker init`` directory) gives every role its own identity, as on a real TLS + ACL
    broker; ``credentials`` are the same for every role (a broker without per-identity ACLs)."""
    started = time.monotonic()
    broker, identity = _fleet_identities(settings, secure_dir, credentials, broker)
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: wide enough for the round table
            console = Console(width=150)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="edgemole-sim-"))
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    n = settings.simulate.clients
    settings.fleet.min_clients = n
    # a broker init directory has identities client-0..client-N-1 only: no partition tags in the names then
    data_report = prepare_partitions(settings, work / "data", tag_names=secure_dir is None)
    names = list(data_report["clients"])
    settings.data.labels = data_report["labels"]
    artifact = _artifact(settings, work, console)
    config_path = work / "config.json"
    config_path.write_text(json.dumps(settings.to_dict(), indent=2))
    threads = settings.simulate.threads or max(1, (os.cpu_count() or 1) // n)
    topics = Topics(settings.fleet.fleet, settings.fleet.topic_prefix)
    summary_path = work / "summary.json"
    summary_path.unlink(missing_ok=True)
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        if broker is None:
            url = stack.enter_context(embedded_broker(str(work / "logs" / "broker.log")))
            broker_kind = "amqtt (embedded)"
            # amqtt speaks MQTT 3.1.1 only: the roles (this process's observer and the children) skip the MQTT 5
            # attempt, which amqtt would let time out
            stack.enter_context(_environment(MQTT_VERSION_ENV, "3.1.1"))
        else:
            url, broker_kind = broker, "external"
        observer = MqttLink(url, topics.mqtt_client_id(f"observer:{os.getpid()}"), clean_session=True,
                            credentials=identity("observer"))
        observer.connect(timeout_s=15)
        stack.callback(observer.close)
        observer.subscribe(topics.metrics, topics.all_status)
        common = ["--log-level", "INFO" if log_level != "DEBUG" else "DEBUG"]
        agg = _spawn([*common, "aggregator", "--broker", url, "--config", str(config_path), "--json-out",
                      str(summary_path), "--checkpoint-dir", str(work / "checkpoints"),
                      *credential_flags(identity("aggregator"))],
                     work / "logs" / "aggregator.log", threads)
        procs.append(agg)
        clients = []
        native = find_native_binary() if settings.simulate.native_clients else None
        for i, name in enumerate(names):
            if native is not None and i >= n - settings.simulate.native_clients:
                clients.append(_spawn_native(native, settings, url, name, work, artifact, threads,
                                             credential_flags(identity(name))))
                continue
            clients.append(_spawn([
                *common, "client", "--broker", url, "--client-id", name,
                "--data", str(work / "data" / f"{name}.train.jsonl"),
                "--test-data", str(work / "data" / f"{name}.test.jsonl"),
                "--fleet", settings.fleet.fleet, "--topic-prefix", settings.fleet.topic_prefix,
                "--engine", settings.simulate.engine, "--threads", str(threads),
                *(["--artifact", str(artifact)] if settings.simulate.engine == "executorch" else []),
                *(["--upload-rank", str(ranks[i % len(ranks)])] if (ranks := settings.simulate.upload_ranks) else []),
                *credential_flags(identity(name)),
            ], work / "logs" / f"{name}.log", threads))
        procs.extend(clients)
        stack.callback(stop_processes, procs)
        display = _Display(console, settings.fleet.rounds, n)
        ready: set[str] = set()
        with display:
            while agg.poll() is None:
                inbound = observer.receive(0.5)
                for name, c in zip(names, clients, strict=True):
                    if c.poll() not in (None, 0) and not display.records:
                        log = work / "logs" / f"{name}.log"
                        raise EdgemoleError(f"{name} exited before round 1: {_last_error(log)} (log: {log})")
                if inbound is None or not inbound.payload:
                    continue
                try:
                    msg = decode(inbound.payload, settings.fleet.max_message_bytes)
                except ProtocolError:
                    continue
                if msg.kind == Kind.STATUS and msg.body.get("state") == "ready":
                    ready.add(msg.client)
                    display.set_ready(len(ready))
                elif msg.kind == Kind.METRICS:
                    display.add(msg.body)
        if agg.returncode != 0:
            log = work / "logs" / "aggregator.log"
            raise EdgemoleError(f"aggregator failed: {_last_error(log)} (log: {log})")
        stop_processes(clients, 60.0)
    summary = json.loads(summary_path.read_text())
    wall = time.monotonic() - started
    rounds_s = summary["rounds_wall_s_total"]
    compute = sum(r["client_compute_s_max"] or 0.0 for r in summary["rounds"] + [summary["final"]])  # None: overflow
    aggregate = summary["aggregate_s_total"]
    result = {
        **summary,
        "broker": {"kind": broker_kind, "url": url},
        "engine": settings.simulate.engine,
        "native_clients": settings.simulate.native_clients,
        "clients": n,
        "threads_per_client": threads,
        "data": data_report,
        "client_exit_codes": {name: c.returncode for name, c in zip(names, clients, strict=True)},
        "wall_s": wall,
        "timing": {
            "wall_s": wall,
            "startup_and_shutdown_s": wall - rounds_s,
            "rounds_s": rounds_s,
            "client_compute_s": compute,
            "aggregate_s": aggregate,
            "orchestration_s": rounds_s - compute - aggregate,
            "orchestration_share_of_rounds": (rounds_s - compute - aggregate) / rounds_s if rounds_s else None,
        },
        "work_dir": str(work) if work_dir else None,
    }
    final = summary["final"]
    console.print()
    console.print(
        f"final personalised accuracy {fmt_pct(summary['final_personalised_accuracy'])} "
        f"(± {fmt_pct(summary['final_personalised_accuracy_std'])} over {len(final['answered'])} clients), "
        f"uploaded {fmt_bytes(summary['bytes_up_total'])}, downloaded {fmt_bytes(summary['bytes_down_total'])}, "
        f"{wall:.0f} s on {broker_kind}", highlight=False
    )
    others = [f"{what} {fmt_pct(summary[key])}" for key, what in (
        ("final_received_accuracy", "received"), ("final_trained_accuracy", "trained")) if summary.get(key) is not None]
    if others:
        console.print("final accuracy of the " + ", ".join(others) + " model (means over clients; personalised: "
                      "the deployed one)", highlight=False)
    if settings.fleet.method in EXPERT_METHODS:
        console.print(experts_line(settings.amole, n, summary["rounds"]), highlight=False)
    console.print(f"messages: {rejected_text(summary.get('rejected', {}))} by the aggregator", highlight=False)
    if json_out:
        Path(json_out).write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))  # figures from devices
        console.print(f"results written to {json_out}")
    if plot_out:
        console.print(f"plot written to {plot_run(result, plot_out)}")
    if not work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return result
