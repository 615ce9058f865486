"""Run Mosquitto on a ``broker init`` directory's config: for the tests, the benchmarks and a quick local try."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from edgemole.broker import mosquitto_binary, wait_for_port
from edgemole.errors import BrokerError
from edgemole.security.brokerdir import FleetDir


class SecureMosquitto:
    """Mosquitto with the generated TLS + ACL config; ``restart`` re-reads the CRL, ``reload`` (SIGHUP) passwd and
    acl, as an operator would after revoke-device and add-device."""

    def __init__(self, fleet_dir: FleetDir, log_path: str | Path, timeout_s: float = 10.0) -> None:
        self.fleet_dir, self.log_path, self.timeout_s = fleet_dir, Path(log_path), timeout_s
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError("mosquitto is not installed (Debian/Ubuntu: apt-get install -y mosquitto)")
        self.binary = binary
        self.proc: subprocess.Popen | None = None

    def _config(self) -> Path:
        conf = self.fleet_dir.broker_dir / "mosquitto.conf"
        if os.geteuid() != 0:
            return conf
        # as root Mosquitto would switch to the user 'mosquitto', who cannot read the 0600 keys of this user
        local = self.fleet_dir.broker_dir / "mosquitto.local.conf"
        local.write_text("user root\n" + conf.read_text())
        return local

    def start(self) -> SecureMosquitto:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self._config())], stdout=log,
                                         stderr=subprocess.STDOUT)
        host = self.fleet_dir.meta["bind"] or "127.0.0.1"
        for port in (self.fleet_dir.meta["port"], self.fleet_dir.meta["password_port"]):
            wait_for_port(host, port, self.timeout_s, self.proc)
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads passwd and acl (not the CRL)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def __enter__(self) -> SecureMosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
