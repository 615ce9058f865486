"""The native client's reliability against a scripted aggregator (edgemole.mqtt.MqttLink) through a real Mosquitto:
its update survives a kill -9 and restart of a broker without persistence (re-sent after its reconnect, and again
for the repeated assignment of the open round), an older round's assignment stays stale, a run that ends in failure
ends the device's run (a device service goes back online), and a round whose training diverges is answered with an
error status and no update."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_AMOLE, tiny_task, write_client_data
from native import OwnMosquitto, native_build

from edgemole.model import WireState, build_classifier
from edgemole.mqtt import RECONNECTED, Inbound, MqttLink
from edgemole.protocol import Kind, Message, Topics, decode, encode

pytestmark = pytest.mark.mosquitto

FLEET, RUN, CLIENT = "t", "run-r1", "c0"


def _assign(state: tuple[dict[str, torch.Tensor], dict[str, str]], rnd: int, scale: float = 1.0) -> bytes:
    tensors = {n: t * scale if scale != 1.0 else t for n, t in state[0].items()}
    return encode(Message(Kind.ASSIGN, FLEET, rnd, "train", CLIENT, {"run": RUN}, tensors, state[1]))


def _wait(link: MqttLink, match: Callable[[Inbound], bool], what: str, timeout_s: float = 60.0) -> Inbound:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        inbound = link.receive(min(left, 0.5))
        if inbound is not None and match(inbound):
            return inbound
    raise AssertionError(f"no {what} within {timeout_s} s")


def _wait_log(log: Path, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"the device never logged {text!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_the_update_survives_a_broker_restart_and_a_failed_run_ends_the_device(
        tmp_path: Path, tiny_model: str, tiny_artifacts: dict[str, Path]) -> None:
    task = tiny_task(tiny_model, "fedit", TINY_AMOLE)
    model, _ = build_classifier(task)
    state = WireState.of_model(model, task).initial_fleet_state()
    (train, test), = write_client_data(tmp_path, [30])[0]
    topics = Topics(FLEET)
    broker = OwnMosquitto(tmp_path)
    broker.start()
    agg = MqttLink(broker.url, topics.mqtt_client_id("aggregator"))
    log = tmp_path / "device.log"
    device = None
    try:
        agg.connect(10)
        agg.subscribe(topics.all_updates, topics.all_status)
        agg.publish(topics.task, encode(Message(Kind.TASK, FLEET, body={"run": RUN, "task": task.to_body()})),
                    retain=True)
        with open(log, "wb") as out:
            device = subprocess.Popen(
                [str(native_build() / "edgemole-device"), "--broker", broker.url, "--client-id", CLIENT, "--fleet",
                 FLEET, "--artifact", str(tiny_artifacts["lora"]), "--data", str(train), "--test-data", str(test),
                 "--threads", "1", "--keep-serving"], stdout=out, stderr=subprocess.STDOUT)

        def update_of(rnd: int) -> Callable[[Inbound], bool]:
            return lambda m: m.topic == topics.update(CLIENT) and decode(m.payload).round == rnd

        _wait(agg, lambda m: m.topic == topics.status(CLIENT) and decode(m.payload).body["state"] == "ready",
              "ready status")
        agg.publish(topics.assign(CLIENT), _assign(state, 1))
        first = _wait(agg, update_of(1), "update of round 1").payload

        # kill -9 and restart of a broker without persistence: sessions, subscriptions, retained task all gone
        broker.kill()
        broker.start()
        _wait(agg, lambda m: m.topic == RECONNECTED, "aggregator reconnect")
        # the device re-sends its kept update after its own reconnect (which may come before the aggregator
        # subscribed again, and be lost: so the aggregator re-sends the open round's assignment, as its service does)
        _wait_log(log, "round 1: sent the update again (reconnected to the broker)")
        agg.publish(topics.assign(CLIENT), _assign(state, 1))
        assert _wait(agg, update_of(1), "update of round 1, again").payload == first
        _wait_log(log, "round 1: sent the update again (the assignment of round 1 arrived again)")
        # the device's status is back on the new broker (its birth, re-published after reconnecting)
        with_status = MqttLink(broker.url, "observer-1")
        with_status.connect(10)
        with_status.subscribe(topics.status(CLIENT))
        assert decode(_wait(with_status, lambda m: m.retain, "retained status").payload).body["state"] == "ready"
        with_status.close()

        # the next round works; then round 1's assignment is stale: rejected, not answered
        agg.publish(topics.assign(CLIENT), _assign(state, 2))
        _wait(agg, update_of(2), "update of round 2")
        agg.publish(topics.assign(CLIENT), _assign(state, 1))
        _wait_log(log, "rejected assignment for round 1: stale assignment for round 1 (already past round 2)")

        # the run fails: its done says why, and the device's run ends as with a normal done (a service: back online)
        done = Message(Kind.ROUND, FLEET, 2, "done", body={"run": RUN, "failed": True,
                                                           "reason": "only 1 of 2 clients answered"})
        agg.publish(topics.round, encode(done), retain=True)
        online = _wait(agg, lambda m: m.topic == topics.status(CLIENT) and decode(m.payload).body["state"] == "online",
                       "online status after the failed run")
        assert "run" not in decode(online.payload).body
        assert "run run-r1 failed after round 2: 'only 1 of 2 clients answered'" in log.read_text()
        device.terminate()
        assert device.wait(30) == 0, log.read_text()
    finally:
        if device is not None and device.poll() is None:
            device.kill()
        agg.close()
        broker.stop()


def test_a_diverging_round_is_an_error_status_and_no_update(tmp_path: Path, tiny_model: str,
                                                            tiny_artifacts: dict[str, Path]) -> None:
    """Weights of 1e30 are finite (they pass every check of the assignment) but overflow in the forward pass."""
    task = tiny_task(tiny_model, "fedit", TINY_AMOLE)
    model, _ = build_classifier(task)
    state = WireState.of_model(model, task).initial_fleet_state()
    (train, test), = write_client_data(tmp_path, [30])[0]
    (tmp_path / "task.st").write_bytes(encode(Message(Kind.TASK, FLEET, body={"run": RUN, "task": task.to_body()})))
    (tmp_path / "assign.st").write_bytes(_assign(state, 1, scale=1e30))
    (tmp_path / "device.json").write_text(json.dumps({
        "client_id": CLIENT, "fleet": FLEET, "artifact": str(tiny_artifacts["lora"]), "data": str(train),
        "test_data": str(test)}))
    proc = subprocess.run(
        [str(native_build() / "edgemole-device"), "round", "--config", str(tmp_path / "device.json"), "--task",
         str(tmp_path / "task.st"), "--assign", str(tmp_path / "assign.st"), "--out", str(tmp_path / "update.st"),
         "--published", str(tmp_path / "published.jsonl")], capture_output=True, text=True, timeout=120, check=False)
    # nothing crashed: the round tool says no update was sent (exit 2), the service would keep serving
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: the client sent no update (rejected 0 message(s))"
    published = [json.loads(line) for line in (tmp_path / "published.jsonl").read_text().splitlines()]
    assert [p["kind"] for p in published] == ["status", "status"]
    error = published[-1]["body"]
    assert error["state"] == "error" and published[-1]["round"] == 1
    assert error["error"].startswith("round 1: non-finite ") and error["error"].endswith("; no update sent")
    assert not (tmp_path / "update.st").exists()
