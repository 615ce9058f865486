"""A fleet of real processes (Mosquitto, the aggregator, the clients) into which a test or benchmark injects one
fault mid-round: kill -9 of the aggregator (then ``--resume``), of Mosquitto (persistence off; restarted on the same
port) or of one client (restarted). Used by tests/test_faults.py and benchmarks/faults.py."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from conftest import spawn, write_client_data, write_config

from aggregator.checkpoint import LATEST, read_checkpoint
from edgemole.broker import free_port, mosquitto_binary, wait_for_port
from edgemole.mqtt import MqttLink
from edgemole.protocol import Kind, Topics, decode
from fleet.simulate import stop_processes

FAULTS = ("aggregator", "broker", "client")
#: the round in which the fault strikes (of ROUNDS); round 1 is checkpointed before it, so a resume is real
FAULT_ROUND = 2
ROUNDS = 3
AMOLE = {"experts": 4, "slots": 3, "holders": 1, "top_k": 2}


class Mosquitto:
    """A Mosquitto without persistence on a fixed loopback port that can be killed and started again."""

    def __init__(self, directory: Path) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed")
        self.binary, self.port = binary, free_port()
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.log = directory / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.port, 10, self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class FaultRun:
    """What one run left: the aggregator's last checkpoint, its summary, and when things happened."""

    state: dict[str, torch.Tensor]
    extra: dict[str, Any]
    summary: dict[str, Any]
    wall_s: float
    fault: str | None = None
    #: seconds from the fault to the close of the round it struck (its metrics record)
    recover_s: float | None = None
    #: updates of the fault round the observer saw before the fault (what the fault could have lost)
    updates_before_fault: int = 0
    events: list[str] = field(default_factory=list)


