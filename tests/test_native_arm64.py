"""The native client cross-built for aarch64 boards and run under qemu-user: the same numbers as on x86-64.

A board runs the same C++ sources against the aarch64 build of the same ExecuTorch runtime; these tests run that
build under qemu (with the one-CPU sysroot of devices/native/cross-build-aarch64.sh, as qemu hangs on threads here)
so that an ARM-only difference (kernels, XNNPACK's NEON paths, alignment) shows up in CI rather than on a board.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from native import PROGRAM_PROBE, native_build, native_build_aarch64

#: the ELF e_machine values of the two builds
EM_X86_64, EM_AARCH64 = 62, 183
#: seconds one run of the probe may take (emulated: a few seconds)
RUN_TIMEOUT = 300


def elf_machine(binary: Path) -> int:
    """The ELF header's e_machine (little-endian ELF64): which CPU the binary is for."""
    header = binary.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{binary} is not an ELF file"
    return int.from_bytes(header[18:20], "little")


def run_probe(prefix: list[str], binary: Path, artifact: Path) -> dict:
    """The probe's JSON line for ``artifact`` (``prefix`` runs it under qemu, or is empty)."""
    proc = subprocess.run([*prefix, str(binary), str(artifact)], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False)
    assert proc.returncode == 0, f"{binary.name} failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def aarch64() -> tuple[Path, list[str]]:
    """The aarch64 build folder and the qemu command prefix."""
    return native_build_aarch64()


@pytest.fixture(scope="module")
def host_probe() -> Path:
    """The x86-64 build of the probe."""
    return native_build() / "tests" / PROGRAM_PROBE


# -- the runtime alone: one forward of the joint graph -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["amole", "lora"])
def test_program_under_qemu_matches_x86_64(aarch64: tuple[Path, list[str]], host_probe: Path,
                                           tiny_artifacts: dict[str, Path], kind: str) -> None:
    build, qemu = aarch64
    arm_probe = build / "tests" / PROGRAM_PROBE
    assert elf_machine(arm_probe) == EM_AARCH64
    assert elf_machine(host_probe) == EM_X86_64
    artifact = tiny_artifacts[kind]
    arm = run_probe(qemu, arm_probe, artifact)
    host = run_probe([], host_probe, artifact)

    manifest = json.loads((artifact / "manifest.json").read_text())
    trainable = [t["name"] for t in manifest["tensors"]]
    for result in (arm, host):
        assert result["adapter"] == manifest["adapter"]
        assert result["fqn"] == trainable
        assert result["gradients"] == result["parameters"] == len(trainable)
        assert math.isfinite(result["loss"]) and result["loss"] > 0
        assert result["gradient_sq_sum"] > 0
    assert arm["loss"] == pytest.approx(host["loss"], rel=1e-5)
    assert arm["gradient_sq_sum"] == pytest.approx(host["gradient_sq_sum"], rel=1e-4)


def test_host_probe_matches_python_runtime(host_probe: Path, tiny_artifacts: dict[str, Path]) -> None:
    """The probe's constant inputs give the loss that the Python bindings of the same runtime give."""
    import torch
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    artifact = tiny_artifacts["amole"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    shape = manifest["shape"]
    b, t = shape["batch_size"], shape["max_length"]
    module = _load_for_executorch(str(artifact / "program.pte"), str(artifact / "base.ptd"))
    inputs = (torch.zeros(b, t, dtype=torch.long), torch.ones(b, t, dtype=torch.long), torch.zeros(b, dtype=torch.long),
              torch.ones(len(shape["amole_modules"]), shape["slots"], dtype=torch.bool))
    expected = float(module.forward(inputs)[0])
    assert run_probe([], host_probe, artifact)["loss"] == pytest.approx(expected, rel=1e-6)


def test_probe_rejects_a_folder_without_artifact(aarch64: tuple[Path, list[str]], tmp_path: Path) -> None:
    build, qemu = aarch64
    proc = subprocess.run([*qemu, str(build / "tests" / PROGRAM_PROBE), str(tmp_path)], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: no manifest.json in {tmp_path}"


def test_sysroot_reports_one_cpu(aarch64: tuple[Path, list[str]]) -> None:
    """What keeps the runtime's thread pool from starting workers under qemu (which hangs on threads here)."""
    _, qemu = aarch64
    sysroot = Path(qemu[qemu.index("-L") + 1])
    for name in ("online", "possible", "present", "kernel_max"):
        assert (sysroot / "sys" / "devices" / "system" / "cpu" / name).read_text().strip() == "0"
    assert elf_machine(sysroot / "lib" / "ld-linux-aarch64.so.1") == EM_AARCH64


# -- the client as a fleet member under qemu: to come (edgemole-device, built with targets=("edgemole-device",)) ------
