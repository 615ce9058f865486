"""``edgemole fleet status``: every device that published a status on the broker, from the retained status messages.

An observer: it connects with a clean session, subscribes to ``<prefix>/<fleet>/clients/+/status``, collects for a
few seconds (the retained messages arrive at once, a status published meanwhile replaces its device's) and
disconnects. It publishes nothing (no will, no status of its own). Each device's newest status is decoded and checked
as the aggregator checks it (docs/protocol.md 4.2 and 7); one that fails is not shown as a device but counted, with
the reason, in the list's ``rejected`` (and one warning line on stderr each).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from edgemole.errors import ProtocolError
from edgemole.mqtt import BrokerCredentials, MqttLink, packet_limit
from edgemole.protocol import Kind, Topics, decode
from edgemole.protocol.delta import parse_initial
from edgemole.protocol.validate import check_status_fields

log = logging.getLogger("edgemole.fleet.status")

#: the states a device reports (docs/protocol.md 4.2); a status with another is rejected, as the aggregator does
STATES = ("online", "ready", "error", "offline")
#: the largest status message read: a status carries no tensors, only a small JSON body
MAX_STATUS_BYTES = 1024 * 1024


class DeviceList(list):
    """The devices (one dict each, sorted by client id) with what was seen besides them: ``base`` (the topics'
    ``<prefix>/<fleet>``) and ``rejected`` (one ``{"topic", "client", "reason"}`` per status that failed)."""

    def __init__(self, devices: list[dict[str, Any]], base: str, rejected: list[dict[str, Any]]) -> None:
        super().__init__(devices)
        self.base = base
        self.rejected = rejected


def fleet_status(broker: str, fleet: str, prefix: str = "edgemole", *, credentials: BrokerCredentials | None = None,
                 wait_s: float = 2.0, connect_timeout_s: float = 10.0) -> DeviceList:
    """Every device with a status on ``broker`` for ``fleet``: see :func:`device_entry` for each dict. A broker that
    cannot be reached is a one-line :class:`edgemole.errors.BrokerError` within ``connect_timeout_s``."""
    topics = Topics(fleet, prefix)
    link = MqttLink(broker, topics.mqtt_client_id(f"observer:status:{os.getpid()}"), clean_session=True,
                    credentials=credentials, max_packet_bytes=packet_limit(MAX_STATUS_BYTES))
    newest: dict[str, bytes] = {}  # topic -> payload of the newest status seen there
    link.connect(connect_timeout_s)
    try:
        link.subscribe(topics.all_status)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            inbound = link.receive(left)
            if inbound is None:
                break
            if inbound.topic.startswith(f"{topics.base}/clients/"):  # not the link's reconnect notice
                newest[inbound.topic] = inbound.payload
    finally:
        link.close()
    return collect(topics, newest, time.time())


def collect(topics: Topics, newest: dict[str, bytes], now: float) -> DeviceList:
    """The devices of the newest status payload per topic, checked; ``now`` is this machine's clock (for ages)."""
    devices, rejected = [], []
    for topic, payload in sorted(newest.items()):
        if not payload:  # a cleared retained message: nothing to show, not a rejection (docs/protocol.md 1.4)
            continue
        parsed = topics.parse_client_topic(topic)
        client = parsed[0] if parsed is not None else None
        try:
            if parsed is None or parsed[1] != "status":
                raise ProtocolError("not a device status topic (the client id is not a valid name)")
            devices.append(device_entry(client, payload, now, topics.fleet))
        except ProtocolError as exc:
            rejected.append({"topic": topic, "client": client, "reason": str(exc)})
            log.warning("rejected the status on %s: %s", topic, exc)
    devices.sort(key=lambda d: d["client"])
    return DeviceList(devices, topics.base, rejected)