class FaultFleet:
    """Aggregator + ``len(sizes)`` clients of ``method`` through Mosquitto, with deterministic training."""

    def __init__(self, tmp: Path, model: str, method: str, sizes: tuple[int, ...] = (20, 28),
                 local_steps: int = 3) -> None:
        self.tmp, self.method = tmp, method
        tmp.mkdir(parents=True, exist_ok=True)
        self.files, labels = write_client_data(tmp, list(sizes))
        self.config = write_config(tmp / "config.json", model, labels, {"dropout": False, "local_steps": local_steps},
                                   AMOLE if "fedamole" in method else None, method=method, rounds=ROUNDS,
                                   min_clients=len(sizes), quorum=1.0, round_deadline_s=60.0, wait_clients_s=60.0)
        self.topics = Topics("t")
        self.ckpt = tmp / "checkpoints"
        self.summary_path = tmp / "summary.json"

    def _aggregator(self, broker: str, resume: bool = False) -> subprocess.Popen:
        return spawn(["aggregator", "--broker", broker, "--config", str(self.config), "--json-out",
                      str(self.summary_path), "--checkpoint-dir", str(self.ckpt), *(["--resume"] if resume else [])],
                     self.tmp / "aggregator.log")

    def _client(self, broker: str, k: int) -> subprocess.Popen:
        train, test = self.files[k]
        return spawn(["client", "--broker", broker, "--client-id", f"c{k}", "--data", str(train), "--test-data",
                      str(test), "--fleet", "t", "--threads", "1"], self.tmp / f"c{k}.log")

    def logs(self) -> str:
        logs = sorted(self.tmp.glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)

    def run(self, fault: str | None = None, timeout_s: float = 150.0) -> FaultRun:
        """Run the fleet to its end, injecting ``fault`` (one of :data:`FAULTS`) in round :data:`FAULT_ROUND`."""
        broker = Mosquitto(self.tmp)
        started = time.monotonic()
        aggregator = self._aggregator(broker.url)
        clients = [self._client(broker.url, k) for k in range(len(self.files))]
        observer = MqttLink(broker.url, "fault-observer", clean_session=True)
        procs = [aggregator, *clients]
        victim = len(clients) - 1
        seen_assign: set[str] = set()
        announced = False
        updates_before = 0
        fault_at: float | None = None
        recover_s: float | None = None
        events: list[str] = []
        try:
            observer.connect(10)
            observer.subscribe(f"{self.topics.base}/#")
            deadline = time.monotonic() + timeout_s
            while aggregator.poll() is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"fleet ({fault}) did not finish in time:\n{self.logs()}")
                inbound = observer.receive(0.1)
                if inbound is None or not inbound.payload:
                    continue
                try:
                    msg = decode(inbound.payload, 64 * 2**20)
                except Exception:  # noqa: BLE001 - a status cleared or half-written: not ours to judge
                    continue
                if msg.kind == Kind.ROUND and msg.round > FAULT_ROUND and fault_at is not None and recover_s is None:
                    # the next round's announcement (retained) also proves the fault round closed: after a broker
                    # restart this observer may reconnect only after the fleet did and miss the round's metrics
                    recover_s = time.monotonic() - fault_at
                if inbound.retain:
                    continue
                if msg.round == FAULT_ROUND and msg.kind == Kind.ROUND:
                    announced = True
                if msg.round == FAULT_ROUND and msg.kind == Kind.ASSIGN:
                    seen_assign.add(msg.client)
                if msg.round == FAULT_ROUND and msg.kind == Kind.UPDATE and fault_at is None:
                    updates_before += 1
                if msg.kind == Kind.METRICS and msg.round == FAULT_ROUND and fault_at is not None \
                        and recover_s is None:
                    recover_s = time.monotonic() - fault_at
                if fault is None or fault_at is not None:
                    continue
                if fault == "aggregator" and len(seen_assign) == len(clients):
                    # every assignment of the round is out: the devices are training when it dies
                    aggregator.send_signal(signal.SIGKILL)
                    aggregator.wait(10)
                    fault_at = time.monotonic()
                    aggregator = self._aggregator(broker.url, resume=True)
                    procs.append(aggregator)
                elif fault == "broker" and updates_before >= 1:
                    # an update is on its way to the aggregator, the others are being trained
                    broker.kill()
                    fault_at = time.monotonic()
                    broker.start()
                elif fault == "client" and announced:
                    # the round is announced, its assignments are on their way: the device cannot have answered
                    clients[victim].send_signal(signal.SIGKILL)
                    clients[victim].wait(10)
                    fault_at = time.monotonic()
                    clients[victim] = self._client(broker.url, victim)
                    procs.append(clients[victim])
                if fault_at is not None:
                    events.append(f"{fault} killed after {len(seen_assign)} assignment(s) and {updates_before} "
                                  f"update(s) of round {FAULT_ROUND}")
            wall = time.monotonic() - started
            if aggregator.returncode != 0:
                raise AssertionError(f"aggregator exited with {aggregator.returncode} ({fault}):\n{self.logs()}")
            if fault is not None and fault_at is None:
                raise AssertionError(f"the fault {fault} was never injected:\n{self.logs()}")
            for k, client in enumerate(clients):  # every device saw the run's end and left by itself
                if client.wait(30) != 0:
                    raise AssertionError(f"client c{k} exited with {client.returncode} ({fault}):\n{self.logs()}")
        finally:
            stop_processes(procs, 5)
            observer.close()
            broker.stop()
        ckpt = read_checkpoint(self.ckpt / LATEST)
        summary = json.loads(self.summary_path.read_text())
        return FaultRun(ckpt.state, ckpt.strategy_extra, summary, wall, fault, recover_s, updates_before, events)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two states with the same tensors (inf if the names differ)."""
    if set(a) != set(b):
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def lost_updates(summary: dict[str, Any]) -> int:
    """Selected devices whose update the aggregator never counted, over every round."""
    return sum(len(r["selected"]) - len(r["answered"]) for r in [*summary["rounds"], summary["final"]])
