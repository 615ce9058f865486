"""Exact resume: N rounds in one go equal k rounds, a crash, ``--resume`` and N - k more, for every method with state
beyond its tensors; checkpoints are atomic, few, and refused when they belong to another run set-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_AMOLE, write_client_data, write_config

import aggregator.service as service_module
from aggregator.checkpoint import LATEST, load_for_resume, read_checkpoint, save_checkpoint
from aggregator.service import AggregatorService
from edge_client.client import ClientOptions, EdgeClient
from edgemole.config import load_settings
from edgemole.errors import EdgemoleError
from edgemole.protocol import DONE, Kind, Topics, decode
from fleet.bench import SharedEngine
from fleet.memory_link import MemoryBroker, MemoryLink

ROUNDS = 4


class Crash(BaseException):
    """Stands for kill -9: not an Exception, so the service announces nothing on its way out."""


def _settings(tmp: Path, model: str, method: str, **fleet: Any):  # noqa: ANN202
    files, labels = write_client_data(tmp, [24, 30, 36, 28])
    amole = TINY_AMOLE if "fedamole" in method else None
    config = write_config(tmp / f"{method}.json", model, labels, {"dropout": False, "local_steps": 2}, amole,
                          method=method, rounds=ROUNDS, min_clients=4, quorum=1.0, clients_per_round=0.75,
                          **fleet)
    settings = load_settings(config)
    return settings, settings.task(labels), files


def _fleet(tmp: Path, model: str, method: str, ckpt: Path, *, resume: bool = False, crash_after: int | None = None,
           monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[AggregatorService, list[bytes]]:
    """One in-memory fleet (the bench's link); crashes right after checkpointing round ``crash_after``."""
    settings, task, files = _settings(tmp, model, method)
    topics = Topics(settings.fleet.fleet, settings.fleet.topic_prefix)
    broker = MemoryBroker()
    service = AggregatorService(settings.fleet, task, link=MemoryLink(broker, "aggregator"), checkpoint_dir=ckpt,
                                resume=resume, keep_checkpoints=2)
    engines = SharedEngine("eager", 1)
    for k, (train, test) in enumerate(files):
        opts = ClientOptions(broker="memory", client_id=f"c{k}", data=str(train), test_data=str(test), fleet="t",
                             threads=1, eval_after_training=False)
        link = MemoryLink(broker, topics.device_mqtt_id(f"c{k}"))
        client = EdgeClient(opts, link=link, engine_factory=engines)
        client.start()
        link.serve(client.handle)
    rounds: list[bytes] = []
    watch = MemoryLink(broker, "watch")
    watch.connect()
    watch.subscribe(topics.round)
    watch.serve(lambda inbound: rounds.append(inbound.payload))
    if crash_after is not None and monkeypatch is not None:
        save = service_module.save_checkpoint

        def save_then_crash(*args: Any, **kwargs: Any) -> Path:
            path = save(*args, **kwargs)
            if kwargs["round_"] == crash_after:
                raise Crash
            return path

        monkeypatch.setattr(service_module, "save_checkpoint", save_then_crash)
    try:
        service.run()
    except Crash:
        pass
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()
    return service, rounds


@pytest.mark.parametrize("method", ["fedit", "lora-a2", "fedamole", "fedamole-a2"])
def test_resumed_run_ends_with_the_uninterrupted_runs_model(tmp_path: Path, tiny_model: str, method: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    whole, _ = _fleet(tmp_path, tiny_model, method, tmp_path / "whole")
    crashed, rounds = _fleet(tmp_path, tiny_model, method, tmp_path / "split", crash_after=2,
                             monkeypatch=monkeypatch)
    assert not any(decode(p).phase == DONE for p in rounds if p), "a crash must not announce done"
    resumed, _ = _fleet(tmp_path, tiny_model, method, tmp_path / "split", resume=True)
    assert resumed.run_id == crashed.run_id  # devices of the interrupted round can still answer it
    a, b = read_checkpoint(tmp_path / "whole" / LATEST), read_checkpoint(tmp_path / "split" / LATEST)
    assert a.round == b.round == ROUNDS and set(a.state) == set(b.state)
    for name, value in a.state.items():
        assert torch.allclose(value.double(), b.state[name].double(), atol=1e-6, rtol=0), name
    assert json.dumps(a.strategy_extra, sort_keys=True) == json.dumps(b.strategy_extra, sort_keys=True)
    # the summary is whole: every round's record, the same selections and, for FedAMoLE, the same expert sets
    whole_rounds, resumed_rounds = whole.records, resumed.records
    assert [r["round"] for r in resumed_rounds] == [1, 2, 3, 4, 5]
    for x, y in zip(whole_rounds, resumed_rounds, strict=True):
        assert x["selected"] == y["selected"] and x.get("experts") == y.get("experts")
        assert x["accuracy_before"] == pytest.approx(y["accuracy_before"], abs=1e-9)
    # K = 2 round files besides latest, and no temporary file left
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == [
        LATEST, "round-000003.safetensors", "round-000004.safetensors"]


def test_resume_refuses_missing_and_foreign_checkpoints(tmp_path: Path, tiny_model: str) -> None:
    settings, task, _ = _settings(tmp_path, tiny_model, "fedit")
    empty = tmp_path / "empty"
    with pytest.raises(EdgemoleError, match="no checkpoint in"):
        AggregatorService(settings.fleet, task, link=MemoryLink(MemoryBroker(), "a"), checkpoint_dir=empty,
                          resume=True)._build_strategy()
    with pytest.raises(EdgemoleError, match="needs --checkpoint-dir"):
        AggregatorService(settings.fleet, task, link=MemoryLink(MemoryBroker(), "a"), resume=True)
    service = AggregatorService(settings.fleet, task, link=MemoryLink(MemoryBroker(), "a"), checkpoint_dir=empty)
    strategy, _ = service._build_strategy()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, strategy.state_dict(), method="fedit", run="r1", round_=1, identity=service.identity())
    assert load_for_resume(ckpt, method="fedit", identity=service.identity()).run == "r1"
    other = {**service.identity()}
    for key, value, needle in (("fleet", "other", "another fleet"), ("model", "m", "another model"),
                               ("task", "0" * 16, "another task")):
        with pytest.raises(EdgemoleError, match=needle) as info:
            load_for_resume(ckpt, method="fedit", identity={**other, key: value})
        assert "\n" not in str(info.value)
    with pytest.raises(EdgemoleError, match="method 'fedit', not 'lora-a2'"):
        load_for_resume(ckpt, method="lora-a2", identity=other)
    # another task (here: other labels) is another hash
    _, task2, _ = _settings(tmp_path, tiny_model, "fedit")
    task2.labels = task2.labels[:-1]
    assert AggregatorService(settings.fleet, task2, link=MemoryLink(MemoryBroker(), "a")).identity()["task"] != \
        service.identity()["task"]


def test_checkpoints_are_atomic_and_stale_temporaries_are_removed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    (tmp_path / ".ckpt-abc.tmp").write_bytes(b"\0" * 1000)  # what a kill during a write leaves
    (tmp_path / f".{LATEST}.tmp").write_bytes(b"\0" * 1000)  # the old code's temporary name
    from aggregator.checkpoint import remove_stale_temporaries
    assert remove_stale_temporaries(tmp_path) == 2
    for rnd in range(1, 6):
        save_checkpoint(tmp_path, {"w": state["w"] + rnd}, method="fedit", run="r", round_=rnd, keep=3,
                        strategy_extra={"x": rnd}, service={"records": [{"round": rnd}]})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        LATEST, "round-000003.safetensors", "round-000004.safetensors", "round-000005.safetensors"]
    latest = read_checkpoint(tmp_path / LATEST)
    assert latest.round == 5 and latest.strategy_extra == {"x": 5} and torch.equal(latest.state["w"], state["w"] + 5)
    # a write that dies before its rename leaves the previous checkpoint whole and no temporary file
    import aggregator.checkpoint as ckpt_module

    def dying_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(ckpt_module.os, "replace", dying_replace)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, state, method="fedit", run="r", round_=6)
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / LATEST).round == 5
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_run_announces_done_with_its_reason_and_devices_go_idle(tmp_path: Path, tiny_model: str) -> None:
    settings, task, files = _settings(tmp_path, tiny_model, "fedit", wait_clients_s=0.5)
    broker = MemoryBroker()
    topics = Topics("t")
    service = AggregatorService(settings.fleet, task, link=MemoryLink(broker, "aggregator"))
    devices = []
    for k, keep_serving in enumerate((False, True)):  # a one-shot device and a device service
        opts = ClientOptions(broker="memory", client_id=f"c{k}", data=str(files[k][0]), test_data=str(files[k][1]),
                             fleet="t", threads=1, keep_serving=keep_serving)
        link = MemoryLink(broker, topics.device_mqtt_id(f"c{k}"))
        client = EdgeClient(opts, link=link, engine_factory=SharedEngine("eager", 1))
        client.start()
        link.serve(client.handle)
        devices.append((client, link))
    with pytest.raises(EdgemoleError, match="only 2 of the required 4 clients"):
        service.run()
    done = decode(broker.retained[topics.round])
    assert done.kind == Kind.ROUND and done.phase == DONE and done.body["run"] == service.run_id
    assert done.body["failed"] is True and "only 2 of the required 4" in done.body["reason"]
    for client, link in devices:  # the devices read the announcement
        while link.inbox:
            client.handle(link.inbox.popleft())
    (once, _), (service_device, _) = devices
    assert once._stop and not service_device._stop
    assert service_device.run_id is None
    assert decode(broker.retained[topics.status("c1")]).body["state"] == "online"


