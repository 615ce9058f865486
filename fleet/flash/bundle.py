"""What ``edgemole flash`` puts on a device: every file with its place in the device's folder, mode and sha256.

The device folder (``--dir``, ``/srv/edgemole`` on a board, ``/data/local/tmp/edgemole`` on a phone by default)::

    artifact/      manifest.json, program.pte, base.ptd, tokenizer/...   (edgemole export; not inference.onnx)
    bin/, lib/     edgemole-device and the ExecuTorch runtime libraries   (native client)
    data/          train.<ext>, test.<ext>                                (the device's own data)
    credentials/   ca.crt, client.crt, client.key                         (edgemole broker init)
    device.json    the native client's config   |   client.env  the Python client's environment
    run.sh         the launcher both services start
    run/, log/     PID file, client.log; state/: the deployed model

Generated files (config, launcher, unit) are written to a local staging folder first, so that every item is a
local file with a hash and a re-flash compares them like the rest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from edgemole.artifact import ONNX_FILE, read_manifest, verify_files
from edgemole.errors import ConfigError
from edgemole.mqtt import parse_broker_url

#: the native client and the ExecuTorch runtime libraries it links (devices/native/cmake/executorch.cmake)
NATIVE_BINARY = "edgemole-device"
RUNTIME_LIBRARIES = ("libexecutorch.so", "libexecutorch_threadpool.so", "libexecutorch_kernels_optimized.so",
                     "libexecutorch_backend_xnnpack.so")
#: the certificate identity of 'edgemole broker init' (the password listener's password stays off the device)
CREDENTIAL_FILES = {"ca.crt": "0644", "client.crt": "0644", "client.key": "0600"}
#: the Python environment devices/raspberry-pi/provision.sh installs
DEFAULT_PYTHON = "/opt/edgemole/bin/python"
CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: ELF e_machine of a binary -> the architecture names a device reports (uname -m, Android ABIs)
ELF_MACHINES = {0x3E: ("x86_64", "x86_64"), 0xB7: ("aarch64", "arm64-v8a"), 0x28: ("armv7l", "armeabi-v7a"),
                0x03: ("i686", "x86")}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Item:
    """One file for the device: ``remote`` is relative to the device folder (absolute for a systemd unit)."""

    remote: str
    source: Path
    sha256: str
    size: int
    mode: str
    what: str


@dataclass
class DeviceSpec:
    """What one device gets, from the command's flags; checked before anything is contacted."""

    target: str  # "android" or "board"
    client_id: str
    root: str
    client: str  # "native" or "python"
    broker: str | None = None
    fleet: str | None = None
    topic_prefix: str | None = None
    artifact: Path | None = None
    data: Path | None = None
    test_data: Path | None = None
    credentials: Path | None = None
    native_dir: Path | None = None
    python: str | None = None
    engine: str | None = None
    threads: int | None = None
    upload_rank: int | None = None

    def check_place(self) -> None:
        """The id and the folder: all that starting, stopping or inspecting a client needs."""
        if not CLIENT_ID.match(self.client_id):
            raise ConfigError(f"--client-id {self.client_id!r}: use 1-64 of letters, digits, '_', '.', '-'")
        if not self.root.startswith("/") or re.search(r"[\s'\"\\$`]", self.root) or "/.." in self.root:
            raise ConfigError(f"--dir {self.root!r}: an absolute path without spaces, quotes or '..'")

    def check(self) -> None:
        """Everything an install needs."""
        self.check_place()
        if self.credentials is not None:
            self._from_credentials()
        self.fleet = self.fleet or "default"
        self.topic_prefix = self.topic_prefix or "edgemole"
        if not self.broker:
            raise ConfigError("--broker is required (or --credentials of 'edgemole broker init', whose device.json "
                              "names it)")
        parse_broker_url(self.broker)
        for flag, path in (("--data", self.data), ("--test-data", self.test_data)):
            if path is not None and not path.is_file():
                raise ConfigError(f"{flag} {path}: no such file")
        if self.data is None:
            raise ConfigError("--data is required: the device's own training data (CSV, JSONL or JSON)")
        if self.engine not in (None, "eager", "executorch"):
            raise ConfigError(f"--engine {self.engine!r}: eager or executorch")
        if self.client == "native" and self.engine not in (None, "executorch"):
            raise ConfigError("the native client trains the exported program only (--engine executorch)")
        needs_artifact = self.client == "native" or self.engine == "executorch"
        if needs_artifact and self.artifact is None:
            which = "native client" if self.client == "native" else "Python client with --engine executorch"
            raise ConfigError(f"the {which} needs --artifact (the folder of 'edgemole export')")
        if self.client == "python" and self.native_dir is not None:
            raise ConfigError("--native-dir is for --client native")
        if self.client == "native" and self.python is not None:
            raise ConfigError("--python is for --client python")
        if self.client == "native" and self.native_dir is None and self.target == "android":
            raise ConfigError("flash android needs --native-dir: the Android (NDK) build of edgemole-device and its "
                              "libraries (devices/native/README.md)")
        for flag, value, low, high in (("--threads", self.threads, 1, 256), ("--upload-rank", self.upload_rank, 1,
                                                                              4096)):
            if value is not None and not low <= value <= high:
                raise ConfigError(f"{flag} must be in [{low}, {high}]")

    def _from_credentials(self) -> None:
        assert self.credentials is not None
        meta_path = self.credentials / "device.json"
        if not meta_path.is_file():
            raise ConfigError(f"--credentials {self.credentials}: no device.json (use DIR/devices/<id> of "
                              "'edgemole broker init')")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{meta_path}: not readable JSON ({exc})") from None
        if meta.get("client_id") != self.client_id:
            raise ConfigError(f"--credentials {self.credentials} are {meta.get('client_id')!r}'s, not "
                              f"{self.client_id!r}'s")
        self.broker = self.broker or meta.get("broker")
        self.fleet = self.fleet or meta.get("fleet")
        self.topic_prefix = self.topic_prefix or meta.get("topic_prefix")
        for name in ("ca.crt", "client.crt", "client.key"):
            if not (self.credentials / name).is_file():
                raise ConfigError(f"--credentials {self.credentials}: {name} is missing")

    def path(self, rel: str) -> str:
        """``rel`` inside the device folder."""
        return f"{self.root}/{rel}"

    @property
    def unit_name(self) -> str:
        return f"edgemole-{self.client_id}.service"


