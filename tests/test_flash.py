"""``edgemole flash``: the plan (dry run), the install steps on a device, and every failure as one line.

No phone exists here. The real ``adb`` client is run for its own error paths (no device, no server); the install
steps on a phone are run through a stand-in ``adb`` script that executes the shell commands and copies on this
machine (a mock below adb's command line, whose real use the error-path tests cover). Boards over real SSH are
tested in tests/test_fleet_hosts.py; here only what needs no sshd (refused connection, dry run, the bundle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from edgemole.broker import free_port

FAKE_ADB = r"""#!/bin/sh
# stand-in for adb: 'adb -s SERIAL CMD ...' against this machine (FAKE_* variables shape the phone's answers)
shift 2
case "$1" in
  get-state) echo "${FAKE_STATE:-device}"; [ "${FAKE_STATE:-device}" = device ] ;;
  shell)
    # a chatty login shell: a warning on stderr before every command's answer
    if [ -n "$FAKE_NOISE" ]; then echo "pyenv: cannot rehash: /root/.pyenv/shims isn't writable" >&2; fi
    case "$2" in
      "getprop ro.product.cpu.abi") echo "${FAKE_ABI:-arm64-v8a}" ;;
      df*) if [ -n "$FAKE_FREE_KB" ]; then echo "Filesystem 1K-blocks Used Available Use% Mounted on"
             echo "/dev/block/dm-5 1000 10 $FAKE_FREE_KB 1% /data"; else sh -c "$2"; fi ;;
      *) sh -c "$2" ;;
    esac ;;
  push) cp "$2" "$3" && if [ -n "$FAKE_CORRUPT" ]; then echo corrupt >> "$3"; fi ;;
  *) echo "fake adb: unexpected $*" >&2; exit 1 ;;