def test_device_keeps_its_update_and_sends_it_again_when_asked_or_reconnected(tmp_path: Path,
                                                                              tiny_model: str) -> None:
    from edgemole.mqtt import RECONNECTED, Inbound
    from edgemole.protocol import Message, encode

    settings, task, files = _settings(tmp_path, tiny_model, "fedit")
    broker, topics = MemoryBroker(), Topics("t")
    service = AggregatorService(settings.fleet, task, link=MemoryLink(broker, "aggregator"))
    strategy, _ = service._build_strategy()
    agg = service.link
    agg.connect()
    agg.subscribe(topics.all_updates)
    agg.publish(topics.task, encode(Message(Kind.TASK, "t", body={"run": service.run_id, "task": task.to_body()})),
                retain=True)
    opts = ClientOptions(broker="memory", client_id="c0", data=str(files[0][0]), test_data=str(files[0][1]),
                         fleet="t", threads=1)
    link = MemoryLink(broker, topics.device_mqtt_id("c0"))
    client = EdgeClient(opts, link=link, engine_factory=SharedEngine("eager", 1))
    client.start()
    link.serve(client.handle)

    def assign(rnd: int) -> None:
        plan = strategy.configure_train(rnd, ["c0"])
        service._announce(rnd, plan.phase, ["c0"], 60.0, {})
        a = plan.assignments["c0"]
        agg.publish(topics.assign("c0"), encode(Message(Kind.ASSIGN, "t", rnd, plan.phase, "c0",
                                                        {"run": service.run_id, **a.body}, a.tensors,
                                                        {k: strategy.roles[k] for k in a.tensors})))

    def updates() -> list[bytes]:
        got = []
        while (inbound := agg.receive(0.0)) is not None:
            got.append(inbound.payload)
        return got

    assign(1)
    first = updates()
    assert len(first) == 1 and decode(first[0]).round == 1
    assign(1)  # the same round's assignment again (a re-send): the kept update, not a rejection or new training
    assert updates() == first and client.rejected == 0
    link.deliver(Inbound(RECONNECTED, b"", False))  # the connection came back while round 1 is open
    assert updates() == first
    service._announce(2, "train", ["c0"], 60.0, {})  # round 1 closed: nothing to re-send any more
    link.deliver(Inbound(RECONNECTED, b"", False))
    assert updates() == []