def elf_machine(binary: Path) -> tuple[str, str]:
    """(uname -m name, Android ABI) of an ELF executable, read from its header."""
    head = binary.read_bytes()[:20]
    if head[:4] != b"\x7fELF" or len(head) < 20:
        raise ConfigError(f"{binary}: not an ELF executable")
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    if machine not in ELF_MACHINES:
        raise ConfigError(f"{binary}: built for ELF machine {machine:#x}, which no supported device has")
    return ELF_MACHINES[machine]


def native_files(spec: DeviceSpec) -> tuple[Path, list[Path]]:
    """The native client and the shared libraries to ship with it: from --native-dir (the binary, and every
    ``*.so*`` beside it or in its ``lib/``), else this machine's build and the executorch wheel's runtime."""
    if spec.native_dir is not None:
        binary = spec.native_dir / NATIVE_BINARY
        if not binary.is_file():
            raise ConfigError(f"--native-dir {spec.native_dir}: no {NATIVE_BINARY} in it")
        libs = sorted({*spec.native_dir.glob("*.so*"), *(spec.native_dir / "lib").glob("*.so*")})
        return binary, [p for p in libs if p.is_file()]
    from fleet.native import find_native_binary

    binary = find_native_binary()
    found = importlib.util.find_spec("executorch")
    if found is None or not found.submodule_search_locations:
        raise ConfigError("the executorch package is not installed here: give --native-dir")
    lib_dir = Path(next(iter(found.submodule_search_locations))) / "lib"
    libs = [lib_dir / name for name in RUNTIME_LIBRARIES]
    missing = [p.name for p in libs if not p.is_file()]
    if missing:
        raise ConfigError(f"{lib_dir}: {', '.join(missing)} missing: give --native-dir")
    return binary, libs


def _item(remote: str, source: Path, mode: str, what: str) -> Item:
    return Item(remote, source, sha256_file(source), source.stat().st_size, mode, what)


def _write(staging: Path, name: str, text: str) -> Path:
    path = staging / name
    path.write_text(text)
    return path


