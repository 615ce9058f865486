"""The native client through the TLS + ACL Mosquitto that ``edgemole broker init`` writes (edgemole/security): a
fleet round with one device on the certificate listener and one on the password listener, and one-line refusals
(exit status 2) for a wrong CA, a wrong password, a client id that is not its credential's name, a password on the
command line and a missing file. The password never shows in any output."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_client_data
from native import OwnMosquitto, native_build, run_fleet

from edgemole.broker import free_port
from edgemole.security import FleetDir, init_broker_dir
from edgemole.security.pki import new_ca

pytestmark = pytest.mark.mosquitto


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetDir]:
    """A generated fleet directory (devices c0, c1; fleet t) and its broker, running."""
    fd = init_broker_dir(tmp_path / "fleet", "t", ["c0", "c1"], host="127.0.0.1", port=free_port(),
                         password_port=free_port(), device_root=None)
    broker = OwnMosquitto(tmp_path, conf=fd.broker_dir / "mosquitto.conf",
                          ports=(fd.meta["port"], fd.meta["password_port"]))
    broker.start()
    yield fd
    broker.stop()


def _device_flags(fd: FleetDir, name: str, *, password: bool = False) -> list[str]:
    d = fd.identity_dir(name)
    if password:
        return ["--broker", fd.url(password=True), "--ca-file", str(d / "ca.crt"), "--username", name,
                "--password-file", str(d / "password")]
    return ["--broker", fd.url(), "--ca-file", str(d / "ca.crt"), "--cert-file", str(d / "client.crt"),
            "--key-file", str(d / "client.key")]


def test_a_tls_fleet_round_with_certificate_and_password_identities(tmp_path: Path, fleet: FleetDir, tiny_model: str,
                                                                    tiny_artifacts: dict[str, Path]) -> None:
    agg = fleet.identity_dir("aggregator")
    summary, _ = run_fleet(
        tmp_path / "run", fleet.url(), tiny_model, tiny_artifacts["lora"], "fedit", {"c0", "c1"},
        [str(native_build() / "edgemole-device")], sizes=(30, 36), rounds=1, timeout_s=240,
        aggregator_args=["--ca-file", str(agg / "ca.crt"), "--cert-file", str(agg / "client.crt"),
                         "--key-file", str(agg / "client.key")],
        device_args={"c0": _device_flags(fleet, "c0"), "c1": _device_flags(fleet, "c1", password=True)})
    assert [sorted(r["answered"]) for r in summary["rounds"]] == [["c0", "c1"]]
    assert summary["rejected"] == {}
    log = next((tmp_path).glob("mosquitto-*.log")).read_text()
    # each device connected as its identity (the MQTT client id and the user name are the device id)
    assert "as c0 (p2, c0, k30, u'c0')" in log and "as c1 (p2, c0, k30, u'c1')" in log
    password = (fleet.identity_dir("c1") / "password").read_text().strip()
    for out in (tmp_path / "run").glob("*.log"):
        assert password not in out.read_text(errors="replace")


def _device(tmp_path: Path, flags: list[str], client_id: str = "c0", env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    if not (tmp_path / "c0.train.jsonl").exists():
        write_client_data(tmp_path, [30])
    return subprocess.run(
        [str(native_build() / "edgemole-device"), "--client-id", client_id, "--fleet", "t",
         "--artifact", str(tmp_path / "artifact"), "--data", str(tmp_path / "c0.train.jsonl"),
         "--connect-timeout-s", "5", *flags],
        capture_output=True, text=True, timeout=60, check=False,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("EDGEMOLE_MQTT")}, **(env or {})})


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_refusals_are_one_line_and_never_show_the_password(tmp_path: Path, fleet: FleetDir,
                                                           tiny_artifacts: dict[str, Path]) -> None:
    (tmp_path / "artifact").symlink_to(tiny_artifacts["lora"])
    c0 = fleet.identity_dir("c0")
    port, password_port = fleet.meta["port"], fleet.meta["password_port"]
    # a CA that did not sign the broker's certificate: the handshake fails at once, with OpenSSL's reason
    new_ca("other", tmp_path / "other-ca")
    flags = _device_flags(fleet, "c0")
    flags[flags.index("--ca-file") + 1] = str(tmp_path / "other-ca" / "ca.crt")
    assert _one_error_line(_device(tmp_path, flags)) == (
        f"error: TLS with MQTT broker at mqtts://127.0.0.1:{port} failed: certificate verify failed")

    # a wrong password, from the environment (no password_file): the broker refuses; the password is never printed
    flags = _device_flags(fleet, "c0", password=True)[:-2]
    result = _device(tmp_path, flags, env={"EDGEMOLE_MQTT_PASSWORD": "not-the-password-9f3e"})
    assert _one_error_line(result) == (
        f"error: MQTT broker at mqtts://127.0.0.1:{password_port} refused the connection: not authorized")
    assert "not-the-password-9f3e" not in result.stderr + result.stdout
    # the right one from the environment connects (stopped by the missing assignment: it just serves)
    right = (c0 / "password").read_text().strip()
    proc = subprocess.Popen(
        [str(native_build() / "edgemole-device"), "--client-id", "c0", "--fleet", "t", "--artifact",
         str(tmp_path / "artifact"), "--data", str(tmp_path / "c0.train.jsonl"), *flags],
        stderr=subprocess.PIPE, text=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("EDGEMOLE_MQTT")},
             "EDGEMOLE_MQTT_PASSWORD": right})
    try:
        assert proc.stderr is not None
        assert "client c0 online" in proc.stderr.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert right not in err

    # a client id that is not the credential's name: refused before connecting
    line = _one_error_line(_device(tmp_path, _device_flags(fleet, "c0"), client_id="c1"))
    assert line == ("error: client id 'c1' differs from its credential's name 'c0' (the CN of cert_file): "
                    "a device connects only as itself")
    line = _one_error_line(_device(tmp_path, _device_flags(fleet, "c0", password=True), client_id="c1"))
    assert line == ("error: client id 'c1' differs from its credential's name 'c0' (username): "
                    "a device connects only as itself")

    # no password value on the command line, or in the config file
    result = _device(tmp_path, [*_device_flags(fleet, "c0", password=True)[:-2], "--password", "hunter2-x"])
    assert _one_error_line(result) == ("error: the password is never a config value or a flag: use password_file "
                                       "or EDGEMOLE_MQTT_PASSWORD")
    assert "hunter2-x" not in result.stderr
    config = tmp_path / "device.json"
    config.write_text(json.dumps({"password": "hunter2-x"}))
    result = _device(tmp_path, ["--config", str(config)])
    assert "hunter2-x" not in _one_error_line(result)

    # files that are missing or not what they claim to be
    flags = _device_flags(fleet, "c0")
    flags[flags.index("--key-file") + 1] = str(tmp_path / "missing.key")
    assert _one_error_line(_device(tmp_path, flags)) == (
        f"error: key_file '{tmp_path / 'missing.key'}' does not exist or cannot be read")
    flags = _device_flags(fleet, "c0")
    flags[flags.index("--key-file") + 1] = str(fleet.identity_dir("c1") / "client.key")
    assert "is not the key of cert_file" in _one_error_line(_device(tmp_path, flags))
    # certificates need a TLS URL
    flags = _device_flags(fleet, "c0")
    flags[flags.index("--broker") + 1] = f"mqtt://127.0.0.1:{port}"
    assert _one_error_line(_device(tmp_path, flags)) == (
        f"error: ca_file, cert_file and key_file need a TLS broker URL (mqtts://host:port), not "
        f"mqtt://127.0.0.1:{port}")
