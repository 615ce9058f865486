"""Helpers for the native client's tests: one build per test session, shared by every test that needs it."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

from edgemole.native import DEFAULT_BUILD, REPO, SOURCE, NativeBuildError, build_native

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
