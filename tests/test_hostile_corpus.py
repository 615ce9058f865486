"""The hostile-input corpus (tests/hostile/manifest.json) against a live fleet through an anonymous Mosquitto.

A clean run (in memory) and an attacked run of the same fleet through Mosquitto (deterministic training: no
dropout, one thread); in the attacked one another identity ("mallory") publishes every entry marked
``plain_broker`` while the victim's round 2 is open. Every entry must be rejected, dropped, ignored or not delivered
as its manifest says, no role may crash, and the aggregator's final checkpoint must equal the clean run's to 1e-6.
The entries marked ``acl-only`` are what an anonymous broker cannot stop (a well-formed message on another device's
topic, a forged task or done of the current run); they belong to the secured broker's tests (helper A's fixture:
``edgemole broker init``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_AMOLE, spawn, tiny_task, whole_assignment, write_client_data, write_config
from hostile.corpus import BUILDERS, Context, build, manifest, topic

from aggregator.checkpoint import LATEST, read_checkpoint
from aggregator.service import AggregatorService
from edge_client.client import ClientOptions, EdgeClient
from edgemole.config import load_settings
from edgemole.mqtt import MqttLink
from edgemole.protocol import Kind, Topics, decode
from edgemole.protocol.delta import Version
from fleet.bench import SharedEngine
from fleet.memory_link import MemoryBroker, MemoryLink
from fleet.simulate import stop_processes

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

SIZES = [24, 30, 36]
VICTIM, OTHER = "c0", "c1"
ATTACK_ROUND = 2
MAX_MESSAGE_BYTES = 2**20


def test_manifest_and_builders_agree() -> None:
    entries = manifest()
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)) and set(names) == set(BUILDERS)
    outcomes = {"rejected", "dropped", "ignored", "not-delivered", "rejected-or-not-delivered", "acl-only"}
    assert {e["expected"] for e in entries} <= outcomes
    assert all(e["plain_broker"] == (e["expected"] != "acl-only") for e in entries)
    assert len(entries) >= 31 + 8


def _run(tmp: Path, broker: str, model: str, method: str, fleet: str, attack: bool) -> dict[str, Any]:
    """One fleet run; with ``attack`` the corpus is published when the victim's round-2 assignment is seen."""
    tmp.mkdir()
    files, labels = write_client_data(tmp, SIZES)
    amole = TINY_AMOLE if "fedamole" in method else None
    config = write_config(tmp / "config.json", model, labels, {"dropout": False}, amole, fleet=fleet, method=method,
                          rounds=2, min_clients=len(SIZES), quorum=1.0, max_message_bytes=MAX_MESSAGE_BYTES)
    topics = Topics(fleet)
    observer = MqttLink(broker, f"observer-{fleet}", clean_session=True)
    observer.connect(10)
    observer.subscribe(f"{topics.base}/#")
    attacker = MqttLink(broker, f"mallory-{fleet}", clean_session=True)
    attacker.connect(10)
    ckpt, summary_path = tmp / "ckpt", tmp / "summary.json"
    aggregator = spawn(["aggregator", "--broker", broker, "--config", str(config), "--json-out", str(summary_path),
                        "--checkpoint-dir", str(ckpt)], tmp / "aggregator.log")
    clients = [spawn(["client", "--broker", broker, "--client-id", f"c{k}", "--data", str(tr), "--test-data", str(te),
                      "--fleet", fleet, "--threads", "1"], tmp / f"c{k}.log") for k, (tr, te) in enumerate(files)]
    updates: dict[tuple[str, int], bytes] = {}
    caches: dict[str, dict[str, Version]] = {}  # the devices' download caches, as a listener rebuilds them
    sent: dict[bytes, str] = {}  # payload -> entry name, for entries that reach the aggregator
    order: list[str] = []  # entry names, and "REAL" for the victim's real update of the attacked round
    # The victim is paused (SIGSTOP) from its update of the round before the attack until the broker has routed every
    # forged message of the attack: then its real update of the attacked round comes after all of them, whatever the
    # machine's load, and each forged one meets the aggregator's checks rather than its duplicate filter.
    victim = clients[0]
    paused: float | None = None
    waiting: set[bytes] = set()
    deadline = time.monotonic() + 150
    try:
        while aggregator.poll() is None:
            assert time.monotonic() < deadline, "fleet did not finish in time"
            if paused is not None and (not waiting and sent or time.monotonic() > paused + 20):
                os.kill(victim.pid, signal.SIGCONT)
                paused = None
            inbound = observer.receive(0.2)
            if inbound is None or not inbound.payload:
                continue
            if inbound.payload in sent:
                order.append(sent[inbound.payload])
                waiting.discard(inbound.payload)
            try:
                msg = decode(inbound.payload, 4 * MAX_MESSAGE_BYTES)
            except Exception:  # noqa: BLE001 - the corpus's own garbage
                continue
            if msg.kind == Kind.UPDATE and inbound.payload not in sent and inbound.topic == topics.update(msg.client):
                updates[(msg.client, msg.round)] = inbound.payload
                if (msg.client, msg.round) == (VICTIM, ATTACK_ROUND):
                    order.append("REAL")
                if attack and (msg.client, msg.round) == (VICTIM, ATTACK_ROUND - 1) and not sent:
                    os.kill(victim.pid, signal.SIGSTOP)
                    paused = time.monotonic()
            if inbound.payload not in sent:  # sent by version: rebuilt as the device does (protocol.md 4.4.1)
                msg = whole_assignment(caches, msg)
            if attack and msg.kind == Kind.ASSIGN and msg.client == VICTIM and msg.round == ATTACK_ROUND and not sent:
                ctx = Context(topics, method, msg.body["run"], msg.round, msg.phase, VICTIM, OTHER, msg,
                              updates[(VICTIM, ATTACK_ROUND - 1)], updates[(OTHER, ATTACK_ROUND - 1)],
                              # the victim's num_train (its data less the validation split it holds out)
                              decode(updates[(VICTIM, ATTACK_ROUND - 1)]).body["num_samples"],
                              MAX_MESSAGE_BYTES, tiny_task(model, method, amole))
                built = [(entry, *build(ctx, entry)) for entry in manifest() if entry["plain_broker"]]
                sent.update({payload: entry["name"] for entry, _, payload, _ in built
                             if entry["topic"].startswith(("update:", "status:"))})
                waiting = set(sent)
                sent.setdefault(b"", "")  # marks the attack as done even if nothing reached the aggregator
                for _, where, payload, retain in built:
                    attacker.publish(where, payload, retain=retain, wait_s=None)
        stop_processes(clients, timeout_s=30)
        logs = {p.stem: p.read_text() for p in tmp.glob("*.log")}
        assert aggregator.returncode == 0, logs["aggregator"][-3000:]
        assert [c.returncode for c in clients] == [0] * len(clients), "a client crashed or hung:\n" + "\n".join(
            logs[f"c{k}"][-2000:] for k in range(len(clients)))
        return {"summary": json.loads(summary_path.read_text()), "state": read_checkpoint(ckpt / LATEST).state,
                "order": order, "logs": logs}
    finally:
        if paused is not None:
            os.kill(victim.pid, signal.SIGCONT)
        stop_processes([aggregator, *clients])
        observer.close()
        attacker.close()


