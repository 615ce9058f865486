"""``edgemole broker init / add-device / revoke-device``: everything a TLS + ACL fleet needs, in one directory.

Layout of DIR (secrets 0600)::

    fleet.json                      fleet, prefix, host, ports, identities and their certificate serials
    ca/ca.crt, ca/ca.key            the fleet's private CA (keep ca.key offline once the fleet is set up)
    broker/                         copy to the broker host: mosquitto.conf, server.crt, server.key, ca.crt,
                                    crl.pem, passwd, acl, data/ (persistence)
    aggregator/, observer/          ca.crt, client.crt, client.key, password, <role>.env
    devices/<id>/                   ca.crt, client.crt, client.key, password, client.env, device.json
    revoked/<id>/                   a revoked device's former files

Two TLS listeners: ``port`` authenticates by client certificate (identity = the certificate's CN) and
``password_port`` by user name and password; both use the same ACL, and the broker replaces every client id by
the identity (``use_username_as_clientid``), so that ``%u`` = ``%c`` = the device id.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemole.errors import ConfigError
from edgemole.mqtt import BrokerCredentials, packet_limit
from edgemole.protocol import DEFAULT_MAX_MESSAGE_BYTES
from edgemole.protocol.topics import Topics, check_name
from edgemole.security.pki import issue, new_ca, write_crl, write_private

#: identities that are roles, never device ids
RESERVED = ("aggregator", "observer")
#: where client.env and device.json say a device's files are, by default (provision.sh installs them there)
DEFAULT_DEVICE_ROOT = "/etc/edgemole/{id}"
FLEET_FILE = "fleet.json"
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes for $7$


def mosquitto_password_hash(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A Mosquitto 2 password file hash: ``$7$`` = PBKDF2-HMAC-SHA512, base64 salt and key (as mosquitto_passwd)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


@dataclass(frozen=True)
class FleetDir:
    """A ``broker init`` directory and its ``fleet.json``."""

    path: Path
    meta: dict[str, Any]

    @classmethod
    def load(cls, directory: str | Path) -> FleetDir:
        path = Path(directory).resolve()
        try:
            meta = json.loads((path / FLEET_FILE).read_text())
        except (OSError, ValueError):
            raise ConfigError(f"{directory} is not a directory written by 'edgemole broker init' "
                              f"(no readable {FLEET_FILE})") from None
        return cls(path, meta)

    def save(self) -> None:
        tmp = self.path / f"{FLEET_FILE}.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2) + "\n")
        tmp.replace(self.path / FLEET_FILE)

    @property
    def topics(self) -> Topics:
        return Topics(self.meta["fleet"], self.meta["prefix"])

    @property
    def devices(self) -> list[str]:
        return [n for n, i in self.meta["identities"].items() if i["role"] == "device"]

    @property
    def broker_dir(self) -> Path:
        return self.path / "broker"

    def identity_dir(self, name: str) -> Path:
        return self.path / name if name in RESERVED else self.path / "devices" / name

    def url(self, *, password: bool = False, host: str | None = None) -> str:
        """The ``mqtts://`` URL of the certificate listener (or of the password listener)."""
        port = self.meta["password_port" if password else "port"]
        return f"mqtts://{host or self.meta['host']}:{port}"

    def credentials(self, name: str, *, password: bool = False) -> BrokerCredentials:
        """Credentials of identity ``name`` with this directory's files: its certificate (or its user name and
        password, for the password listener)."""
        if name not in self.meta["identities"]:
            raise ConfigError(f"no identity {name!r} in {self.path}")
        d = self.identity_dir(name)
        if password:
            return BrokerCredentials.resolve(ca_file=str(d / "ca.crt"), username=name,
                                             password_file=str(d / "password"), env={})  # type: ignore[return-value]
        return BrokerCredentials(ca_file=str(d / "ca.crt"), cert_file=str(d / "client.crt"),
                                 key_file=str(d / "client.key"))


def _check_device_id(device_id: str) -> str:
    check_name(device_id, "device id")
    if device_id in RESERVED:
        raise ConfigError(f"device id {device_id!r} is reserved for the {device_id} identity")
    return device_id


