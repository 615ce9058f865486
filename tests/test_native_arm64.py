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


# -- the whole client under qemu: one round against the Python client, and a fleet member through Mosquitto --------


@pytest.fixture(scope="module")
def arm_device() -> list[str]:
    """The aarch64 edgemole-device under qemu, as a command prefix."""
    build, qemu = native_build_aarch64(targets=("edgemole-device",))
    assert elf_machine(build / "edgemole-device") == EM_AARCH64
    return [*qemu, str(build / "edgemole-device")]


def test_client_round_under_qemu_equals_the_python_round(arm_device: list[str], tmp_path: Path, tiny_model: str,
                                                         tiny_artifacts: dict[str, Path]) -> None:
    """A whole fedamole-a2 round (probe, rank selection, masked training, RSEA) on the aarch64 build."""
    import torch
    from conftest import TINY_AMOLE, tiny_task, write_client_data
    from test_native_client import native_round, python_round

    from edgemole.protocol import decode

    task = tiny_task(tiny_model, "fedamole-a2", TINY_AMOLE, weight_decay=0.01, local_steps=3)
    files, _ = write_client_data(tmp_path, [24])
    task_payload, assign_payload, py_update, py_losses = python_round(task, tiny_artifacts["amole"], files[0],
                                                                      "train-B", 1, 1)
    arm_update, arm_losses = native_round(tmp_path, tiny_artifacts["amole"], files[0], task_payload, assign_payload,
                                          1, arm_device)
    assert arm_losses == pytest.approx(py_losses, rel=1e-5)
    a, b = decode(py_update), decode(arm_update)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name, t in a.tensors.items():
        assert torch.allclose(b.tensors[name].to(t.dtype), t, rtol=1e-4, atol=1e-5), name


def test_client_under_qemu_is_a_fleet_member(arm_device: list[str], tmp_path: Path, mosquitto: str, tiny_model: str,
                                             tiny_artifacts: dict[str, Path]) -> None:
    """The aarch64 client joins a fleet through Mosquitto on loopback next to a Python client: a round of
    fedamole-a2 and the final evaluation complete with both."""
    from native import run_fleet

    summary, state = run_fleet(tmp_path, mosquitto, tiny_model, tiny_artifacts["amole"], "fedamole-a2", {"c1"},
                               arm_device, sizes=(24, 30), rounds=1, timeout_s=600)
    assert summary["rounds"][0]["answered"] == ["c0", "c1"]
    assert summary["final"]["answered"] == ["c0", "c1"] and summary["rejected"] == {}
    assert any(n.endswith("lora_B") and bool(t.abs().sum() > 0) for n, t in state.items())