def _clean(tmp: Path, model: str, method: str) -> dict[str, Any]:
    """The same fleet without the attack, in memory (the bench's link, same data, one thread): the reference model
    at a fraction of the cost of a second fleet of processes."""
    tmp.mkdir()
    files, labels = write_client_data(tmp, SIZES)
    amole = TINY_AMOLE if "fedamole" in method else None
    config = write_config(tmp / "config.json", model, labels, {"dropout": False}, amole, fleet="clean", method=method,
                          rounds=2, min_clients=len(SIZES), quorum=1.0, max_message_bytes=MAX_MESSAGE_BYTES)
    settings = load_settings(config)
    broker = MemoryBroker()
    service = AggregatorService(settings.fleet, settings.task(labels), link=MemoryLink(broker, "aggregator"),
                                checkpoint_dir=tmp / "ckpt")
    engines = SharedEngine("eager", 1)
    for k, (tr, te) in enumerate(files):
        link = MemoryLink(broker, f"c{k}")
        client = EdgeClient(ClientOptions(broker="memory", client_id=f"c{k}", data=str(tr), test_data=str(te),
                                          fleet="clean", threads=1), link=link, engine_factory=engines)
        client.start()
        link.serve(client.handle)
    summary = service.run()
    return {"summary": summary, "state": read_checkpoint(tmp / "ckpt" / LATEST).state}


