"""The network-namespace fleet harness (tests/netns.py): what other tests build on must hold: SSH from the hub with
strict host keys lands on the right board, boards reach the hub and nothing else, a cut link isolates only its board
and comes back, cleanup leaves no namespace or sshd behind, and the reaper removes only dead owners' namespaces."""

from __future__ import annotations

import errno
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import PREFIX, Namespace, NetnsFleet, list_namespaces, reap_stale, require_namespaces

#: connect to HOST PORT within TIMEOUT s; exit 0, or print the errno and exit 1
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError as exc:
    print(exc.errno, exc)
    sys.exit(1)
"""
#: listen on HOST PORT, say "ready", then answer COUNT connections with the peer's address
SERVER = """
import socket, sys
with socket.create_server((sys.argv[1], int(sys.argv[2]))) as s:
    print("ready", flush=True)
    for _ in range(int(sys.argv[3])):
        c, peer = s.accept()
        c.sendall(peer[0].encode())
        c.close()
"""
#: connect to HOST PORT and print what the server says
CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as c:
    print(c.recv(64).decode())
"""
#: outside every fleet's subnet (TEST-NET-3): no namespace of the fleet has a route to it
OUTSIDE = "203.0.113.1"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsFleet]:
    require_namespaces()
    with NetnsFleet(3, tmp_path_factory.mktemp("netns")) as f:
        yield f


def connect(ns: Namespace, host: str, port: int, timeout: float = 1.0) -> str | None:
    """None if ``ns`` can open a TCP connection to host:port, else the error (``errno message``)."""
    r = ns.run([sys.executable, "-c", CONNECT, host, str(port), str(timeout)], check=False, timeout=timeout + 10)
    return None if r.returncode == 0 else r.stdout.strip() or r.stderr.strip()


def test_hub_reaches_each_board_over_ssh_with_strict_host_keys(fleet: NetnsFleet) -> None:
    for b in fleet.boards:
        addr = fleet.ssh(b, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        assert f"inet {b.address}/24 " in addr, addr
        routes = fleet.ssh(b, "ip", "-4", "route").stdout.splitlines()
        assert routes and all(r.startswith(f"{fleet.subnet} dev eth0 ") for r in routes), routes
    assert fleet.ssh(fleet.boards[0], "ip", "-6", "route").stdout.strip() == ""
    # the host key is checked: board 1's key filed under board 0's address is refused
    b0, b1 = fleet.boards[:2]
    wrong = fleet.dir / "known_hosts.wrong"
    line = next(x for x in fleet.known_hosts.read_text().splitlines() if x.startswith(f"{b1.address} "))
    wrong.write_text(line.replace(b1.address, b0.address, 1) + "\n")
    options = [o if not o.startswith("UserKnownHostsFile=") else f"UserKnownHostsFile={wrong}"
               for o in fleet.ssh_options()]
    r = fleet.hub.run(["ssh", "-i", fleet.identity, *[a for o in options for a in ("-o", o)],
                       f"root@{b0.address}", "true"], check=False)
    assert r.returncode == 255 and "host key" in r.stderr.lower(), r.stderr


def test_boards_reach_the_hub_and_nothing_outside(fleet: NetnsFleet) -> None:
    port = 8765
    server = fleet.hub.popen([sys.executable, "-c", SERVER, fleet.hub.address, str(port), str(len(fleet.boards))],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        for b in fleet.boards:
            seen = b.run([sys.executable, "-c", CLIENT, fleet.hub.address, str(port)]).stdout.strip()
            assert seen == b.address  # the hub saw the connection come from this board's address
        assert server.wait(timeout=10) == 0
    finally:
        server.kill()
    for ns in (fleet.boards[0], fleet.hub):
        t0 = time.monotonic()
        err = connect(ns, OUTSIDE, 80, timeout=3.0)
        assert err is not None and err.startswith(f"{errno.ENETUNREACH} "), err
        assert time.monotonic() - t0 < 2.0  # refused by the routing table, not a timeout


def test_link_down_isolates_only_that_board_until_link_up(fleet: NetnsFleet) -> None:
    cut, *others = fleet.boards
    fleet.link_down(cut)
    try:
        assert connect(fleet.hub, cut.address, 22) is not None
        for b in others:
            assert connect(fleet.hub, b.address, 22) is None
    finally:
        fleet.link_up(cut)
    deadline = time.monotonic() + 5.0
    while (err := connect(fleet.hub, cut.address, 22)) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert err is None
    assert fleet.ssh(cut, "true").returncode == 0


class Boom(Exception):
    pass


def processes_mentioning(text: str) -> list[int]:
    """The pids whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("body_raises", [False, True])
def test_cleanup_removes_namespaces_and_sshd(tmp_path: Path, body_raises: bool) -> None:
    require_namespaces()
    fleet = NetnsFleet(1, tmp_path)
    try:
        with fleet:
            assert set(fleet.names) <= set(list_namespaces())
            sshd = fleet.boards[0].sshd
            assert sshd is not None and sshd.pid in fleet.pids()[fleet.boards[0].name]
            sleeper = fleet.hub.popen(["sleep", "60"])
            if body_raises:
                raise Boom
    except Boom:
        assert body_raises
    assert [n for n in list_namespaces() if n.startswith(fleet.tag)] == []
    assert sshd.poll() is not None and sleeper.poll() is not None
    assert processes_mentioning(str(tmp_path)) == []


def test_reaper_removes_namespaces_of_dead_owners_only() -> None:
    require_namespaces()
    gone = subprocess.Popen(["true"])
    gone.wait()
    tag = secrets.token_hex(2)
    stale, live = f"{PREFIX}-{gone.pid}-{tag}-hub", f"{PREFIX}-{os.getpid()}-{tag}-hub"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        deadline = time.monotonic() + 5.0
        while not subprocess.run(["ip", "netns", "pids", stale], capture_output=True, text=True).stdout.strip():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        removed = reap_stale()
        assert stale in removed and live not in removed
        names = list_namespaces()
        assert stale not in names and live in names
        assert sleeper.wait(timeout=5) != 0  # the stale namespace's process was stopped
    finally:
        sleeper.kill()
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_missing_namespaces_fail_under_ci_and_skip_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    import netns

    monkeypatch.setattr(netns, "namespaces_available", lambda: "network namespaces need root")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="need root"):
        require_namespaces()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="need root"):
        require_namespaces()