def init_broker_dir(directory: str | Path, fleet: str, devices: Iterable[str], *, host: str = "localhost",
                    server_names: Iterable[str] = (), bind: str | None = None, port: int = 8883,
                    password_port: int = 8884, prefix: str = "edgemole",
                    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    device_root: str | None = DEFAULT_DEVICE_ROOT, broker_root: str | None = None,
                    force: bool = False) -> FleetDir:
    """Write a CA, the broker's certificate and config, and one credential per device, aggregator and observer.

    ``device_root`` (with ``{id}``) is where client.env/device.json point a device at its files; None: the files
    in this directory (a fleet on this machine). ``broker_root``: where broker/ will be on the broker host
    (default: here).
    """
    path = Path(directory)
    devices = list(dict.fromkeys(devices))
    Topics(fleet, prefix)
    for d in devices:
        _check_device_id(d)
    for p in (port, password_port):
        if not 1 <= p <= 65535:
            raise ConfigError(f"port {p} is not in 1..65535")
    if port == password_port:
        raise ConfigError("--port and --password-port must differ")
    if path.exists() and any(path.iterdir()):
        if not force:
            raise ConfigError(f"{path} is not empty: it may hold a fleet's CA; use --force to replace it")
        if (path / FLEET_FILE).exists():
            for sub in ("ca", "broker", "aggregator", "observer", "devices", "revoked", FLEET_FILE):
                target = path / sub
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    fd = FleetDir(path.resolve(), {
        "version": 1, "fleet": fleet, "prefix": prefix, "host": host,
        "server_names": list(dict.fromkeys([host, *server_names, "localhost", "127.0.0.1", "::1"])),
        "bind": bind, "port": port, "password_port": password_port,
        "max_packet_bytes": packet_limit(max_message_bytes), "device_root": device_root,
        "broker_root": broker_root, "identities": {}, "revoked_serials": [],
    })
    new_ca(fleet, fd.path / "ca")
    broker = fd.broker_dir
    (broker / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(fd.path / "ca" / "ca.crt", broker / "ca.crt")
    issue(fd.path / "ca", host, broker / "server.crt", broker / "server.key", server_names=fd.meta["server_names"])
    for name in (*RESERVED, *devices):
        _new_identity(fd, name)
    _write_broker_files(fd)
    fd.save()
    return fd


def add_device(directory: str | Path, device_id: str) -> Path:
    """Credentials for one more device; updates passwd and acl (the broker reloads them on SIGHUP)."""
    fd = FleetDir.load(directory)
    _check_device_id(device_id)
    if device_id in fd.meta["identities"]:
        raise ConfigError(f"device {device_id!r} already exists in {fd.path} (revoke it first to replace it)")
    _new_identity(fd, device_id)
    _write_broker_files(fd)
    fd.save()
    return fd.identity_dir(device_id)


def revoke_device(directory: str | Path, device_id: str) -> None:
    """Revoke a device: its certificate goes into the CRL, its password and ACL entries are removed, its files move
    to revoked/<id>. The broker must be restarted to load the new CRL (SIGHUP reloads passwd and acl only)."""
    fd = FleetDir.load(directory)
    _check_device_id(device_id)
    identity = fd.meta["identities"].get(device_id)
    if identity is None:
        raise ConfigError(f"no device {device_id!r} in {fd.path}")
    fd.meta["revoked_serials"].append(identity["serial"])
    del fd.meta["identities"][device_id]
    target = fd.path / "revoked" / device_id
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(exist_ok=True)
    if fd.identity_dir(device_id).exists():
        fd.identity_dir(device_id).rename(target)
    _write_broker_files(fd)
    fd.save()


def _new_identity(fd: FleetDir, name: str) -> None:
    d = fd.identity_dir(name)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    d.chmod(0o700)
    role = name if name in RESERVED else "device"
    serial = issue(fd.path / "ca", name, d / "client.crt", d / "client.key")
    shutil.copy(fd.path / "ca" / "ca.crt", d / "ca.crt")
    password = secrets.token_urlsafe(24)
    write_private(d / "password", (password + "\n").encode())
    fd.meta["identities"][name] = {"role": role, "serial": serial,
                                   "password_hash": mosquitto_password_hash(password)}
    root = str(d) if role != "device" or fd.meta["device_root"] is None else fd.meta["device_root"].format(id=name)
    env_name = "client.env" if role == "device" else f"{role}.env"
    (d / env_name).write_text(_env_file(fd, name, role, root))
    if role == "device":
        (d / "device.json").write_text(json.dumps({
            "broker": fd.url(), "client_id": name, "fleet": fd.meta["fleet"], "topic_prefix": fd.meta["prefix"],
            "ca_file": f"{root}/ca.crt", "cert_file": f"{root}/client.crt", "key_file": f"{root}/client.key",
        }, indent=2) + "\n")


def _env_file(fd: FleetDir, name: str, role: str, root: str) -> str:
    what = f"device {name}" if role == "device" else f"the {role}"
    return (
        f"# {what} of edgemole fleet {fd.meta['fleet']}: written by 'edgemole broker init/add-device'.\n"
        "# Certificate listener (mutual TLS; the broker takes the identity from the certificate):\n"
        f"EDGEMOLE_BROKER={fd.url()}\n"
        f"EDGEMOLE_FLEET={fd.meta['fleet']}\n"
        f"EDGEMOLE_TOPIC_PREFIX={fd.meta['prefix']}\n"
        f"EDGEMOLE_MQTT_CA_FILE={root}/ca.crt\n"
        f"EDGEMOLE_MQTT_CERT_FILE={root}/client.crt\n"
        f"EDGEMOLE_MQTT_KEY_FILE={root}/client.key\n"
        "# Or the password listener (TLS, user name and password): comment out the certificate lines above and use\n"
        f"#EDGEMOLE_BROKER={fd.url(password=True)}\n"
        f"#EDGEMOLE_MQTT_USERNAME={name}\n"
        f"#EDGEMOLE_MQTT_PASSWORD_FILE={root}/password\n"
    )


def _write_broker_files(fd: FleetDir) -> None:
    broker = fd.broker_dir
    root = fd.meta["broker_root"] or str(broker)
    identities = fd.meta["identities"]
    (broker / "passwd.tmp").unlink(missing_ok=True)
    write_private(broker / "passwd.tmp", "".join(f"{n}:{i['password_hash']}\n" for n, i in identities.items())
                  .encode())
    (broker / "passwd.tmp").replace(broker / "passwd")
    (broker / "acl").write_text(acl_text(fd.topics, [n for n, i in identities.items() if i["role"] == "device"]))
    write_crl(fd.path / "ca", fd.meta["revoked_serials"], broker / "crl.pem")
    bind = f" {fd.meta['bind']}" if fd.meta["bind"] else ""
    # per listener (a global one would open a default listener on 1883): the client id is the identity, so that a
    # device cannot take over another's session, and %u = %c in the ACL
    tls = (f"cafile {root}/ca.crt\ncertfile {root}/server.crt\nkeyfile {root}/server.key\n"
           "use_username_as_clientid true\n")
    (broker / "mosquitto.conf").write_text(
        f"# Mosquitto 2 config of edgemole fleet {fd.meta['fleet']}, written by 'edgemole broker init'.\n"
        "# TLS only, every client authenticated, every topic under the ACL. After add-device: SIGHUP (reloads passwd\n"
        "# and acl); after revoke-device: restart (the CRL is read at start).\n"
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"password_file {root}/passwd\n"
        f"acl_file {root}/acl\n"
        "persistence true\n"
        f"persistence_location {root}/data/\n"
        "autosave_interval 60\n"
        "max_queued_messages 1000\n"
        "persistent_client_expiration 14d\n"
        "# the largest edgemole message (fleet.max_message_bytes) plus headers; larger packets are refused\n"
        f"max_packet_size {fd.meta['max_packet_bytes']}\n"
        "\n# mutual TLS: the identity is the client certificate's common name\n"
        f"listener {fd.meta['port']}{bind}\n{tls}"
        "require_certificate true\nuse_identity_as_username true\n"
        f"crlfile {root}/crl.pem\n"
        "\n# TLS with user name and password (for clients without a certificate)\n"
        f"listener {fd.meta['password_port']}{bind}\n{tls}"
        "require_certificate false\n"
    )


def acl_text(topics: Topics, devices: Iterable[str]) -> str:
    """Mosquitto ACL: the aggregator alone writes task, round (and its done), assign and metrics; the observer reads
    the fleet; a device reads task, round, metrics and its own assign and writes its own status and update."""
    base = topics.base
    lines = [f"# edgemole fleet {topics.fleet}: one block per identity; anything not listed is denied",
             "user aggregator", f"topic readwrite {base}/#", "", "user observer", f"topic read {base}/#", ""]
    for d in devices:
        lines += [f"user {d}", f"topic read {topics.task}", f"topic read {topics.round}",
                  f"topic read {topics.metrics}", f"topic read {topics.assign(d)}",
                  f"topic write {topics.status(d)}", f"topic write {topics.update(d)}", ""]
    return "\n".join(lines)
