"""``edgemole flash android | board``: put the client, the artifact, the device's data and its config on a phone
(adb) or a board (SSH), verify every file by sha256 on the device, and start, stop or inspect the client.

:mod:`fleet.flash.bundle` says what goes where, :mod:`fleet.flash.transport` how the device is reached and
:mod:`fleet.flash.installer` the steps; this module turns the command's flags into them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fleet.flash.bundle import DeviceSpec, build_bundle
from fleet.flash.installer import Installer
from fleet.flash.transport import AdbTransport, FlashError, SshTransport, Transport

__all__ = ["FlashError", "run_flash", "spec_from_args", "transport_from_args"]


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def spec_from_args(a: argparse.Namespace) -> DeviceSpec:
    android = a.flash_target == "android"
    return DeviceSpec(
        target=a.flash_target, client_id=a.client_id, root=a.dir.rstrip("/") or "/",
        client="native" if android else a.client, broker=a.broker, fleet=a.fleet, topic_prefix=a.topic_prefix,
        artifact=_path(a.artifact), data=_path(a.data), test_data=_path(a.test_data),
        credentials=_path(a.credentials), native_dir=_path(a.native_dir),
        python=None if android else a.python, engine=getattr(a, "engine", None), threads=a.threads,
        upload_rank=a.upload_rank)


def transport_from_args(a: argparse.Namespace) -> Transport:
    if a.flash_target == "android":
        return AdbTransport(a.serial, adb=a.adb)
    return SshTransport(a.host, user=a.user, port=a.port, identity=a.identity, options=list(a.ssh_option),
                        sudo=a.sudo)


def _service(a: argparse.Namespace, transport: Transport, dry_run: bool) -> str:
    """systemd or nohup: a phone has no systemd; ``auto`` on a board asks it (root and systemd running)."""
    if a.flash_target == "android" or a.service == "nohup":
        return "nohup"
    if a.service == "systemd":
        return "systemd"
    if dry_run:
        print("note: --service auto is decided on the board (systemd where it runs as root with systemd, else "
              "nohup); this plan shows nohup", file=sys.stderr)
        return "nohup"
    transport.connect()
    probe = transport.shell('[ "$(id -u)" = 0 ] && [ -d /run/systemd/system ]')
    return "systemd" if probe.returncode == 0 else "nohup"


def run_flash(a: argparse.Namespace) -> int:
    spec = spec_from_args(a)
    transport = transport_from_args(a)
    say = (lambda line: print(line, file=sys.stderr)) if a.json else print
    install = a.action == "install"
    with tempfile.TemporaryDirectory(prefix="edgemole-flash-") as staging:
        items = []
        bundle = install or a.data is not None  # status compares the device's files with a bundle when given one
        if bundle:
            spec.check()
        else:
            spec.check_place()
        service = _service(a, transport, a.dry_run)
        if bundle:
            items = build_bundle(spec, Path(staging), service)
        installer = Installer(transport, spec, items, service, say=say)
        if a.dry_run:
            steps = installer.plan(a.action, start=not a.no_start)
            if a.json:
                print(json.dumps({"dry_run": True, "device": transport.name, "service": service, "steps": steps,
                                  "files": [{"remote": i.remote, "bytes": i.size, "sha256": i.sha256}
                                            for i in items]}, indent=2))
            else:
                print(f"dry run: nothing is contacted or changed; {a.action} on {transport.name} would:")
                for n, step in enumerate(steps, 1):
                    print(f"  {n:2d}. {step}")
            return 0
        try:
            if install:
                result = installer.install(start=not a.no_start)
            else:
                result = {"start": installer.start, "stop": installer.stop, "status": installer.status}[a.action]()
        finally:
            transport.close()
    try:
        print(json.dumps(result, indent=2 if a.json else None))
    except BrokenPipeError:  # e.g. '| head': the reader has what it wanted
        sys.stderr.close()
    return 0
