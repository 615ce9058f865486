"""How ``edgemole flash`` reaches a device: a shell and a file copy over the real ``adb`` client (phones) or the
OpenSSH client (boards). Everything above this module is the same for both kinds of device.

Every failure of the tool itself (no device, an unauthorized phone, no adb server, SSH refused, a host key that does
not match) becomes one :class:`FlashError` line that names the device and the tool's own words.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from edgemole.errors import EdgemoleError

#: seconds one remote command or copy may take (a 100 MB push over USB 2 or a slow Wi-Fi link fits)
COMMAND_TIMEOUT_S = 900.0


class FlashError(EdgemoleError):
    """A device that cannot be reached, checked or written to; nothing that was half-installed is started."""


@dataclass
class Result:
    """A remote command's exit status and its output. Only ``out`` (stdout) is ever parsed: a board's login shell
    may print to stderr on any command (a profile's warnings, a pyenv rehash racing another session), and that must
    not be read as the command's answer."""

    returncode: int
    out: str
    err: str = ""

    @property
    def text(self) -> str:
        """Everything the command printed, for error messages."""
        return "\n".join(part for part in (self.out, self.err) if part)


def tool_line(text: str) -> str:
    """The tool's own explanation: its last non-empty line that says something (adb and ssh print the reason last,
    after warnings)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith(("error", "ssh:", "fatal"))]
    return (errors or lines or ["no output"])[-1][:300]


class Transport(ABC):
    """A shell on the device and a way to put a local file at a path there."""

    #: what the device is called in messages, e.g. ``phone R58M123`` or ``board pi-01.local``
    name: str

    @abstractmethod
    def connect(self) -> None:
        """Check that the device is there and lets us in; one :class:`FlashError` line otherwise."""

    @abstractmethod
    def shell(self, command: str) -> Result:
        """Run ``command`` (a POSIX shell command line) on the device."""

    @abstractmethod
    def push(self, local: Path, remote: str) -> None:
        """Copy ``local`` to the device's ``remote`` path (its folder exists)."""

    def close(self) -> None:
        """Release what the transport keeps open between commands (nothing by default)."""
        return None

    def check(self, command: str, what: str) -> str:
        """``command``'s output, or a :class:`FlashError` saying ``what`` failed and why."""
        res = self.shell(command)
        if res.returncode != 0:
            raise FlashError(f"{self.name}: {what} failed: {tool_line(res.text)}")
        return res.out


def _run(argv: list[str], name: str, stdin: Path | None = None) -> Result:
    try:
        with open(stdin, "rb") if stdin else open(os.devnull, "rb") as source:
            proc = subprocess.run(argv, stdin=source, capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise FlashError(f"{name}: no answer within {COMMAND_TIMEOUT_S:.0f} s ({shlex.join(argv[:4])} ...)") from None
    return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"))


@dataclass
class AdbTransport(Transport):
    """A phone through the ``adb`` client (which talks to the adb server, which talks to the phone)."""

    serial: str
    adb: str = "adb"
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"phone {self.serial}"

    def _argv(self, *args: str) -> list[str]:
        return [self.adb, "-s", self.serial, *args]

    def connect(self) -> None:
        if shutil.which(self.adb) is None:
            raise FlashError(f"{self.name}: no '{self.adb}' client (Debian: apt-get install adb)")
        res = _run(self._argv("get-state"), self.name)
        state = res.out.strip().splitlines()[-1].strip() if res.out.strip() else ""
        if res.returncode == 0 and state == "device":
            return
        text = res.text.lower()
        if "unauthorized" in text or state == "unauthorized":
            raise FlashError(f"{self.name}: unauthorized: accept the USB debugging prompt on the phone, then retry")
        if "cannot connect to daemon" in text or "cannot start server" in text:
            raise FlashError(f"{self.name}: no adb server: {tool_line(res.text)}")
        if "not found" in text or "no devices" in text:
            raise FlashError(f"{self.name}: no such device (adb devices lists the connected ones; is USB "
                             "debugging on?)")
        raise FlashError(f"{self.name}: not ready ({state or tool_line(res.text)})")

    def shell(self, command: str) -> Result:
        # adb shell passes the exit status of the command through since Android 7 (shell protocol v2)
        return _run(self._argv("shell", command), self.name)

    def push(self, local: Path, remote: str) -> None:
        res = _run(self._argv("push", str(local), remote), self.name)
        if res.returncode != 0:
            raise FlashError(f"{self.name}: copying {local.name} failed: {tool_line(res.text)}")


@dataclass
class SshTransport(Transport):
    """A board through the OpenSSH client, in batch mode (key or agent; never a password prompt)."""

    host: str
    user: str | None = None
    port: int | None = None
    identity: str | None = None
    options: list[str] = field(default_factory=list)
    #: run every command through ``sudo -n`` (a user that may sudo without a password, e.g. Raspberry Pi OS's first
    #: user, where root cannot log in)
    sudo: bool = False
    ssh: str = "ssh"
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"board {self.host}"
        for opt in self.options:
            if "=" not in opt or opt.startswith("-"):
                raise FlashError(f"--ssh-option {opt!r}: expected KEY=VALUE, e.g. StrictHostKeyChecking=accept-new")
        # one SSH connection for all of a flash's commands (a login costs about 0.5 s of the board's CPU), through a
        # control socket in a private folder; close() ends it
        self._control = tempfile.mkdtemp(prefix="edgemole-ssh-")

    def _base(self) -> list[str]:
        argv = [self.ssh, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15",
                "-o", "ControlMaster=auto", "-o", f"ControlPath={self._control}/%C", "-o", "ControlPersist=60"]
        for opt in self.options:
            argv += ["-o", opt]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.identity:
            argv += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.user:
            argv += ["-l", self.user]
        return argv

    def _argv(self, command: str) -> list[str]:
        if self.sudo:
            command = f"sudo -n sh -c {shlex.quote(command)}"
        return [*self._base(), "--", self.host, command]

    def close(self) -> None:
        subprocess.run([*self._base(), "-O", "exit", "--", self.host], capture_output=True, timeout=30, check=False)
        shutil.rmtree(self._control, ignore_errors=True)

    def connect(self) -> None:
        if shutil.which(self.ssh) is None:
            raise FlashError(f"{self.name}: no '{self.ssh}' client (Debian: apt-get install openssh-client)")
        if self.identity and not Path(self.identity).is_file():
            raise FlashError(f"--identity {self.identity}: no such file")
        res = _run([*self._base(), "--", self.host, "echo edgemole-ok"], self.name)
        if res.returncode != 0 or "edgemole-ok" not in res.out:
            raise FlashError(f"{self.name}: SSH failed: {tool_line(res.text)}")
        if self.sudo and _run(self._argv("true"), self.name).returncode != 0:
            raise FlashError(f"{self.name}: sudo asks for a password (or is missing): let this user sudo without one "
                             "(NOPASSWD) or log in as root")

    def shell(self, command: str) -> Result:
        res = _run(self._argv(command), self.name)
        if res.returncode == 255:  # ssh's own failure (connection lost, refused), not the command's
            raise FlashError(f"{self.name}: SSH failed: {tool_line(res.text)}")
        return res

    def push(self, local: Path, remote: str) -> None:
        # through ssh's stdin, so a board needs no scp/sftp subsystem
        res = _run(self._argv(f"cat > {shlex.quote(remote)}"), self.name, stdin=local)
        if res.returncode != 0:
            raise FlashError(f"{self.name}: copying {local.name} failed: {tool_line(res.text)}")
