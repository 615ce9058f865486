"""A fleet of separate hosts on one machine, for tests that need real network paths (SSH to a board, a board that
loses its link): a hub network namespace holding a Linux bridge, and N board namespaces each joined to the bridge by
its own veth pair, with an sshd on every board that the hub reaches with a generated key and strict host key checking.

Everything lives in namespaces this module makes: the root namespace's interfaces and routes are only read (to pick a
/24 that no host route covers), and no namespace has a route beyond the bridge subnet, so nothing can leave. Every
namespace is named ``emt-<owner pid>-<random tag>-<role>``; :func:`reap_stale` removes those whose owner is gone (a
run that was killed before its cleanup), and a fleet's cleanup runs on exit of its ``with`` block, even when the body
raised, and at interpreter exit.

Use::

    require_namespaces()  # in a test: skip (fail under CI) where namespaces cannot be made
    with NetnsFleet(3, tmp_path) as fleet:
        board = fleet.boards[0]
        proc = board.popen([sys.executable, "-m", "fleet", ...])       # a process on the board
        fleet.ssh(board, "uname", "-a")                                  # ssh from the hub, checked
        flash = fleet.hub.exec_args(["edgemole", "flash", "board", "--host", board.address, "--user", "root",
                                     "--identity", str(fleet.identity),
                                     *[a for o in fleet.ssh_options() for a in ("--ssh-option", o)]])
        fleet.link_down(board)                                           # cut the board's link at the hub
        fleet.link_up(board)                                             # and restore it
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: every namespace this module makes is named PREFIX-<owner pid>-<tag>-<role>
PREFIX = "emt"
#: where ``ip netns`` keeps its namespaces (bind mounts of their nsfs files)
NETNS_DIR = Path("/run/netns")
#: the bridge in the hub namespace
BRIDGE = "br0"
#: the board end of each veth pair, inside the board's namespace
BOARD_IFACE = "eth0"
SSH_USER = "root"
SSH_PORT = 22
#: the hub's host number in the subnet; board i is FIRST_BOARD + i
HUB_HOST, FIRST_BOARD = 1, 10
MAX_BOARDS = 240

Cmd = Sequence[str | os.PathLike[str]]


class NetnsError(RuntimeError):
    """A namespace, link or sshd could not be set up."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip ARGS``; raises :class:`NetnsError` with ip's message on failure when ``check``."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip() or f'exit {r.returncode}'}")
    return r


def _sshd_binary() -> str | None:
    """sshd's absolute path (sshd refuses to re-exec itself from a relative one); /usr/sbin may be off PATH."""
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None)
    return str(Path(found).resolve()) if found else None


@functools.cache
def namespaces_available() -> str | None:
    """None where this process can build a fleet (root, iproute2, a probe namespace with a bridge and a veth pair,
    ssh and sshd), else a one-line reason; probed once per process."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("ssh", "openssh-client"), ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y {package})"
    if _sshd_binary() is None:
        return "sshd is not installed (apt-get install -y openssh-server)"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}-probe"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot make a network namespace with a bridge and a veth pair: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def require_namespaces() -> None:
    """Skip the calling test where namespaces cannot be made; fail it under CI, where they must be."""
    reason = namespaces_available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"network namespaces must work in CI: {reason}")
        pytest.skip(reason)


def list_namespaces() -> list[str]:
    """The names of every namespace ``ip netns`` knows."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    """The processes in namespace ``name`` (none when it is gone)."""
    r = _ip("netns", "pids", name, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _signal_namespace(name: str, sig: int) -> None:
    """Send ``sig`` to every process in namespace ``name``: through a pidfd taken before checking that the process
    is still in that namespace, so that a pid reused meanwhile by a process elsewhere is never signalled."""
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return
    for pid in namespace_pids(name):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            ns = os.stat(f"/proc/{pid}/ns/net")
            if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
                signal.pidfd_send_signal(fd, sig)
        except OSError:
            pass
        finally:
            os.close(fd)


def _wait_empty(names: Sequence[str], timeout: float) -> list[str]:
    """Wait up to ``timeout`` for the namespaces to hold no process; those that still do."""
    deadline = time.monotonic() + timeout
    while True:
        busy = [n for n in names if namespace_pids(n)]
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.05)


def stop_namespaces(names: Sequence[str], grace_s: float = 2.0) -> list[str]:
    """SIGTERM every process in the namespaces, SIGKILL what is left after ``grace_s``; the namespaces still busy."""
    for n in names:
        _signal_namespace(n, signal.SIGTERM)
    busy = _wait_empty(names, grace_s)
    for n in busy:
        _signal_namespace(n, signal.SIGKILL)
    return _wait_empty(busy, 2.0)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(prefix: str = PREFIX) -> list[str]:
    """Remove the namespaces named ``prefix-<pid>-...`` whose owner pid is no longer alive (left by a run killed
    before its cleanup), after stopping their processes; those of a live owner (a concurrent run) are kept. The
    names removed. A dead owner's pid reused by a new process keeps its namespaces until that one exits too."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-[0-9a-f]+-\w+$")
    stale = [n for n in list_namespaces() if (m := pattern.match(n)) and not _pid_alive(int(m[1]))]
    stop_namespaces(stale)
    for n in stale:
        _ip("netns", "del", n, check=False)
    left = set(list_namespaces())
    return [n for n in stale if n not in left]


