"""Putting a bundle on a device and running its client: the same steps for a phone (adb) and a board (SSH).

Install, in order, so that nothing half-installed is ever started:

1. connect (the device is there and lets us in), check its architecture against the native client's ELF header
   (or that the board's Python has edgemole), create the folder and check its free space;
2. ask the device for the sha256 of every file it already has; a file whose hash matches is skipped (a re-flash
   with a new adapter configuration never re-sends the 91 MB base);
3. push each changed file next to its place as ``<file>.part`` and check the ``.part`` files' sha256 on the device;
   a mismatch removes them and stops here;
4. stop the running client, move the ``.part`` files into place (``mv`` within one folder), start the client and
   check that it is still alive two seconds later (a client that exits at once, e.g. on a bad config, is reported
   with the last line of its log).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from fleet.flash.bundle import DEFAULT_PYTHON, NATIVE_BINARY, DeviceSpec, Item, elf_machine
from fleet.flash.transport import FlashError, Transport, tool_line
from fleet.units import fmt_bytes

#: seconds a stopped client has to exit after SIGTERM before it is killed: it finishes the round in hand, which takes
#: minutes on a slow board (as the systemd unit's TimeoutStopSec)
STOP_WAIT_S = 180
#: free space kept on the device beyond what the push needs (the .part copies sit beside the old files)
SPACE_MARGIN = 16 * 2**20


@dataclass
class Installer:
    """Runs the install / start / stop / status of one device's bundle through a transport."""

    transport: Transport
    spec: DeviceSpec
    items: list[Item]
    service: str  # "systemd" or "nohup" (resolved; "auto" is decided before)
    say: Callable[[str], None] = print
    report: dict[str, Any] = field(default_factory=dict)

    # -- remote paths ------------------------------------------------------------------------
    def remote(self, item: Item) -> str:
        return item.remote if item.remote.startswith("/") else self.spec.path(item.remote)

    @property
    def pid_file(self) -> str:
        return self.spec.path("run/client.pid")

    @property
    def log_file(self) -> str:
        return self.spec.path("log/client.log")

    # -- the plan, for --dry-run -----------------------------------------------------------------
    def plan(self, action: str, start: bool) -> list[str]:
        """Every action ``action`` would take, in order, without contacting the device."""
        steps = [f"connect to {self.transport.name}"]
        if action == "install":
            steps += self._check_steps()
            steps.append(f"ask the device for the sha256 of its {len(self.items)} files")
            for item in self.items:
                steps.append(f"push {item.remote} ({fmt_bytes(item.size)}, mode {item.mode}) to "
                             f"{self.remote(item)}.part unless the device has sha256 {item.sha256[:12]}...")
            steps.append("check the sha256 of every pushed file on the device; remove them all on a mismatch")
            steps.append(f"if any file changed: stop the running client ({self._service_words()}) and move the "
                         "pushed files into place")
            if start:
                steps += self._start_steps()
            else:
                steps.append("leave the client stopped (--no-start)")
        elif action == "start":
            steps += self._start_steps()
        elif action == "stop":
            steps.append(f"stop the client ({self._service_words()})")
        else:
            steps.append(f"report whether the client runs ({self._service_words()}) and its log's last lines")
        return steps

    def _check_steps(self) -> list[str]:
        out = []
        if self.spec.client == "native":
            arch = elf_machine(next(i.source for i in self.items if i.remote == f"bin/{NATIVE_BINARY}"))
            probe = "getprop ro.product.cpu.abi" if self.spec.target == "android" else "uname -m"
            want = arch[1] if self.spec.target == "android" else arch[0]
            out.append(f"check the device's architecture ({probe}) is {want}")
        else:
            out.append(f"check that {self._python()} on the board runs edgemole")
        total = sum(i.size for i in self.items)
        out.append(f"create {self.spec.root} and check its free space (at most {fmt_bytes(total)} to push)")
        return out

    def _start_steps(self) -> list[str]:
        if self.service == "systemd":
            return [f"systemctl daemon-reload; systemctl enable {self.spec.unit_name}; systemctl restart "
                    f"{self.spec.unit_name}", "check that the unit is active 2 s later"]
        return [f"start {self.spec.path('run.sh')} with nohup, output to {self.log_file}, PID in {self.pid_file}",
                "check that the client is alive 2 s later"]

    def _service_words(self) -> str:
        return f"systemd unit {self.spec.unit_name}" if self.service == "systemd" else f"PID file {self.pid_file}"

    def _python(self) -> str:
        return self.spec.python or DEFAULT_PYTHON

    # -- install -------------------------------------------------------------------------------
    def install(self, start: bool) -> dict[str, Any]:
        self.transport.connect()
        self._check_device()
        remote_hashes = self._remote_hashes([self.remote(i) for i in self.items])
        changed = [i for i in self.items if remote_hashes.get(self.remote(i)) != i.sha256]
        for item in self.items:
            if item not in changed:
                self.say(f"  same    {item.remote} ({fmt_bytes(item.size)})")
        dirs = sorted({str(PurePosixPath(self.remote(i)).parent) for i in changed}
                      | {self.spec.path(d) for d in ("run", "log", "state")})
        self.transport.check("mkdir -p " + " ".join(shlex.quote(d) for d in dirs), "creating the folders")
        self._check_space(sum(i.size for i in changed))
        for item in changed:
            self.say(f"  push    {item.remote} ({fmt_bytes(item.size)})")
            self.transport.push(item.source, self.remote(item) + ".part")
        self._verify_parts(changed)
        was_running = self._running()
        if changed:
            self._stop()
            moves = " && ".join(f"chmod {i.mode} {shlex.quote(self.remote(i) + '.part')} && mv -f "
                                f"{shlex.quote(self.remote(i) + '.part')} {shlex.quote(self.remote(i))}"
                                for i in changed)
            self.transport.check(moves, "moving the files into place")
        started = False
        if start and not self._running():
            self._start()
            started = True
        self.report.update(device=self.transport.name, client_id=self.spec.client_id, client=self.spec.client,
                           service=self.service, dir=self.spec.root, pushed=[i.remote for i in changed],
                           skipped=[i.remote for i in self.items if i not in changed],
                           bytes_pushed=sum(i.size for i in changed), was_running=was_running, started=started,
                           running=self._running())
        return self.report

    def _check_device(self) -> None:
        if self.spec.client == "native":
            binary = next(i.source for i in self.items if i.remote == f"bin/{NATIVE_BINARY}")
            uname, abi = elf_machine(binary)
            if self.spec.target == "android":
                got = self.transport.check("getprop ro.product.cpu.abi", "reading the ABI").strip()
                ok = got == abi
                want = abi
            else:
                got = self.transport.check("uname -m", "reading the architecture").strip()
                ok = got == uname or (uname == "aarch64" and got == "arm64")
                want = uname
            if not ok:
                raise FlashError(f"{self.transport.name}: the device is {got}, the native client is built for "
                                 f"{want} (give --native-dir with a build for {want})")
        else:
            py = self._python()
            res = self.transport.shell(f"{shlex.quote(py)} -m fleet --version")
            if res.returncode != 0 or "edgemole" not in res.out:
                why = f"exit {res.returncode}: {tool_line(res.text)}" if res.returncode != 0 else "no version printed"
                raise FlashError(f"{self.transport.name}: {py} cannot run edgemole ({why}; install it on the board, "
                                 "e.g. devices/raspberry-pi/provision.sh, or give --python)")
        if self.transport.shell("command -v sha256sum").returncode != 0:
            raise FlashError(f"{self.transport.name}: no sha256sum on the device (toybox or coreutils needed)")

    def _remote_hashes(self, paths: list[str]) -> dict[str, str]:
        # missing files make sha256sum exit non-zero; the lines of the files that exist are what counts
        res = self.transport.shell("sha256sum " + " ".join(shlex.quote(p) for p in paths) + " 2>/dev/null")
        hashes = {}
        for line in res.out.splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2 and len(parts[0]) == 64:
                hashes[parts[1].lstrip("*")] = parts[0].lower()
        return hashes

    def _check_space(self, needed: int) -> None:
        # -P: one line per file system even where its name is long (toybox, busybox and coreutils all take it); the
        # last line whose fourth field is a number is ours, whatever a login shell printed before it
        out = self.transport.check(f"df -Pk {shlex.quote(self.spec.root)}", "reading the free space")
        rows = [f for f in (ln.split() for ln in out.splitlines()) if len(f) >= 4 and f[3].isdigit()]
        if not rows:
            raise FlashError(f"{self.transport.name}: cannot read the free space from df: "
                             f"{' '.join(out.split())[:200] or 'no output'}")
        free = int(rows[-1][3]) * 1024
        if free < needed + SPACE_MARGIN:
            raise FlashError(f"{self.transport.name}: no space: {fmt_bytes(free)} free in {self.spec.root}, "
                             f"{fmt_bytes(needed + SPACE_MARGIN)} needed")

    def _verify_parts(self, changed: list[Item]) -> None:
        if not changed:
            return
        got = self._remote_hashes([self.remote(i) + ".part" for i in changed])
        bad = [i.remote for i in changed if got.get(self.remote(i) + ".part") != i.sha256]
        if bad:
            self.transport.shell("rm -f " + " ".join(shlex.quote(self.remote(i) + ".part") for i in changed))
            raise FlashError(f"{self.transport.name}: hash mismatch after push: {', '.join(bad)} (nothing was "
                             "installed or started; flash again)")

    # -- the client's service ------------------------------------------------------------------------
    def _running(self) -> bool:
        if self.service == "systemd":
            return self.transport.shell(f"systemctl is-active --quiet {self.spec.unit_name}").returncode == 0
        pid = shlex.quote(self.pid_file)
        return self.transport.shell(f'[ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null').returncode == 0

    def _start(self) -> None:
        if self.service == "systemd":
            unit = self.spec.unit_name
            self.transport.check(f"systemctl daemon-reload && systemctl enable --quiet {unit} && "
                                 f"{{ systemctl reset-failed {unit} 2>/dev/null; systemctl restart {unit}; }}",
                                 f"starting {unit}")
            res = self.transport.shell(f"sleep 2; systemctl is-active --quiet {unit}")
            if res.returncode != 0:
                tail = self.transport.shell(f"journalctl -u {unit} -n 1 --no-pager -o cat").out.strip()
                raise FlashError(f"{self.transport.name}: {unit} did not stay up: {tail[-300:] or 'see journalctl'}")
            self.say(f"  started {unit}")
            return
        run, log, pid = (shlex.quote(p) for p in (self.spec.path("run.sh"), self.log_file, self.pid_file))
        # every descriptor of the background client is redirected, so that ssh / adb shell return at once
        self.transport.check(f"cd {shlex.quote(self.spec.root)} || exit 1; nohup sh {run} >> {log} 2>&1 < /dev/null "
                             f"& echo $! > {pid}", "starting the client")
        res = self.transport.shell(f'sleep 2; kill -0 "$(cat {pid})" 2>/dev/null')
        if res.returncode != 0:
            tail = self.transport.shell(f"tail -n 1 {log}").out.strip()
            raise FlashError(f"{self.transport.name}: the client exited at start: {tail[-300:] or 'empty log'}")
        self.say(f"  started the client (log {self.log_file})")

    def _stop(self) -> bool:
        """Stop the client if it runs; True when it did."""
        if not self._running():
            return False
        if self.service == "systemd":
            self.transport.check(f"systemctl stop {self.spec.unit_name}", f"stopping {self.spec.unit_name}")
        else:
            pid = shlex.quote(self.pid_file)
            self.transport.check(
                f'p="$(cat {pid})"; kill "$p" 2>/dev/null; i=0; while kill -0 "$p" 2>/dev/null && '
                f'[ $i -lt {STOP_WAIT_S * 2} ]; do sleep 0.5; i=$((i+1)); done; kill -9 "$p" 2>/dev/null; '
                f"rm -f {pid}; true", "stopping the client")
        self.say("  stopped the client")
        return True

    def start(self) -> dict[str, Any]:
        self.transport.connect()
        if not self._running():
            self._start()
        return {"device": self.transport.name, "client_id": self.spec.client_id, "running": self._running()}

    def stop(self) -> dict[str, Any]:
        self.transport.connect()
        stopped = self._stop()
        return {"device": self.transport.name, "client_id": self.spec.client_id, "stopped": stopped,
                "running": self._running()}

    def status(self) -> dict[str, Any]:
        self.transport.connect()
        if self.service == "systemd":  # the unit logs to the journal
            log = f"journalctl -u {self.spec.unit_name} -n 5 --no-pager -o cat 2>/dev/null"
        else:
            log = f"tail -n 5 {shlex.quote(self.log_file)} 2>/dev/null"
        log_tail = self.transport.shell(log).out.splitlines()
        out = {"device": self.transport.name, "client_id": self.spec.client_id, "running": self._running(),
               "service": self.service, "log_tail": log_tail}
        if self.items:  # the flags describe a bundle: say which of its files the device lacks or has otherwise
            hashes = self._remote_hashes([self.remote(i) for i in self.items])
            out["differs"] = [i.remote for i in self.items if hashes.get(self.remote(i)) != i.sha256]
            out["up_to_date"] = not out["differs"]
        return out
