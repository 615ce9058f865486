"""Helpers for the native client's tests: one build per test session, shared by every test that needs it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from conftest import TINY_AMOLE, spawn, write_client_data, write_config

from aggregator.checkpoint import SERVICE_JSON, STRATEGY_JSON, load_checkpoint
from edgemole.broker import free_port, mosquitto_binary, wait_for_port
from fleet.native import DEFAULT_BUILD, REPO, SOURCE, NativeBuildError, build_native
from fleet.simulate import stop_processes

_BUILT: dict[tuple, Path] = {}


def native_build(sanitize: bool = False) -> Path:
    """The build folder of the native client (built once per session); fails under CI when it cannot be built,
    skips elsewhere with the reason."""
    key = (sanitize,)
    if key not in _BUILT:
        if shutil.which("cmake") is None and not os.environ.get("CI"):
            pytest.skip("cmake and the native build dependencies are not installed (see devices/native/README.md)")
        build_dir = DEFAULT_BUILD.parent / ("native-asan" if sanitize else "native")
        try:
            _BUILT[key] = build_native(build_dir, sanitize=sanitize, build_type="Debug" if sanitize else
                                       "RelWithDebInfo")
        except NativeBuildError as exc:
            if os.environ.get("CI"):
                pytest.fail(f"the native client must build in CI: {exc}")
            pytest.skip(str(exc))
    return _BUILT[key]


_AARCH64: dict[tuple[str, ...], tuple[Path, list[str]]] = {}
#: the probe that runs an artifact's program on the runtime alone (devices/native/tests/program_probe.cpp)
PROGRAM_PROBE = "edgemole-program-probe"


def _aarch64_unavailable(reason: str) -> NoReturn:
    """Fail under CI, where the cross build must run (.ci/run installs it), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"the aarch64 cross build must run in CI: {reason}")
    pytest.skip(reason)


def native_build_aarch64(targets: tuple[str, ...] = (PROGRAM_PROBE,)) -> tuple[Path, list[str]]:
    """The aarch64 cross build of ``targets`` (devices/native/cross-build-aarch64.sh, once per session) and the
    command prefix that runs one of its binaries under qemu with the script's one-CPU sysroot (qemu-user hangs here
    on threads: see devices/native/README.md). Fails under CI and skips elsewhere when the cross toolchain, qemu or the
    cached aarch64 executorch wheel is missing; a failing compile always fails."""
    if targets in _AARCH64:
        return _AARCH64[targets]
    script = SOURCE / "cross-build-aarch64.sh"
    build_dir = DEFAULT_BUILD.parent / "native-aarch64"
    sysroot = build_dir / "qemu-sysroot"
    if shutil.which("qemu-aarch64") is None:
        _aarch64_unavailable("qemu-aarch64 is not installed (apt-get install -y qemu-user)")
    check = subprocess.run(["bash", str(script), "--check", "--sysroot", str(sysroot)], capture_output=True,
                           text=True, timeout=60, check=False)
    if check.returncode != 0:
        _aarch64_unavailable(" ".join(check.stderr.split()) or f"{script.name} --check failed")
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "edgemole-cross-build.log"
    cmd = ["bash", str(script), "--offline", "-B", str(build_dir), "--sysroot", str(sysroot)]
    for target in targets:
        cmd += ["--target", target]
    with open(build_dir / ".edgemole-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(log, "w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=1800, check=False)
    if proc.returncode == 4:
        _aarch64_unavailable(f"the aarch64 executorch wheel is not cached: run {script.relative_to(REPO)} "
                             "--fetch-only once (it downloads it)")
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        pytest.fail(f"the aarch64 cross build failed (log: {log}):\n{tail}")
    _AARCH64[targets] = (build_dir, ["qemu-aarch64", "-L", str(sysroot)])
    return _AARCH64[targets]