def test_aggregator_resends_on_ready_and_on_reconnect_and_drops_duplicates(tmp_path: Path, tiny_model: str) -> None:
    from edgemole.mqtt import RECONNECTED, Inbound

    settings, task, files = _settings(tmp_path, tiny_model, "fedit")
    settings.fleet.rounds, settings.fleet.min_clients, settings.fleet.clients_per_round = 1, 1, 1.0
    broker, topics = MemoryBroker(), Topics("t")
    agg = MemoryLink(broker, "aggregator")
    service = AggregatorService(settings.fleet, task, link=agg)
    opts = ClientOptions(broker="memory", client_id="c0", data=str(files[0][0]), test_data=str(files[0][1]),
                         fleet="t", threads=1)
    link = MemoryLink(broker, topics.device_mqtt_id("c0"))
    client = EdgeClient(opts, link=link, engine_factory=SharedEngine("eager", 1))
    client.start()
    seen: list[tuple[str, int]] = []
    watch = MemoryLink(broker, "watch")
    watch.connect()
    watch.subscribe(topics.task, topics.round)
    watch.serve(lambda inbound: seen.append((inbound.topic, decode(inbound.payload).round)))
    assigns: list[int] = []

    def device(inbound: Inbound) -> None:
        if inbound.topic != topics.assign("c0"):
            client.handle(inbound)
            return
        assigns.append(decode(inbound.payload).round)
        if len(assigns) == 1:  # lost in a restart: the device comes back and says it is ready
            link.publish(topics.status("c0"), client._status_payload("ready"), retain=True)
        elif len(assigns) == 2:  # lost again: the aggregator's connection drops and comes back
            agg.deliver(Inbound(RECONNECTED, b"", False))
        else:  # answered, and the answer sent twice (a re-send after a reconnect)
            client.handle(inbound)
            assert client.kept is not None
            link.publish(topics.update("c0"), client.kept[2])

    link.serve(device)
    summary = service.run()
    assert assigns[:3] == [1, 1, 1] and summary["rounds"][0]["answered"] == ["c0"]
    assert seen.count((topics.task, 0)) == 2 and seen.count((topics.round, 1)) == 2  # re-published on reconnect
    # the training round's copy is dropped as a duplicate; the evaluation's copy may arrive after the run closed
    # (a round closes as soon as its last update is in)
    assert summary["duplicates"] >= 1 and summary["rejected"] == {}
