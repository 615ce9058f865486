"""What TLS with per-device certificates costs a fleet: round wall time, payload and TCP bytes, connect time.

The same ``edgemole simulate`` fleet runs against Mosquitto twice per repeat, on loopback: once on a plain anonymous
listener and once on the certificate listener of the ``edgemole broker init`` set-up (mutual TLS, ACL), each role
with its own identity. Every connection goes through a counting TCP relay, so the TCP bytes in both directions
(MQTT framing, TLS records and handshakes included) are measured the same way for both; the relay's own cost is in
both modes' times alike. Prints JSON with medians over repeats (and over rounds for the round time).

    python benchmarks/tls_cost.py                                  # default model, 3 clients, 3 rounds, 3 repeats
    python benchmarks/tls_cost.py --repeats 5 --json-out docs/results/tls-cost.json

Each payload crosses TCP twice (publisher -> broker -> subscriber), so TCP bytes are about twice the payload bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from edgemole.broker import free_port, mosquitto_broker
from edgemole.config import load_settings
from edgemole.mqtt import MqttLink, parse_broker_url
from edgemole.security import FleetDir, init_broker_dir
from edgemole.security.run import SecureMosquitto
from fleet.simulate import simulate


class CountingRelay:
    """A loopback TCP relay in front of the broker that counts the bytes each way."""

    def __init__(self, upstream: str) -> None:
        address = parse_broker_url(upstream)
        self.upstream = (address.host, address.port)
        self.server = socket.create_server(("127.0.0.1", 0))
        scheme = "mqtts" if address.tls else "mqtt"
        self.url = f"{scheme}://127.0.0.1:{self.server.getsockname()[1]}"
        self.to_broker = self.from_broker = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            for a, b, up_dir in ((down, up, True), (up, down, False)):
                threading.Thread(target=self._pump, args=(a, b, up_dir), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_broker: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self._lock:
                    if to_broker:
                        self.to_broker += len(data)
                    else:
                        self.from_broker += len(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()


@contextlib.contextmanager
def broker(mode: str, fd: FleetDir, work: Path) -> Iterator[str]:
    if mode == "plain":
        with mosquitto_broker(str(work / "plain.log")) as url:
            yield url
    else:
        with SecureMosquitto(fd, work / "tls.log"):
            yield fd.url()


def connect_ms(url: str, fd: FleetDir | None, repeats: int = 20) -> float:
    """Median time from nothing to CONNACK of one link (TCP, TLS handshake with certificates, MQTT CONNECT)."""
    times = []
    for _ in range(repeats):
        link = MqttLink(url, "probe", clean_session=True, credentials=fd.credentials("observer") if fd else None)
        t = time.perf_counter()
        link.connect(10)
        times.append(time.perf_counter() - t)
        link.close()
    return 1e3 * statistics.median(times)


def run_once(mode: str, fd: FleetDir, overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    with broker(mode, fd, work) as url:
        relay = CountingRelay(url)
        try:
            settings = load_settings(None, overrides)
            result = simulate(settings, broker=relay.url, secure_dir=fd.path if mode == "tls" else None,
                              console=Console(file=open(os.devnull, "w")))  # noqa: SIM115
            time.sleep(0.5)  # let the relay count the last bytes of the disconnects
            return {"round_wall_s": [r["wall_s"] for r in result["rounds"]],
                    "rounds_s": result["timing"]["rounds_s"], "wall_s": result["wall_s"],
                    "payload_bytes_up": result["bytes_up_total"], "payload_bytes_down": result["bytes_down_total"],
                    "tcp_bytes_to_broker": relay.to_broker, "tcp_bytes_from_broker": relay.from_broker,
                    "connect_ms": connect_ms(relay.url, fd if mode == "tls" else None)}
        finally:
            relay.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--model", help="model id or folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgemole-tls-cost-"))
    names = [f"client-{i}" for i in range(args.clients)]
    fd = init_broker_dir(work / "fleet", "bench", names, host="127.0.0.1", bind="127.0.0.1", port=free_port(),
                         password_port=free_port(), device_root=None)
    overrides: dict[str, Any] = {
        "fleet": {"fleet": "bench", "method": "fedit", "rounds": args.rounds, "seed": 0},
        "simulate": {"clients": args.clients, "threads": 1}, "train": {"local_steps": args.local_steps},
        "model": {"name": args.model} if args.model else {}, "data": {"samples_per_domain": 60},
    }
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "tls": []}
    load_before = os.getloadavg()
    for i in range(args.repeats):
        for mode in ("plain", "tls") if i % 2 == 0 else ("tls", "plain"):
            runs[mode].append(run_once(mode, fd, overrides, work))
            print(f"repeat {i + 1} {mode}: rounds {runs[mode][-1]['rounds_s']:.1f} s", file=sys.stderr)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    summary: dict[str, Any] = {
        "setup": {"broker": "Mosquitto 2 on loopback; plain: anonymous listener; tls: mutual TLS (EC P-256 "
                  "certificates, TLS 1.3) with the generated ACL, every role its own identity",
                  "fleet": f"edgemole simulate, fedit, {args.clients} clients x 1 thread, {args.rounds} rounds, "
                  f"{args.local_steps} local steps, model {args.model or 'all-MiniLM-L6-v2 (bundled)'}",
                  "repeats": args.repeats, "cpus": os.cpu_count(),
                  "tcp_bytes": "counted by a TCP relay in front of the broker (both modes), all connections of "
                  "the run (roles and the simulator's observer), both directions",
                  "command": "python benchmarks/tls_cost.py " + " ".join(sys.argv[1:]),
                  # other work on the machine spreads the round times: compare them with this in mind
                  "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]]},
    }
    for mode in ("plain", "tls"):
        summary[mode] = {
            "round_wall_s_median": statistics.median(s for r in runs[mode] for s in r["round_wall_s"]),
            "round_wall_s_min": min(s for r in runs[mode] for s in r["round_wall_s"]),
            "round_wall_s_max": max(s for r in runs[mode] for s in r["round_wall_s"]),
            "rounds_s_median": med(mode, "rounds_s"), "run_wall_s_median": med(mode, "wall_s"),
            "payload_bytes_median": med(mode, "payload_bytes_up") + med(mode, "payload_bytes_down"),
            "tcp_bytes_median": statistics.median(r["tcp_bytes_to_broker"] + r["tcp_bytes_from_broker"]
                                                  for r in runs[mode]),
            "connect_ms_median": med(mode, "connect_ms"),
        }
    p, t = summary["plain"], summary["tls"]
    summary["tls_vs_plain"] = {
        "round_wall_time_ratio": t["round_wall_s_median"] / p["round_wall_s_median"],
        # the same messages; a few bytes differ with the JSON numbers (timings) inside them
        "payload_bytes_diff": t["payload_bytes_median"] - p["payload_bytes_median"],
        "tcp_bytes_ratio": t["tcp_bytes_median"] / p["tcp_bytes_median"],
        "tcp_bytes_extra": t["tcp_bytes_median"] - p["tcp_bytes_median"],
        "connect_ms_extra": t["connect_ms_median"] - p["connect_ms_median"],
    }
    summary["runs"] = runs
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
