"""Finding and building the native device client (``devices/native``, C++17 on the ExecuTorch runtime).

``edgemole simulate --native-clients N`` and the tests need the ``edgemole-device`` binary; a user who installed it
puts it on ``PATH``; from a source checkout it is built with CMake into ``build/native`` (against the installed
``executorch`` wheel's runtime) the first time it is needed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from edgemole.errors import EdgemoleError

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "devices" / "native"
DEFAULT_BUILD = REPO / "build" / "native"
BINARY = "edgemole-device"


class NativeBuildError(EdgemoleError):
    """The native client cannot be built here (missing compiler, CMake, Paho C, ...)."""


def build_native(build_dir: Path = DEFAULT_BUILD, *, sanitize: bool = False, build_type: str = "RelWithDebInfo",
                 targets: tuple[str, ...] = (), jobs: int | None = None, extra: tuple[str, ...] = ()) -> Path:
    """Configure and build the native client into ``build_dir`` (incrementally; concurrent callers wait on a file
    lock) and return ``build_dir``. A failure is one :class:`NativeBuildError` line naming the failing step and
    the log file."""
    if shutil.which("cmake") is None:
        raise NativeBuildError("cmake is not installed (Debian: apt-get install -y cmake g++ libpaho-mqtt-dev "
                               "nlohmann-json3-dev libutf8proc-dev libssl-dev zlib1g-dev doctest-dev)")
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "edgemole-build.log"
    configure = ["cmake", "-S", str(SOURCE), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={build_type}",
                 f"-DEDGEMOLE_SANITIZE={'ON' if sanitize else 'OFF'}", *extra]
    build = ["cmake", "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 1)]
    for target in targets:
        build += ["--target", target]
    with open(build_dir / ".edgemole-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(log, "w") as out:
            for step, cmd in (("configure", configure), ("build", build)):
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
                if proc.returncode != 0:
                    out.flush()
                    tail = [ln for ln in log.read_text(errors="replace").splitlines() if "error" in ln.lower()]
                    hint = f": {tail[0][:200]}" if tail else ""
                    raise NativeBuildError(f"cannot {step} the native client (log: {log}){hint}")
    return build_dir


def find_native_binary(build_dir: Path = DEFAULT_BUILD, build: bool = True) -> Path:
    """``edgemole-device`` from ``PATH``, else from ``build_dir`` (built first when ``build`` and missing)."""
    on_path = shutil.which(BINARY)
    if on_path:
        return Path(on_path)
    binary = Path(build_dir) / BINARY
    if not binary.exists() and build:
        build_native(build_dir, targets=(BINARY,))
    if not binary.exists():
        raise NativeBuildError(f"no {BINARY} on PATH or in {build_dir} (build it: see devices/native/README.md)")
    return binary