def run_fleet(tmp: Path, broker: str, model: str, artifact: Path, method: str, native: set[str],
              device: list[str], sizes: tuple[int, ...] = (30, 36, 42, 48), rounds: int = 3,
              timeout_s: float = 400, aggregator_args: Sequence[str] = (),
              device_args: dict[str, list[str]] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """An aggregator and clients c0, c1, ... (those in ``native`` run as ``device``: the edgemole-device command,
    possibly under qemu; the others as Python ExecuTorch-engine clients) through ``broker``; the aggregator's
    summary and its final state. ``aggregator_args`` are added to the aggregator's command line, ``device_args``
    [name] to a native client's (after ``--broker``, so that a ``--broker`` there wins)."""
    tmp.mkdir(parents=True, exist_ok=True)
    files, labels = write_client_data(tmp, list(sizes))
    config = write_config(tmp / "config.json", model, labels, {"dropout": False, "weight_decay": 0.01},
                          TINY_AMOLE, method=method, rounds=rounds, min_clients=len(sizes), round_deadline_s=300.0,
                          wait_clients_s=300.0)
    aggregator = spawn(["aggregator", "--broker", broker, "--config", str(config), "--json-out",
                        str(tmp / "summary.json"), "--checkpoint-dir", str(tmp / "checkpoints"), *aggregator_args],
                       tmp / "aggregator.log")
    procs = [aggregator]
    for k, (train, test) in enumerate(files):
        name = f"c{k}"
        if name in native:
            with open(tmp / f"{name}.log", "ab") as log:
                procs.append(subprocess.Popen(
                    [*device, "--broker", broker, "--client-id", name, "--fleet", "t", "--artifact", str(artifact),
                     "--data", str(train), "--test-data", str(test), "--threads", "1",
                     *(device_args or {}).get(name, [])],
                    stdout=log, stderr=subprocess.STDOUT))
        else:
            procs.append(spawn(["client", "--broker", broker, "--client-id", name, "--data", str(train),
                                "--test-data", str(test), "--fleet", "t", "--threads", "1", "--engine", "executorch",
                                "--artifact", str(artifact)], tmp / f"{name}.log"))
    deadline = time.monotonic() + timeout_s
    try:
        while aggregator.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("the fleet did not finish in time:\n" + _logs(tmp))
            time.sleep(0.5)
        assert aggregator.returncode == 0, _logs(tmp)
        for k, p in enumerate(procs[1:]):  # every client saw the end of the run and exited cleanly
            p.wait(30)
            assert p.returncode == 0, f"c{k} exited with {p.returncode}:\n" + _logs(tmp)
    finally:
        stop_processes(procs)
    loaded = load_checkpoint(tmp / "checkpoints", method=method)
    assert loaded is not None
    # the model state only: the checkpoint's JSON records (service timings, strategy extras) differ run to run
    state = {n: t for n, t in loaded[0].items() if n not in (STRATEGY_JSON, SERVICE_JSON)}
    return json.loads((tmp / "summary.json").read_text()), state


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(tmp.glob("*.log")))


class OwnMosquitto:
    """A Mosquitto that a test stops (or kills) and starts again on the same port, without persistence (as
    edgemole/broker.py's), or with the config file ``conf`` (its ports given)."""

    def __init__(self, directory: Path, anonymous: bool = True, conf: Path | None = None,
                 ports: Sequence[int] = ()) -> None:
        binary = mosquitto_binary()
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("mosquitto is not installed but CI is set: broker tests must run in CI")
            pytest.skip("mosquitto not installed (apt-get install -y mosquitto)")
        self.binary = binary
        self.port = ports[0] if ports else free_port()
        self.ports = list(ports) or [self.port]
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = directory / f"mosquitto-{self.port}.conf"
        if conf is not None:
            # as root Mosquitto drops to the "mosquitto" user, who cannot read a test's 0600 keys and 0700 folders
            self.conf.write_text(("user root\n" if os.geteuid() == 0 else "") + conf.read_text())
        else:
            lines = [f"listener {self.port} 127.0.0.1", "persistence false"]
            if anonymous:
                lines.append("allow_anonymous true")
            self.conf.write_text("\n".join(lines) + "\n")
        self.log = directory / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        for port in self.ports:
            wait_for_port("127.0.0.1", port, 10, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """kill -9: no will messages, no clean shutdown; without persistence every session and message is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
