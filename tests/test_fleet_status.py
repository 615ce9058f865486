"""``edgemole fleet status`` through a real Mosquitto with real Python and native client processes, and the status
fields it shows (``time_unix``, ``artifact``: docs/protocol.md 4.2) as the clients write them and the aggregator
checks them."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, spawn, write_client_data
from native import native_build

from aggregator.service import AggregatorService
from edge_client.client import ClientOptions, EdgeClient
from edgemole.broker import free_port
from edgemole.config import FleetConfig, TaskSpec
from edgemole.errors import ProtocolError
from edgemole.mqtt import Inbound, MqttLink
from edgemole.protocol import Kind, Message, Topics, decode, encode
from edgemole.protocol.validate import check_status_fields
from fleet.memory_link import RecordingLink
from fleet.simulate import stop_processes
from fleet.status import age_text, collect, fleet_status

FLEET = "t"
TOPICS = Topics(FLEET)
DIGEST = "0123456789abcdef"


def _manifest_digest(artifact: Path) -> str:
    return hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()[:16]


def _status(sender: str, **body: object) -> bytes:
    return encode(Message(Kind.STATUS, FLEET, 0, client=sender,
                          body={"state": "online", "num_train": 3, "num_test": 1, "engine": "eager", **body}))


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet", "fleet", "status", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)


# -- the fields, without a broker ------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [{"time_unix": "yesterday"}, {"time_unix": True}, {"time_unix": None},
                                  {"time_unix": [1.0]}, {"time_unix": 10**400}, {"artifact": DIGEST.upper()},
                                  {"artifact": DIGEST[:15]}, {"artifact": DIGEST + "0"}, {"artifact": "g" * 16},
                                  {"artifact": 123}, {"artifact": None}])
def test_malformed_time_or_artifact_is_rejected_by_the_aggregator(body: dict) -> None:
    service = AggregatorService(FleetConfig(fleet=FLEET), TaskSpec(labels=["a", "b"], method="fedit"),
                                link=RecordingLink())  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=next(iter(body))):
        check_status_fields(body)
    service._handle(Inbound(TOPICS.status("c0"), _status("c0", **body), True))
    assert service.rejected["status"] == 1 and "c0" not in service.status
    service._handle(Inbound(TOPICS.status("c1"), _status("c1", time_unix=1.7e9, artifact=DIGEST), True))
    service._handle(Inbound(TOPICS.status("c2"), _status("c2", time_unix=1_700_000_000), True))
    service._handle(Inbound(TOPICS.status("c3"), _status("c3"), True))  # both optional
    assert service.rejected["status"] == 1 and set(service.status) == {"c1", "c2", "c3"}
    assert service.status["c1"]["artifact"] == DIGEST


def test_python_client_status_has_its_clock_and_artifact(tmp_path: Path, tiny_artifacts: dict[str, Path]) -> None:
    """``time_unix`` in every status but the last will; ``artifact`` with the ExecuTorch engine only."""
    (train, test), = write_client_data(tmp_path, [12])[0]
    for engine, artifact in (("eager", None), ("executorch", tiny_artifacts["lora"])):
        opts = ClientOptions(broker="mqtt://127.0.0.1:1", client_id="c0", data=str(train), test_data=str(test),
                             fleet=FLEET, engine=engine, artifact=artifact)
        client = EdgeClient(opts, link=RecordingLink())
        before = time.time()
        body = decode(client._status_payload("online")).body
        assert before - 1 <= body["time_unix"] <= time.time() + 1
        assert body.get("artifact") == (_manifest_digest(artifact) if artifact else None)
        check_status_fields(body)
        will = decode(client._status_payload("offline", will=True)).body
        assert "time_unix" not in will and will["state"] == "offline"


def test_collect_keeps_valid_devices_and_counts_the_rest() -> None:
    now = 1_700_000_100.0
    newest = {
        TOPICS.status("b"): _status("b", time_unix=now - 12.04, artifact=DIGEST, client="native",
                                    engine="executorch", run="r1"),
        TOPICS.status("a"): encode(Message(Kind.STATUS, FLEET, 4, client="a", body={"state": "offline"})),
        TOPICS.status("c"): b"",  # a cleared retained status: neither a device nor a rejection
        TOPICS.status("x"): b"garbage",
        TOPICS.status("y"): _status("z"),
        TOPICS.status("w"): _status("w", state="sleeping"),
        TOPICS.status("v"): _status("v", artifact="nope"),
        TOPICS.status("u"): encode(Message(Kind.UPDATE, FLEET, 1, client="u", body={"state": "ready"})),
        TOPICS.status("f"): encode(Message(Kind.STATUS, "other", 0, client="f", body={"state": "ready"})),
        f"{TOPICS.base}/clients/bad name/status": _status("bad name"),
    }
    devices = collect(TOPICS, newest, now)
    assert [d["client"] for d in devices] == ["a", "b"]
    a, b = devices
    assert a == {"client": "a", "state": "offline", "last_seen_unix": None, "age_s": None, "kind": "python",
                 "engine": None, "artifact": None, "round": 4, "run": None, "num_train": None, "num_test": None,
                 "error": None}
    assert b["kind"] == "native" and b["engine"] == "executorch" and b["artifact"] == DIGEST and b["age_s"] == 12.0
    assert b["run"] == "r1" and b["num_train"] == 3 and b["num_test"] == 1 and b["round"] == 0
    assert sorted(r["client"] or "" for r in devices.rejected) == ["", "f", "u", "v", "w", "x", "y"]
    assert all(r["reason"] for r in devices.rejected)
    assert devices.base == "edgemole/t"
    assert [age_text(s) for s in (None, 0.4, 12.0, 125, 7300, 200000, -30)] == [
        "-", "0 s ago", "12 s ago", "2 min ago", "2 h ago", "2 d ago", "30 s ahead of this clock"]


# -- through Mosquitto -----------------------------------------------------------------------------------------------
def _wait_for(broker: str, want: dict[str, str], timeout_s: float = 120, logs: tuple[Path, ...] = ()) -> list[dict]:
    """Poll the broker (in this process) until every device of ``want`` reports its state."""
    deadline = time.monotonic() + timeout_s
    while True:
        devices = fleet_status(broker, FLEET, wait_s=0.5)
        states = {d["client"]: d["state"] for d in devices}
        if all(states.get(c) == s for c, s in want.items()):
            return devices
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.exists())
            pytest.fail(f"devices {states}, expected {want}\n{tails}")
        time.sleep(0.5)


@pytest.mark.mosquitto
@pytest.mark.slow
def test_fleet_status_of_python_and_native_clients(tmp_path: Path, mosquitto: str,
                                                   tiny_artifacts: dict[str, Path]) -> None:
    device = native_build() / "edgemole-device"
    artifact = tiny_artifacts["lora"]
    digest = _manifest_digest(artifact)
    (py_train, py_test), (et_train, et_test), (nat_train, nat_test) = write_client_data(tmp_path, [20, 22, 24])[0]
    logs = (tmp_path / "py-0.log", tmp_path / "py-et.log", tmp_path / "nat-0.log")
    common = ["--broker", mosquitto, "--fleet", FLEET, "--threads", "1"]
    procs = [spawn(["client", "--client-id", "py-0", "--data", str(py_train), "--test-data", str(py_test), *common],
                   logs[0]),
             spawn(["client", "--client-id", "py-et", "--data", str(et_train), "--test-data", str(et_test),
                    "--engine", "executorch", "--artifact", str(artifact), *common], logs[1])]
    with open(logs[2], "ab") as out:
        procs.append(subprocess.Popen([str(device), "--client-id", "nat-0", "--artifact", str(artifact), "--data",
                                       str(nat_train), "--test-data", str(nat_test), *common],
                                      stdout=out, stderr=subprocess.STDOUT))
    spy = MqttLink(mosquitto, "spy", clean_session=True)
    spy.connect(10)
    try:
        # what a broken or hostile publisher leaves behind: neither is a device, both are counted
        spy.publish(TOPICS.status("x"), b"not a safetensors message", retain=True)
        spy.publish(TOPICS.status("y"), _status("z"), retain=True)
        _wait_for(mosquitto, {"py-0": "online", "py-et": "online", "nat-0": "online"}, logs=logs)
        started = time.time()
        proc = _cli("--broker", mosquitto, "--fleet", FLEET, "--json", "--wait", "1")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["fleet"] == FLEET
        devices = {d["client"]: d for d in out["devices"]}
        assert list(devices) == ["nat-0", "py-0", "py-et"]  # sorted; x and y are not devices
        assert proc.stderr.count("rejected the status on") == 2, proc.stderr
        assert f"{TOPICS.base}/clients/x/status" in proc.stderr and "does not match topic client" in proc.stderr
        assert sorted(r["topic"].rsplit("/", 2)[1] for r in out["rejected"]) == ["x", "y"]
        for name, kind, engine, art in (("nat-0", "native", "executorch", digest), ("py-0", "python", "eager", None),
                                        ("py-et", "python", "executorch", digest)):
            d = devices[name]
            assert (d["state"], d["kind"], d["engine"], d["artifact"], d["round"]) == ("online", kind, engine, art, 0)
            assert started - 300 < d["last_seen_unix"] <= time.time() + 1, d  # published during this test
            assert 0 <= d["age_s"] < 300 + 1
            assert d["run"] is None and d["error"] is None and d["num_train"] > 0 and d["num_test"] == 20

        table = _cli("--broker", mosquitto, "--fleet", FLEET, "--wait", "1")
        assert table.returncode == 0, table.stderr
        assert all(name in table.stdout for name in devices), table.stdout
        assert "online" in table.stdout and "native/executorch" in table.stdout and digest[:8] in table.stdout
        assert "2 status message(s) rejected" in table.stdout and f"{TOPICS.base}/clients/y/status" in table.stdout

        # a clean stop publishes offline with the device's clock; a killed device leaves its last will (no clock)
        procs[0].send_signal(signal.SIGTERM)
        procs[2].kill()
        assert procs[0].wait(60) == 0
        procs[2].wait(10)
        devices = {d["client"]: d for d in _wait_for(mosquitto, {"py-0": "offline", "nat-0": "offline",
                                                                 "py-et": "online"}, logs=logs)}
        assert devices["py-0"]["last_seen_unix"] is not None
        assert devices["nat-0"]["last_seen_unix"] is None and devices["nat-0"]["age_s"] is None
        assert devices["nat-0"]["artifact"] == digest and devices["nat-0"]["kind"] == "native"
        proc = _cli("--broker", mosquitto, "--fleet", FLEET, "--json", "--wait", "1")
        assert {d["client"]: d["state"] for d in json.loads(proc.stdout)["devices"]} == {
            "nat-0": "offline", "py-0": "offline", "py-et": "online"}
    finally:
        stop_processes(procs)
        spy.close()


@pytest.mark.mosquitto
def test_an_empty_fleet_and_the_observer_publishes_nothing(tmp_path: Path, mosquitto: str) -> None:
    spy = MqttLink(mosquitto, "spy", clean_session=True)
    spy.connect(10)
    spy.subscribe("#")
    try:
        proc = _cli("--broker", mosquitto, "--fleet", FLEET, "--wait", "0.5")
        assert proc.returncode == 0, proc.stderr
        assert "no device has published a status on edgemole/t" in proc.stdout
        proc = _cli("--broker", mosquitto, "--fleet", FLEET, "--topic-prefix", "site1/em", "--json", "--wait", "0.5")
        assert json.loads(proc.stdout) == {"fleet": FLEET, "devices": [], "rejected": []}
        assert spy.receive(1.0) is None  # no status, no will, nothing retained
    finally:
        spy.close()
    late = MqttLink(mosquitto, "late", clean_session=True)
    late.connect(10)
    late.subscribe("#")
    try:
        assert late.receive(1.0) is None
    finally:
        late.close()
    # both observers said goodbye (DISCONNECT) rather than dropping the connection ("closed its connection")
    log = (tmp_path / "mosquitto.log").read_text()
    assert len(re.findall(r"Client edgemole:t:observer:status:\d+ disconnected\.", log)) == 2, log
    assert not re.search(r"observer:status:\d+ closed its connection", log), log  # (<unknown>: the port probe)


def test_an_unreachable_broker_is_one_error_line() -> None:
    started = time.monotonic()
    proc = _cli("--broker", f"mqtt://127.0.0.1:{free_port()}", "--fleet", FLEET, "--connect-timeout", "2")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach MQTT broker at mqtt://127.0.0.1:"), lines
    assert proc.stdout == ""
    assert time.monotonic() - started < 30  # the interpreter's start included
