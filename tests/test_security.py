"""TLS, per-identity credentials and topic ACLs through a real Mosquitto with the `edgemole broker init` set-up."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, spawn, tiny_task, write_client_data, write_config

from edgemole.errors import BrokerError, ConfigError
from edgemole.mqtt import BrokerCredentials, MqttLink
from edgemole.protocol import Kind, Message, decode, encode
from edgemole.security import FleetDir, add_device, init_broker_dir, mosquitto_password_hash, revoke_device
from edgemole.security.run import SecureMosquitto
from fleet.simulate import credential_flags, stop_processes


def _link(fd: FleetDir, name: str, *, password: bool = False, **kw: object) -> MqttLink:
    link = MqttLink(fd.url(password=password), "ignored", clean_session=True, credentials=fd.credentials(
        name, password=password), identity=name, **kw)
    link.connect(10)
    return link


def _drain(link: MqttLink, wait_s: float) -> list[tuple[str, bytes, bool]]:
    out, deadline = [], time.monotonic() + wait_s
    while (m := link.receive(max(0.0, deadline - time.monotonic()))) is not None:
        out.append((m.topic, m.payload, m.retain))
    return out


def test_broker_init_writes_private_files_and_refuses_what_it_must(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    fd = init_broker_dir(d, "f", ["pi-01", "pi-02"], host="broker.lan", port=18883, password_port=18884)
    for secret in ("ca/ca.key", "broker/server.key", "devices/pi-01/client.key", "devices/pi-01/password",
                   "aggregator/client.key", "observer/password", "broker/passwd"):
        assert stat.S_IMODE((d / secret).stat().st_mode) == 0o600, secret
    env = (d / "devices/pi-01/client.env").read_text()
    assert "EDGEMOLE_BROKER=mqtts://broker.lan:18883" in env
    assert "EDGEMOLE_MQTT_CERT_FILE=/etc/edgemole/pi-01/client.crt" in env
    device = json.loads((d / "devices/pi-02/device.json").read_text())
    assert device["broker"] == "mqtts://broker.lan:18883" and device["key_file"] == "/etc/edgemole/pi-02/client.key"
    conf = (d / "broker/mosquitto.conf").read_text()
    for line in ("allow_anonymous false", "use_identity_as_username true", "use_username_as_clientid true",
                 "persistence true", "require_certificate true", f"crlfile {fd.broker_dir}/crl.pem",
                 "listener 18883", "listener 18884", f"max_packet_size {16 * 2**20 + 64 * 1024}"):
        assert line in conf.splitlines(), line
    assert "listener 1883" not in conf and "allow_anonymous true" not in conf
    acl = (d / "broker/acl").read_text()
    assert "user pi-01\ntopic read edgemole/f/task\n" in acl and "topic write edgemole/f/clients/pi-01/update" in acl
    assert [ln.split(":")[0] for ln in (d / "broker/passwd").read_text().splitlines()] == \
        ["aggregator", "observer", "pi-01", "pi-02"]
    # the mosquitto_passwd format, reproducible from a known salt
    assert mosquitto_password_hash("secret", salt=b"\0" * 12).startswith("$7$101$AAAAAAAAAAAAAAAA$")
    assert BrokerCredentials(cert_file=str(d / "devices/pi-02/client.crt")).credential_name() == "pi-02"
    with pytest.raises(ConfigError, match="not empty"):
        init_broker_dir(d, "f", ["pi-01"])
    for bad in ("aggregator", "observer", "a/b", "+", ""):
        with pytest.raises(ConfigError):
            add_device(d, bad)
    with pytest.raises(ConfigError, match="already exists"):
        add_device(d, "pi-01")
    add_device(d, "pi-03")
    revoke_device(d, "pi-01")
    fd = FleetDir.load(d)
    assert fd.devices == ["pi-02", "pi-03"] and (d / "revoked/pi-01/client.crt").exists()
    assert "pi-01" not in (d / "broker/acl").read_text() and "pi-01:" not in (d / "broker/passwd").read_text()
    # through the CLI: one line, exit 2 for a second init; --force replaces the CA
    cli = [sys.executable, "-m", "fleet", "broker", "init", str(d), "--fleet", "f", "--devices", "x1"]
    run = subprocess.run(cli, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), run.stderr
    run = subprocess.run([*cli, "--force"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert FleetDir.load(d).devices == ["x1"] and not (d / "revoked").exists()


def test_connections_without_valid_credentials_are_refused(secure_fleet: SecureMosquitto, tmp_path: Path) -> None:
    fd = secure_fleet.fleet_dir
    ca = str(fd.path / "ca" / "ca.crt")
    other = init_broker_dir(tmp_path / "other", "t", ["c0"], device_root=None)  # another fleet's CA
    foreign = BrokerCredentials(ca_file=ca, cert_file=str(other.path / "devices/c0/client.crt"),
                                key_file=str(other.path / "devices/c0/client.key"))
    attempts = {
        "no certificate": (fd.url(), BrokerCredentials(ca_file=ca)),
        "certificate of another CA": (fd.url(), foreign),
        "wrong password": (fd.url(password=True), BrokerCredentials(ca_file=ca, username="c1", password="guess")),
        "no password": (fd.url(password=True), BrokerCredentials(ca_file=ca, username="c1")),
        "server not trusted": (fd.url(), other.credentials("c0")),
    }
    for what, (url, creds) in attempts.items():
        with pytest.raises(BrokerError):
            MqttLink(url, "x", clean_session=True, credentials=creds).connect(8)
            pytest.fail(f"connected with {what}")
    # a plain MQTT connection to a TLS listener never gets a CONNACK
    with pytest.raises(BrokerError):
        MqttLink(fd.url().replace("mqtts", "mqtt"), "x", clean_session=True).connect(3)
    # the valid identities connect, and the broker uses the identity as the client id
    for name, password in (("c1", False), ("c1", True), ("aggregator", False)):
        link = _link(fd, name, password=password)
        assert link.client_id == name
        link.close()
    # a revoked device: certificate in the CRL (read at broker start), password and ACL entries gone
    revoke_device(fd.path, "c1")
    secure_fleet.restart()
    revoked = FleetDir.load(fd.path).path / "revoked" / "c1"
    for url, creds in ((fd.url(), BrokerCredentials(ca_file=ca, cert_file=str(revoked / "client.crt"),
                                                    key_file=str(revoked / "client.key"))),
                       (fd.url(password=True), BrokerCredentials.resolve(ca_file=ca, username="c1", env={},
                                                                         password_file=str(revoked / "password")))):
        with pytest.raises(BrokerError):
            MqttLink(url, "x", clean_session=True, credentials=creds).connect(8)
    _link(fd, "c2").close()  # the other devices are unaffected


def test_acl_confines_each_device_to_its_own_topics(secure_fleet: SecureMosquitto) -> None:
    fd = secure_fleet.fleet_dir
    topics = fd.topics
    observer = _link(fd, "observer")
    observer.subscribe(f"{topics.base}/#")
    aggregator = _link(fd, "aggregator")
    aggregator.subscribe(topics.all_status, topics.all_updates)
    mallory = _link(fd, "c0")  # a device that tries everything with its own valid identity
    victim = _link(fd, "c1", password=True)
    victim.subscribe(topics.assign("c1"), topics.round, topics.task)
    mallory.subscribe(topics.assign("c1"), topics.all_updates, topics.all_status)  # other devices' topics
    time.sleep(0.5)

    def forged(kind: Kind, client: str = "", phase: str = "") -> bytes:
        return encode(Message(kind, "t", 1, phase, client, {"run": "r" * 12}))

    for topic, payload in ((topics.update("c1"), forged(Kind.UPDATE, "c1")),
                           (topics.status("c1"), forged(Kind.STATUS, "c1")),
                           (topics.task, forged(Kind.TASK)),
                           (topics.round, forged(Kind.ROUND, phase="train")),
                           (topics.round, forged(Kind.ROUND, phase="done")),
                           (topics.assign("c1"), forged(Kind.ASSIGN, "c1")),
                           (topics.metrics, forged(Kind.METRICS)),
                           (f"{topics.base}/clients/c0/assign", forged(Kind.ASSIGN, "c0"))):
        mallory.publish(topic, payload, retain=True)
    assert _drain(observer, 1.5) == [] and _drain(aggregator, 0.1) == [] and _drain(victim, 0.1) == []
    # nothing forged was retained either: a device that connects now reads no task, round or metrics
    late = _link(fd, "c2")
    late.subscribe(topics.task, topics.round, topics.metrics)
    assert _drain(late, 1.0) == []
    late.close()
    # what the ACL allows arrives: the device's own update and status, the aggregator's assignment for c1 only
    mallory.publish(topics.update("c0"), b"own update")
    mallory.publish(topics.status("c0"), b"own status")
    aggregator.publish(topics.assign("c1"), b"for c1")
    aggregator.publish(topics.round, b"round", retain=True)
    seen = {(t, p) for t, p, _ in _drain(observer, 1.5)}
    assert seen == {(topics.update("c0"), b"own update"), (topics.status("c0"), b"own status"),
                    (topics.assign("c1"), b"for c1"), (topics.round, b"round")}
    assert {(t, p) for t, p, _ in _drain(aggregator, 0.1)} == {(topics.update("c0"), b"own update"),
                                                               (topics.status("c0"), b"own status")}
    assert {(t, p) for t, p, _ in _drain(victim, 0.1)} == {(topics.assign("c1"), b"for c1"), (topics.round, b"round")}
    assert _drain(mallory, 0.1) == []  # never another device's assignment, update or status
    # the observer reads everything and writes nothing
    observer.publish(topics.round, forged(Kind.ROUND, phase="done"))
    assert _drain(victim, 1.0) == []
    for link in (observer, aggregator, mallory, victim):
        link.close()


def test_a_role_whose_id_differs_from_its_credential_exits_2(secure_fleet: SecureMosquitto, tmp_path: Path,
                                                             tiny_model: str) -> None:
    from aggregator.service import AggregatorService
    from edgemole.config import FleetConfig

    fd = secure_fleet.fleet_dir
    files, _ = write_client_data(tmp_path, [10])
    log = tmp_path / "client.log"
    proc = spawn(["client", "--broker", fd.url(), "--client-id", "c1", "--data", str(files[0][0]), "--fleet", "t",
                  *credential_flags(fd.credentials("c0"))], log)
    assert proc.wait(60) == 2
    lines = log.read_text().strip().splitlines()
    assert lines == ["error: id 'c1' differs from the name 'c0' of its broker credential: a device may only speak "
                     "as itself"], lines
    task = tiny_task(tiny_model)
    with pytest.raises(ConfigError, match="differs"):
        AggregatorService(FleetConfig(fleet="t"), task, fd.url(), credentials=fd.credentials("c2"))


def test_tls_fleet_completes_two_rounds_while_a_device_forges(secure_fleet: SecureMosquitto, tmp_path: Path,
                                                               tiny_model: str) -> None:
    """Aggregator and c0, c1 on the certificate listener, c2 on the password listener; device c3 (valid credential,
    not in the run) forges updates, status, task, round, done and assignments once round 1 is assigned: none reaches
    anyone, and the run completes with every honest update."""
    fd = secure_fleet.fleet_dir
    topics = fd.topics
    files, labels = write_client_data(tmp_path, [20, 30, 25])
    config = write_config(tmp_path / "config.json", tiny_model, labels, rounds=2, min_clients=3)
    observer = _link(fd, "observer")
    observer.subscribe(f"{topics.base}/#")
    mallory = _link(fd, "c3")
    summary_path = tmp_path / "summary.json"
    agg = spawn(["aggregator", "--broker", fd.url(), "--config", str(config), "--json-out", str(summary_path),
                 *credential_flags(fd.credentials("aggregator"))], tmp_path / "aggregator.log")
    clients = []
    for k, (train, test) in enumerate(files):
        name, password = f"c{k}", k == 2
        clients.append(spawn(["client", "--broker", fd.url(password=password), "--client-id", name, "--data",
                              str(train), "--test-data", str(test), "--fleet", "t", "--threads", "1",
                              *credential_flags(fd.credentials(name, password=password))], tmp_path / f"{name}.log"))
    seen: list[tuple[str, Message]] = []
    forged = False
    try:
        deadline = time.monotonic() + 180
        while agg.poll() is None and time.monotonic() < deadline:
            m = observer.receive(0.2)
            if m is None or not m.payload:
                continue
            msg = decode(m.payload, 64 * 2**20)
            seen.append((m.topic, msg))
            if msg.kind == Kind.ASSIGN and msg.round == 1 and not forged:
                forged = True
                run = msg.body["run"]
                update = encode(Message(Kind.UPDATE, "t", 1, msg.phase, "c0", {"run": run, "num_samples": 10**6},
                                        msg.tensors, msg.roles))
                for topic, payload in ((topics.update("c0"), update),
                                       (topics.status("c1"), encode(Message(Kind.STATUS, "t", 1, client="c1",
                                                                            body={"state": "offline"}))),
                                       (topics.round, encode(Message(Kind.ROUND, "t", 1, "done", body={"run": run}))),
                                       (topics.task, encode(Message(Kind.TASK, "t", 0, body={"run": "f" * 12}))),
                                       (topics.assign("c1"), m.payload)):
                    mallory.publish(topic, payload, retain=topic in (topics.round, topics.task))
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))
        assert agg.poll() == 0, logs
        summary = json.loads(summary_path.read_text())
        assert forged
        assert [r["answered"] for r in summary["rounds"]] == [["c0", "c1", "c2"]] * 2
        assert summary["final"]["answered"] == ["c0", "c1", "c2"]
        assert summary["rejected"] == {}  # nothing forged reached the aggregator, so it had nothing to reject
        assert not any(msg.body.get("num_samples") == 10**6 or msg.body.get("run") == "f" * 12 for _, msg in seen)
        assert [msg.phase for _, msg in seen if msg.kind == Kind.ROUND].count("done") == 1  # the aggregator's own
        assert {msg.kind for _, msg in seen} >= {Kind.TASK, Kind.ROUND, Kind.ASSIGN, Kind.UPDATE, Kind.STATUS,
                                                 Kind.METRICS}
        assert (fd.path / "devices/c2/password").read_text().strip() not in logs  # never logged
    finally:
        stop_processes([agg, *clients], 30)
        observer.close()
        mallory.close()


def test_the_raspberry_pi_guides_mosquitto_example_is_what_broker_init_writes(tmp_path: Path) -> None:
    init_broker_dir(tmp_path / "x", "lab", ["pi-01"], broker_root="/etc/mosquitto/edgemole")
    settings = lambda text: [ln for ln in text.splitlines() if ln and not ln.startswith("#")]  # noqa: E731
    example = (REPO / "devices/raspberry-pi/mosquitto.conf.example").read_text()
    assert settings(example) == settings((tmp_path / "x/broker/mosquitto.conf").read_text())


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["client", "--broker", "mqtts://u:pw@127.0.0.1:1", "--client-id", "x", "--data", "x.csv"],
         "a password in the broker URL"),
        (["client", "--broker", "mqtts://127.0.0.1:1", "--client-id", "x", "--data", "x.csv", "--username", "x",
          "--password-file", "/nonexistent/pw"], "cannot read the MQTT password file /nonexistent/pw"),
        (["aggregator", "--broker", "mqtts://127.0.0.1:1", "--labels", "a,b", "--cert-file", "/etc/hostname"],
         "needs its key"),
        (["simulate", "--ca-file", "/etc/hostname"], "need --broker"),
        (["broker", "init", "{tmp}/d", "--fleet", "f", "--devices", "pi-01,aggregator"], "reserved"),
        (["broker", "init", "{tmp}/d", "--fleet", "f", "--devices", "bad/id"], "invalid device id"),
        (["broker", "init", "{tmp}/d", "--fleet", "f", "--port", "8883", "--password-port", "8883"], "must differ"),
        (["broker", "add-device", "{tmp}/nothing", "pi-09"], "not a directory written by 'edgemole broker init'"),
    ],
)
def test_credential_and_broker_mistakes_give_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      argv: list[str], needle: str) -> None:
    from fleet.cli import main

    with pytest.raises(SystemExit) as exc:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0 and err.startswith("error: ") and needle in err, err
    assert "pw@" not in err


def test_simulate_secure_dir_needs_an_identity_per_client(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from fleet.cli import main

    init_broker_dir(tmp_path / "d", "lab", ["client-0"])
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--secure-dir", str(tmp_path / "d"), "--clients", "2"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "no identity for client-1" in err and err.count("\n") == 0, err