def _host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the current (root) namespace has an address or a route in, the default route aside."""
    nets = []
    for entry in json.loads(_ip("-4", "-j", "addr", "show").stdout or "[]"):
        for a in entry.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for route in json.loads(_ip("-4", "-j", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            net = ipaddress.ip_network(dst, strict=False)
            if net.prefixlen > 0:
                nets.append(net)
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def pick_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A random 10.200-250.x.0/24 that overlaps no address or route of this host, so a fleet's addresses can never
    be mistaken for a real host's."""
    rng = rng or random.Random()
    used = _host_networks()
    for _ in range(1000):
        net = ipaddress.IPv4Network(f"10.{rng.randint(200, 250)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsError("every 10.200-250.x.0/24 tried overlaps a route of this host")


@dataclass(kw_only=True, eq=False)
class Namespace:
    """One network namespace of a fleet and its address on the bridge subnet."""

    name: str
    address: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def exec_args(self, cmd: Cmd) -> list[str]:
        """The argv that runs ``cmd`` in this namespace (``ip netns exec`` execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.name, *map(str, cmd)]

    def run(self, cmd: Cmd, *, check: bool = True, timeout: float = 30.0,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` here to completion; output captured as text unless stdout/stderr are given."""
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs["capture_output"] = True
        return subprocess.run(self.exec_args(cmd), check=check, timeout=timeout, text=True, **kwargs)

    def popen(self, cmd: Cmd, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` here; the fleet's cleanup stops it (and reaps it) if the caller does not."""
        proc = subprocess.Popen(self.exec_args(cmd), **kwargs)
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        """The processes now in this namespace."""
        return namespace_pids(self.name)


@dataclass(kw_only=True, eq=False)
class Hub(Namespace):
    """The namespace of the bridge that joins the boards; the address is on the bridge."""

    bridge: str = BRIDGE


@dataclass(kw_only=True, eq=False)
class Board(Namespace):
    """A board: ``eth0`` with its address, whose veth peer ``hub_iface`` is a port of the hub's bridge."""

    index: int
    hub_iface: str
    dir: Path
    iface: str = BOARD_IFACE
    sshd: subprocess.Popen[Any] | None = field(default=None, repr=False)

    @property
    def sshd_log(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"


def _keygen(path: Path, comment: str) -> tuple[str, str]:
    """An ed25519 key pair without passphrase at ``path``; the public key's (type, base64)."""
    subprocess.run(["ssh-keygen", "-t", "ed25519", "-N", "", "-q", "-C", comment, "-f", str(path)], check=True,
                   capture_output=True, timeout=30)
    kind, key = Path(f"{path}.pub").read_text().split()[:2]
    return kind, key


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class NetnsFleet:
    """A hub namespace with a bridge at <subnet>.1 and ``boards`` board namespaces at <subnet>.10+i, each running
    sshd (unless ``sshd=False``); a context manager whose exit stops every process in them and deletes them.

    Files (keys, known_hosts, sshd configs and logs) go under ``tmp``.
    """

    def __init__(self, boards: int, tmp: Path, *, sshd: bool = True, subnet: ipaddress.IPv4Network | None = None,
                 stop_grace_s: float = 2.0) -> None:
        if not 1 <= boards <= MAX_BOARDS:
            raise ValueError(f"boards must be 1..{MAX_BOARDS}, not {boards}")
        self.dir = Path(tmp)
        self.with_sshd, self.stop_grace_s = sshd, stop_grace_s
        #: common start of this fleet's namespace names
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"
        self.subnet = subnet or pick_subnet()
        hosts = list(self.subnet.hosts())
        self.hub = Hub(name=f"{self.tag}-hub", address=str(hosts[HUB_HOST - 1]))
        self.boards = [Board(name=f"{self.tag}-b{i}", address=str(hosts[FIRST_BOARD + i - 1]), index=i,
                             hub_iface=f"vb{i}", dir=self.dir / f"b{i}") for i in range(boards)]
        self.identity = self.dir / "id_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.authorized_keys = self.dir / "authorized_keys"
        self._made: list[str] = []
        self._closed = False

    @property
    def namespaces(self) -> list[Namespace]:
        return [self.hub, *self.boards]

    @property
    def names(self) -> list[str]:
        return [ns.name for ns in self.namespaces]

    def __enter__(self) -> NetnsFleet:
        reap_stale()
        atexit.register(self.close)
        try:
            self._build_network()
            if self.with_sshd:
                self._start_sshd()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the network

    def _add_namespace(self, ns: Namespace) -> None:
        _ip("netns", "add", ns.name)
        self._made.append(ns.name)
        # IPv6 off: no link-local routes or router solicitations, only the bridge subnet's IPv4
        ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
               check=False)
        _ip("-n", ns.name, "link", "set", "lo", "up")

    def _build_network(self) -> None:
        hub, plen = self.hub.name, self.subnet.prefixlen
        self._add_namespace(self.hub)
        _ip("-n", hub, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{self.hub.address}/{plen}", "dev", BRIDGE)
        _ip("-n", hub, "link", "set", BRIDGE, "up")
        for b in self.boards:
            self._add_namespace(b)
            _ip("-n", hub, "link", "add", b.hub_iface, "type", "veth", "peer", "name", b.iface, "netns", b.name)
            _ip("-n", hub, "link", "set", b.hub_iface, "master", BRIDGE, "up")
            _ip("-n", b.name, "addr", "add", f"{b.address}/{plen}", "dev", b.iface)
            _ip("-n", b.name, "link", "set", b.iface, "up")

    def link_down(self, board: Board) -> None:
        """Cut ``board`` off: its veth peer on the hub's bridge goes down (the board's eth0 loses carrier)."""
        _ip("-n", self.hub.name, "link", "set", board.hub_iface, "down")

    def link_up(self, board: Board, wait_s: float = 5.0) -> None:
        """Restore ``board``'s link, and wait until both ends are up and the bridge port forwards."""
        _ip("-n", self.hub.name, "link", "set", board.hub_iface, "up")
        deadline = time.monotonic() + wait_s
        while not self._link_ready(board):
            if time.monotonic() >= deadline:
                raise NetnsError(f"the link of {board.name} did not come back up within {wait_s} s")
            time.sleep(0.05)

    def _link_ready(self, board: Board) -> bool:
        port = json.loads(_ip("-n", self.hub.name, "-j", "-d", "link", "show", "dev", board.hub_iface).stdout)[0]
        state = port.get("linkinfo", {}).get("info_slave_data", {}).get("state")
        inner = json.loads(_ip("-n", board.name, "-j", "link", "show", "dev", board.iface).stdout)[0]
        return port.get("operstate") == "UP" and state in (None, "forwarding") and inner.get("operstate") == "UP"

    def pids(self) -> dict[str, list[int]]:
        """The processes now in each of the fleet's namespaces, by namespace name."""
        return {ns.name: ns.pids() for ns in self.namespaces}

    # --- ssh

    def ssh_options(self) -> list[str]:
        """The ``KEY=VALUE`` ssh options a client in the hub needs besides the identity (for ``--ssh-option``):
        only the fleet's key, only its known_hosts, strict checking, never a prompt."""
        return ["BatchMode=yes", "IdentitiesOnly=yes", f"UserKnownHostsFile={self.known_hosts}",
                "GlobalKnownHostsFile=/dev/null", "StrictHostKeyChecking=yes", "ConnectTimeout=5"]

    def ssh_args(self, board: Board | None = None) -> list[str]:
        """Raw ssh arguments (identity, then each option as ``-o``); with ``board``, its ``root@address`` last."""
        args = ["-i", str(self.identity)]
        for opt in self.ssh_options():
            args += ["-o", opt]
        if board is not None:
            args += ["-p", str(SSH_PORT), f"{SSH_USER}@{board.address}"]
        return args

    def ssh_command(self, board: Board, *remote: str) -> list[str]:
        """The argv that runs ``remote`` on ``board`` over ssh from the hub namespace."""
        return self.hub.exec_args(["ssh", *self.ssh_args(board), *remote])

    def ssh(self, board: Board, *remote: str, check: bool = True,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``remote`` on ``board`` over ssh from the hub; output captured as text."""
        return subprocess.run(self.ssh_command(board, *remote), capture_output=True, text=True, check=check,
                              timeout=timeout)

    def _sshd_config(self, board: Board) -> str:
        for p in (board.dir, self.authorized_keys):
            if re.search(r"\s", str(p)):
                raise NetnsError(f"sshd_config paths cannot hold whitespace: {p}")
        return "\n".join([
            f"ListenAddress {board.address}", f"Port {SSH_PORT}", f"HostKey {board.host_key}",
            f"AuthorizedKeysFile {self.authorized_keys}", f"PidFile {board.dir / 'sshd.pid'}",
            "StrictModes no", "UsePAM no", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "LogLevel VERBOSE",
            # scp speaks sftp since OpenSSH 9.0: without a subsystem, copying files to the board fails
            "Subsystem sftp internal-sftp", "",
        ])

    def _start_sshd(self) -> None:
        sshd = _sshd_binary()
        if sshd is None:
            raise NetnsError("sshd is not installed (apt-get install -y openssh-server)")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.dir.mkdir(parents=True, exist_ok=True)
        _keygen(self.identity, f"{self.tag}-client")
        self.authorized_keys.write_text(Path(f"{self.identity}.pub").read_text())
        known = []
        for b in self.boards:
            b.dir.mkdir(parents=True, exist_ok=True)
            kind, key = _keygen(b.host_key, f"{b.name}-host")
            known.append(f"{b.address} {kind} {key}\n")
            config = b.dir / "sshd_config"
            config.write_text(self._sshd_config(b))
            with open(b.sshd_log, "ab") as log:
                b.sshd = b.popen([sshd, "-D", "-e", "-f", config], stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT)
        self.known_hosts.write_text("".join(known))
        self._wait_sshd(deadline=time.monotonic() + 10.0)

    def _wait_sshd(self, deadline: float) -> None:
        """Wait until every board's sshd lets the hub log in (all boards probed at once, a login costs ~0.5 s of
        CPU); fail with the board's sshd log tail if its sshd exits or still refuses at ``deadline``."""
        pending = list(self.boards)
        while pending:
            probes = [(b, subprocess.Popen(self.ssh_command(b, "true"), stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
                      for b in pending]
            failed = []
            for b, probe in probes:
                _, err = probe.communicate(timeout=30)
                if probe.returncode != 0:
                    failed.append((b, err.strip()))
            pending = []
            for b, err in failed:
                assert b.sshd is not None
                if b.sshd.poll() is not None:
                    raise NetnsError(f"sshd in {b.name} exited with {b.sshd.returncode}:\n{_tail(b.sshd_log)}")
                if time.monotonic() >= deadline:
                    raise NetnsError(f"sshd in {b.name} does not accept the hub's key: {err}\n"
                                     f"sshd log:\n{_tail(b.sshd_log)}")
                pending.append(b)
            if pending:
                time.sleep(0.1)

    # --- cleanup

    def close(self) -> None:
        """Stop every process in the fleet's namespaces, delete the bridge and the namespaces (with their veth
        pairs). Idempotent; best effort: what cannot be removed is reported as a warning, not raised."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        made = list(reversed(self._made))
        busy = stop_namespaces(made, self.stop_grace_s)
        for ns in self.namespaces:
            for proc in ns.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1.0)
        if self.hub.name in made:
            _ip("-n", self.hub.name, "link", "del", BRIDGE, check=False)
        for name in made:
            _ip("netns", "del", name, check=False)
        left = set(list_namespaces()) & set(made)
        if busy or left:
            warnings.warn(f"netns cleanup incomplete: processes left in {busy}, namespaces left {sorted(left)}",
                          stacklevel=2)