def device_entry(client: str, payload: bytes, now: float, fleet: str) -> dict[str, Any]:
    """One device's row from its status message; ProtocolError when the message is not a valid status of
    ``client`` in ``fleet`` (the aggregator's checks: decoding, kind, client, fleet, state, ``initial``,
    ``time_unix``, ``artifact``).

    Keys: ``client``, ``state``, ``last_seen_unix`` (the device's clock at publishing, None in its last will),
    ``age_s`` (``now`` minus that), ``kind`` (``native`` or ``python``), ``engine``, ``artifact`` (16 hex digits of
    the sha256 of the artifact's manifest.json, None without one), ``round`` (the last round the device answered),
    ``run``, ``num_train``, ``num_test``, ``error``. An informational field of another type than the protocol's is
    None."""
    msg = decode(payload, MAX_STATUS_BYTES)
    if msg.kind != Kind.STATUS:
        raise ProtocolError(f"a {msg.kind} message, not a status")
    if msg.client != client:
        raise ProtocolError(f"client field {msg.client!r} does not match topic client {client!r}")
    if msg.fleet != fleet:
        raise ProtocolError(f"message is for fleet {msg.fleet!r}, not {fleet!r}")
    body = msg.body
    if body.get("state") not in STATES:
        raise ProtocolError(f"unknown state {body.get('state')!r}")
    parse_initial(body)
    check_status_fields(body)
    seen = body.get("time_unix")
    return {
        "client": client,
        "state": body["state"],
        "last_seen_unix": seen,
        "age_s": None if seen is None else round(now - seen, 1),
        "kind": "native" if body.get("client") == "native" else "python",
        "engine": _typed(body, "engine", str),
        "artifact": body.get("artifact"),
        "round": msg.round,
        "run": _typed(body, "run", str),
        "num_train": _typed(body, "num_train", int),
        "num_test": _typed(body, "num_test", int),
        "error": _typed(body, "error", str),
    }


def _typed(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def age_text(age_s: float | None) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago``; ``-`` when unknown (a last will)."""
    if age_s is None:
        return "-"
    if age_s < -1:
        return f"{-age_s:.0f} s ahead of this clock"
    age = max(age_s, 0.0)
    for unit, seconds in (("d", 86400), ("h", 3600), ("min", 60)):
        if age >= seconds:
            return f"{age // seconds:.0f} {unit} ago"
    return f"{age:.0f} s ago"


#: hex digits of the artifact digest the table shows (the JSON has all 16)
ARTIFACT_SHOWN = 8
_STATE_STYLE = {"ready": "bold green", "online": "green", "error": "bold red", "offline": "dim"}


def print_status(fleet: str, devices: list[dict[str, Any]]) -> None:
    """A table of the devices (rich), a line when there are none, and a line naming the rejected statuses (their
    reasons are on stderr, logged while collecting)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # a pipe or a file gets whole rows (rich would squeeze them into 80 columns); a terminal gets its width
    console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=200)
    base = getattr(devices, "base", None) or f"edgemole/{fleet}"
    rejected = getattr(devices, "rejected", [])
    if not devices:
        console.print(f"no device has published a status on {base}", markup=False, highlight=False)
    else:
        console.print(f"fleet {fleet}: {len(devices)} device(s) with a status on {base}", markup=False,
                      highlight=False)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for name in ("device", "state", "last seen", "kind/engine", "artifact", "round", "run"):
            table.add_column(name, no_wrap=True, justify="right" if name == "round" else "left")
        table.add_column("error", overflow="fold")
        for d in devices:
            table.add_row(
                Text(d["client"]),
                Text(d["state"], style=_STATE_STYLE.get(d["state"], "")),
                age_text(d["age_s"]),
                Text(f"{d['kind']}/{d['engine'] or '?'}"),
                (d["artifact"] or "-")[:ARTIFACT_SHOWN],
                str(d["round"]),
                Text(d["run"] or "-"),
                Text(d["error"] or ""),
            )
        console.print(table)
    if rejected:
        names = ", ".join(r["topic"] for r in rejected)
        console.print(f"{len(rejected)} status message(s) rejected, not listed (reasons on stderr): {names}",
                      markup=False, highlight=False)