def build_bundle(spec: DeviceSpec, staging: Path, service: str) -> list[Item]:
    """Every file the device gets, in the order they are pushed (the big, rarely changing ones first)."""
    items: list[Item] = []
    if spec.artifact is not None:
        manifest = read_manifest(spec.artifact)
        verify_files(spec.artifact, manifest)
        for path in sorted(p for p in spec.artifact.rglob("*") if p.is_file() and p.name != ONNX_FILE):
            items.append(_item(f"artifact/{path.relative_to(spec.artifact).as_posix()}", path, "0644", "artifact"))
    if spec.client == "native":
        binary, libs = native_files(spec)
        items.append(_item(f"bin/{NATIVE_BINARY}", binary, "0755", "client"))
        items += [_item(f"lib/{lib.name}", lib, "0644", "client") for lib in libs]
    assert spec.data is not None
    items.append(_item(f"data/train{spec.data.suffix.lower()}", spec.data, "0644", "data"))
    if spec.test_data is not None:
        items.append(_item(f"data/test{spec.test_data.suffix.lower()}", spec.test_data, "0644", "data"))
    creds: dict[str, str] = {}
    if spec.credentials is not None:
        for name, mode in CREDENTIAL_FILES.items():
            if (spec.credentials / name).is_file():
                items.append(_item(f"credentials/{name}", spec.credentials / name, mode, "credentials"))
                creds[name] = spec.path(f"credentials/{name}")
    train = spec.path(f"data/train{spec.data.suffix.lower()}")
    test = spec.path(f"data/test{spec.test_data.suffix.lower()}") if spec.test_data is not None else None
    if spec.client == "native":
        config = {"broker": spec.broker, "client_id": spec.client_id, "fleet": spec.fleet,
                  "topic_prefix": spec.topic_prefix, "artifact": spec.path("artifact"), "data": train,
                  "keep_serving": True, "state_dir": spec.path("state")}
        if test:
            config["test_data"] = test
        if spec.threads is not None:
            config["threads"] = spec.threads
        if spec.upload_rank is not None:
            config["upload_rank"] = spec.upload_rank
        config.update({key: creds[name] for key, name in (("ca_file", "ca.crt"), ("cert_file", "client.crt"),
                                                         ("key_file", "client.key")) if name in creds})
        items.append(_item("device.json", _write(staging, "device.json", json.dumps(config, indent=2) + "\n"),
                           "0600", "config"))
        command = [spec.path(f"bin/{NATIVE_BINARY}"), "--config", spec.path("device.json")]
        env = {"LD_LIBRARY_PATH": spec.path("lib")}
    else:
        env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.update({var: creds[name] for var, name in (("EDGEMOLE_MQTT_CA_FILE", "ca.crt"),
                                                       ("EDGEMOLE_MQTT_CERT_FILE", "client.crt"),
                                                       ("EDGEMOLE_MQTT_KEY_FILE", "client.key")) if name in creds})
        if spec.threads is not None:
            env["OMP_NUM_THREADS"] = str(spec.threads)
        command = [spec.python or DEFAULT_PYTHON, "-m", "fleet", "client", "--broker", spec.broker,
                   "--client-id", spec.client_id, "--data", train, "--fleet", spec.fleet, "--topic-prefix",
                   spec.topic_prefix, "--engine", spec.engine or "eager", "--keep-serving"]
        if test:
            command += ["--test-data", test]
        if spec.engine == "executorch":
            command += ["--artifact", spec.path("artifact")]
        for flag, value in (("--threads", spec.threads), ("--upload-rank", spec.upload_rank)):
            if value is not None:
                command += [flag, str(value)]
    assert spec.broker is not None and spec.fleet is not None and spec.topic_prefix is not None
    env_text = "".join(f"{k}={v}\n" for k, v in env.items())
    items.append(_item("client.env", _write(staging, "client.env", f"# edgemole client {spec.client_id}, written "
                                            "by 'edgemole flash'\n" + env_text), "0600", "config"))
    launcher = ("#!/bin/sh\n# edgemole client " + spec.client_id + ", written by 'edgemole flash': started by "
                + ("systemd" if service == "systemd" else "nohup") + "\nset -a\n. " + spec.path("client.env")
                + "\nset +a\ncd " + spec.root + "\nexec " + shlex.join(command) + "\n")
    items.append(_item("run.sh", _write(staging, "run.sh", launcher), "0755", "launcher"))
    if service == "systemd":
        unit = (f"[Unit]\nDescription=edgemole client {spec.client_id} ({spec.client}), written by 'edgemole "
                "flash'\nWants=network-online.target\nAfter=network-online.target\n\n[Service]\nType=exec\n"
                f"ExecStart=/bin/sh {spec.path('run.sh')}\nWorkingDirectory={spec.root}\nRestart=on-failure\n"
                "RestartSec=15\nTimeoutStopSec=180\nNoNewPrivileges=yes\n\n[Install]\nWantedBy=multi-user.target\n")
        items.append(_item(f"/etc/systemd/system/{spec.unit_name}", _write(staging, spec.unit_name, unit), "0644",
                           "unit"))
    return items