esac
"""


def _elf(path: Path, machine: int) -> Path:
    """A file with just an ELF header for ``machine`` (flash reads the architecture from it; never run)."""
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    header[18:20] = machine.to_bytes(2, "little")
    path.write_bytes(bytes(header) + b"\0" * 1024)
    path.chmod(0o755)
    return path


@pytest.fixture
def phone_kit(tmp_path: Path, tiny_artifacts: dict[str, Path]) -> dict[str, Path]:
    """An Android build folder (aarch64 header and one library), a data file and a stand-in adb."""
    native = tmp_path / "android-build"
    (native / "lib").mkdir(parents=True)
    _elf(native / "edgemole-device", 0xB7)
    (native / "lib" / "libexecutorch.so").write_bytes(b"lib" * 100)
    data = tmp_path / "local.csv"
    data.write_text("text,label\nhello there,greet\nbye now,leave\n")
    adb = tmp_path / "adb"
    adb.write_text(FAKE_ADB)
    adb.chmod(0o755)
    return {"native": native, "data": data, "adb": adb, "artifact": tiny_artifacts["lora"], "phone": tmp_path / "phone"}


def _flash(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet", "flash", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=REPO, timeout=timeout)


def _android(kit: dict[str, Path], *extra: str) -> list[str]:
    return ["android", "--serial", "R58M", "--adb", str(kit["adb"]), "--dir", str(kit["phone"]), "--client-id",
            "phone-1", "--artifact", str(kit["artifact"]), "--native-dir", str(kit["native"]), "--data",
            str(kit["data"]), "--broker", "mqtts://10.1.1.1:8883", *extra]


def _one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_android_dry_run_prints_the_plan_and_touches_nothing(phone_kit: dict[str, Path]) -> None:
    proc = _flash(_android(phone_kit, "--adb", "/nonexistent/adb", "--dry-run"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "phone R58M" in out and "getprop ro.product.cpu.abi) is arm64-v8a" in out
    for remote in ("artifact/base.ptd", "artifact/program.pte", "artifact/manifest.json", "bin/edgemole-device",
                   "lib/libexecutorch.so", "data/train.csv", "device.json", "run.sh"):
        assert f"push {remote} " in out
    assert "inference.onnx" not in out  # the device does not need the ONNX model
    assert "nohup" in out and "check the sha256 of every pushed file" in out
    assert not phone_kit["phone"].exists()


def test_android_dry_run_json_lists_every_file_with_its_hash(phone_kit: dict[str, Path]) -> None:
    proc = _flash(_android(phone_kit, "--dry-run", "--json"))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    files = {f["remote"]: f for f in plan["files"]}
    base = phone_kit["artifact"] / "base.ptd"
    assert files["artifact/base.ptd"]["sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert plan["service"] == "nohup" and plan["dry_run"]


def test_android_install_verifies_skips_what_matches_and_never_resends_the_base(phone_kit: dict[str, Path]) -> None:
    first = _flash(_android(phone_kit, "--no-start", "--json"))
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    phone = phone_kit["phone"]
    assert "artifact/base.ptd" in result["pushed"] and result["skipped"] == [] and not result["started"]
    assert (phone / "artifact" / "base.ptd").read_bytes() == (phone_kit["artifact"] / "base.ptd").read_bytes()
    assert not list(phone.rglob("*.part"))
    assert oct((phone / "bin" / "edgemole-device").stat().st_mode & 0o777) == "0o755"
    config = json.loads((phone / "device.json").read_text())
    assert config["artifact"] == f"{phone}/artifact" and config["data"] == f"{phone}/data/train.csv"
    assert config["client_id"] == "phone-1" and config["keep_serving"] is True
    # a new data file: only it is sent again
    phone_kit["data"].write_text("text,label\nhello again,greet\nsee you,leave\n")
    second = json.loads(_flash(_android(phone_kit, "--no-start", "--json")).stdout)
    assert second["pushed"] == ["data/train.csv"]
    assert "artifact/base.ptd" in second["skipped"] and "bin/edgemole-device" in second["skipped"]


def test_warnings_a_login_shell_prints_on_stderr_are_not_read_as_answers(phone_kit: dict[str, Path]) -> None:
    """A board's profile may print on every command (in CI: pyenv's rehash racing another SSH session); flash reads
    only the commands' own output, and still names a real fault."""
    proc = _flash(_android(phone_kit, "--no-start", "--json"), env={"FAKE_NOISE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "artifact/base.ptd" in json.loads(proc.stdout)["pushed"]
    line = _one_error(_flash(_android(phone_kit), env={"FAKE_NOISE": "1", "FAKE_FREE_KB": "100"}))
    assert "no space: 100.0 KiB free" in line, line


def test_android_hash_mismatch_after_push_installs_nothing(phone_kit: dict[str, Path]) -> None:
    line = _one_error(_flash(_android(phone_kit), env={"FAKE_CORRUPT": "1"}))
    assert "hash mismatch after push" in line and "nothing was installed or started" in line
    phone = phone_kit["phone"]
    assert not (phone / "run.sh").exists() and not (phone / "artifact" / "base.ptd").exists()
    assert not list(phone.rglob("*.part")) and not (phone / "run" / "client.pid").exists()


@pytest.mark.parametrize(("env", "expected"), [
    ({"FAKE_ABI": "x86_64"}, "the device is x86_64, the native client is built for arm64-v8a"),
    ({"FAKE_STATE": "unauthorized"}, "unauthorized: accept the USB debugging prompt"),
    ({"FAKE_FREE_KB": "100"}, "no space: 100.0 KiB free"),
])
def test_android_device_faults_are_one_line(phone_kit: dict[str, Path], env: dict[str, str], expected: str) -> None:
    line = _one_error(_flash(_android(phone_kit), env=env))
    assert expected in line, line
    assert not (phone_kit["phone"] / "run.sh").exists()


def test_android_client_that_exits_at_start_is_reported_with_its_log(phone_kit: dict[str, Path]) -> None:
    """The stand-in build is a bare ELF header: the shell cannot run it, and flash says so."""
    line = _one_error(_flash(_android(phone_kit)))
    assert "phone R58M: the client exited at start" in line


@pytest.fixture
def real_adb() -> Iterator[tuple[str, dict[str, str]]]:
    """The real adb client, with its own server on a free loopback port (a developer's phones and adb server are
    never touched); the server is stopped afterwards."""
    adb = shutil.which("adb")
    if adb is None:
        if os.environ.get("CI"):
            pytest.fail("adb is not installed but CI is set (apt-get install adb)")
        pytest.skip("adb not installed")
    env = {"ANDROID_ADB_SERVER_PORT": str(free_port())}
    yield adb, env
    subprocess.run([adb, "kill-server"], capture_output=True, timeout=30, check=False, env={**os.environ, **env})


def test_real_adb_without_a_device_exits_2_with_one_line(phone_kit: dict[str, Path], real_adb) -> None:  # noqa: ANN001
    adb, env = real_adb
    args = _android(phone_kit)
    args[args.index("--adb") + 1] = adb
    line = _one_error(_flash(args, env=env))
    assert "phone R58M: no such device" in line


def test_real_adb_without_a_server_exits_2_with_one_line(phone_kit: dict[str, Path], real_adb) -> None:  # noqa: ANN001
    args = _android(phone_kit)
    args[args.index("--adb") + 1] = real_adb[0]
    # a server address that adb cannot start a server on and where nothing listens
    line = _one_error(_flash(args, env={"ADB_SERVER_SOCKET": f"tcp:127.0.0.2:{free_port()}"}))
    assert "phone R58M: no adb server" in line


def test_missing_adb_and_missing_native_build_are_one_line(phone_kit: dict[str, Path]) -> None:
    line = _one_error(_flash(_android(phone_kit, "--adb", "/nonexistent/adb")))
    assert "no '/nonexistent/adb' client" in line
    args = [a for a in _android(phone_kit) if a not in ("--native-dir", str(phone_kit["native"]))]
    assert "flash android needs --native-dir" in _one_error(_flash(args))


def test_board_ssh_refused_is_one_line(tmp_path: Path, phone_kit: dict[str, Path]) -> None:
    if shutil.which("ssh") is None:
        if os.environ.get("CI"):
            pytest.fail("ssh is not installed but CI is set")
        pytest.skip("ssh not installed")
    port = free_port()  # nothing listens there
    line = _one_error(_flash(["board", "--host", "127.0.0.1", "--port", str(port), "--client-id", "pi-1",
                              "--client", "python", "--python", "/usr/bin/python3", "--data", str(phone_kit["data"]),
                              "--broker", "mqtt://127.0.0.1:1883", "--dir", str(tmp_path / "board")]))
    assert "board 127.0.0.1: SSH failed" in line and "refused" in line.lower()


def test_board_dry_run_with_systemd_and_broker_credentials(tmp_path: Path, phone_kit: dict[str, Path]) -> None:
    from edgemole.security import init_broker_dir

    init_broker_dir(tmp_path / "pki", "farm", ["pi-7"], host="10.0.0.5")
    creds = tmp_path / "pki" / "devices" / "pi-7"
    proc = _flash(["board", "--host", "pi-7.local", "--client-id", "pi-7", "--credentials", str(creds),
                   "--artifact", str(phone_kit["artifact"]), "--native-dir", str(phone_kit["native"]),
                   "--data", str(phone_kit["data"]), "--service", "systemd", "--dry-run", "--json"])
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    files = {f["remote"] for f in plan["files"]}
    assert {"credentials/ca.crt", "credentials/client.crt", "credentials/client.key",
            "/etc/systemd/system/edgemole-pi-7.service"} <= files
    steps = "\n".join(plan["steps"])
    assert "uname -m) is aarch64" in steps and "systemctl restart edgemole-pi-7.service" in steps
    # the wrong device's credentials are refused before anything is contacted
    line = _one_error(_flash(["board", "--host", "h", "--client-id", "pi-8", "--credentials", str(creds),
                              "--artifact", str(phone_kit["artifact"]), "--native-dir", str(phone_kit["native"]),
                              "--data", str(phone_kit["data"]), "--dry-run"]))
    assert "are 'pi-7''s, not 'pi-8''s" in line


def test_native_config_takes_broker_and_fleet_from_the_credentials(tmp_path: Path, phone_kit: dict[str, Path]) -> None:
    from edgemole.security import init_broker_dir
    from fleet.flash.bundle import DeviceSpec, build_bundle

    init_broker_dir(tmp_path / "pki", "farm", ["pi-7"], host="10.0.0.5")
    spec = DeviceSpec("board", "pi-7", "/opt/em", "native", artifact=phone_kit["artifact"], data=phone_kit["data"],
                      credentials=tmp_path / "pki" / "devices" / "pi-7", native_dir=phone_kit["native"])
    spec.check()
    staging = tmp_path / "staging"
    staging.mkdir()
    items = {i.remote: i for i in build_bundle(spec, staging, "nohup")}
    config = json.loads(items["device.json"].source.read_text())
    assert config["broker"].startswith("mqtts://10.0.0.5") and config["fleet"] == "farm"
    assert config["cert_file"] == "/opt/em/credentials/client.crt" and config["key_file"].startswith("/opt/em/")
    assert items["credentials/client.key"].mode == "0600" and items["device.json"].mode == "0600"
    assert "LD_LIBRARY_PATH=/opt/em/lib" in items["client.env"].source.read_text()


@pytest.mark.parametrize(("args", "expected"), [
    (["--client-id", "bad id"], "--client-id 'bad id'"),
    (["--dir", "relative/dir"], "--dir 'relative/dir'"),
    (["--broker", "http://x"], "http://x"),
    (["--threads", "0"], "--threads must be in [1, 256]"),
])
def test_bad_flags_are_one_line(phone_kit: dict[str, Path], args: list[str], expected: str) -> None:
    base = _android(phone_kit, "--dry-run")
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in base:
            base[base.index(flag) + 1] = value
        else:
            base += [flag, value]
    assert expected in _one_error(_flash(base))


def test_client_kind_flags_that_do_not_fit_are_one_line(phone_kit: dict[str, Path]) -> None:
    base = ["board", "--host", "h", "--client-id", "pi-1", "--data", str(phone_kit["data"]), "--broker",
            "mqtt://10.0.0.1:1883", "--dry-run"]
    line = _one_error(_flash([*base, "--client", "python", "--native-dir", str(phone_kit["native"])]))
    assert "--native-dir is for --client native" in line
    line = _one_error(_flash([*base, "--artifact", str(phone_kit["artifact"]), "--python", "/usr/bin/python3"]))
    assert "--python is for --client python" in line