@pytest.mark.parametrize("method", ["fedit", "fedamole-a2"])
def test_hostile_corpus_changes_nothing(tmp_path: Path, mosquitto: str, tiny_model: str, method: str) -> None:
    clean = _clean(tmp_path / "clean", tiny_model, method)
    hostile = _run(tmp_path / "hostile", mosquitto, tiny_model, method, "hostile", attack=True)
    entries = {e["name"]: e for e in manifest() if e["plain_broker"]}
    # the model is the clean run's
    assert set(clean["state"]) == set(hostile["state"])
    for name, value in clean["state"].items():
        assert torch.allclose(value.double(), hostile["state"][name].double(), atol=1e-6, rtol=0), name
    rounds = hostile["summary"]["rounds"]
    assert [r["answered"] for r in rounds] == [["c0", "c1", "c2"]] * 2
    assert clean["summary"]["rejected"] == {}
    # every forged update and status reached the aggregator before the victim's real update (the victim was paused),
    # and it refused each one the manifest says it refuses: counted per reason, nothing else
    order = hostile["order"]
    assert "REAL" in order, "the victim's real update of the attacked round was not seen"
    aggregator_bound = {n for n, e in entries.items() if e["topic"].startswith(("update:", "status:"))}
    assert set(order[: order.index("REAL")]) == aggregator_bound
    rejected = hostile["summary"]["rejected"]
    stops = {n: e["stopped_by"] for n, e in entries.items() if e["expected"] == "rejected"}
    assert rejected.get("bounds", 0) == sum(1 for n, by in stops.items() if "bounds" in by and "samples" not in n)
    assert rejected.get("samples", 0) == sum(1 for n, by in stops.items() if "bounds" in by and "samples" in n)
    assert rejected.get("status", 0) == sum(1 for by in stops.values() if by.endswith("status check"))
    updates_refused = sum(1 for by in stops.values() if by.endswith("validate_update"))
    assert rejected.get("update", 0) in (updates_refused, updates_refused + 1)  # + the oversize one, if delivered
    assert set(rejected) <= {"bounds", "samples", "status", "update"}
    # every client refused the forged control messages meant for it (task/round: all; assign: the addressee)
    for k in range(len(SIZES)):
        client = f"c{k}"
        expect = sum(1 for e in entries.values() if e["expected"] == "rejected" and (
            e["topic"] in ("task", "round") or e["topic"] == f"assign:{'victim' if client == VICTIM else 'other'}"))
        seen = hostile["logs"][client].count("rejected ")
        assert seen >= expect, f"{client}: {seen} rejections logged, {expect} expected"
        assert "Traceback" not in hostile["logs"][client]
    print(f"{method}: {len(entries)} entries sent, {len(aggregator_bound)} to the aggregator, which rejected "
          f"{dict(rejected)}")


def test_out_of_bounds_message_types_cover_the_issue() -> None:
    """The issue's new kinds are in the corpus: huge finite values, huge num_samples, impersonation, replay, forged
    task, round, assign and done."""
    names = {e["name"] for e in manifest()}
    for needed in ("huge-finite-values", "huge-num-samples", "impersonation-huge-values", "replay-own-old-update",
                   "task-new-run", "round-garbage", "assign-wrong-run", "done-this-run"):
        assert needed in names



def test_acl_only_entries_are_not_delivered_by_the_secured_broker(secure_fleet: Any) -> None:
    """The entries an anonymous broker delivers (``acl-only``), published by an enrolled device on their topics
    through the ``edgemole broker init`` broker: nobody receives them, not even the observer that reads everything
    (tests/test_security.py checks the ACL itself in more detail)."""
    from test_security import _drain, _link

    fd = secure_fleet.fleet_dir
    topics = fd.topics
    observer = _link(fd, "observer")
    observer.subscribe(f"{topics.base}/#")
    mallory = _link(fd, "c3")
    time.sleep(0.5)
    aimed = [e for e in manifest() if e["expected"] == "acl-only"]
    assert aimed
    ctx = Context(topics, "fedit", "r" * 12, 2, "train", "c0", "c1", None, b"", b"", 30, MAX_MESSAGE_BYTES,
                  None)  # type: ignore[arg-type]  # topics only: the broker never looks at the payload
    for entry in aimed:
        mallory.publish(topic(ctx, entry), f"forged {entry['name']}".encode(), retain=bool(entry.get("retain")))
    assert _drain(observer, 1.5) == []
    mallory.publish(topics.update("c3"), b"own update")  # what the ACL allows still arrives
    assert [(t, p) for t, p, _ in _drain(observer, 1.5)] == [(topics.update("c3"), b"own update")]
    observer.close()
    mallory.close()
