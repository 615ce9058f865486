"""Memory of an edge client process when a 50 MB message is published to its assign topic.

A real ``edgemole client`` process (connected, waiting for a task) is measured before and after an oversize
publish to ``clients/<id>/assign``, from /proc (VmRSS now, VmHWM peak), in three set-ups:

- ``tls_acl``: the ``edgemole broker init`` Mosquitto (``max_packet_size``), the publisher is the aggregator
  identity: the broker refuses the packet from the publisher;
- ``mqtt5_limit``: an anonymous Mosquitto without ``max_packet_size``: the client's MQTT 5 Maximum Packet Size
  makes the broker drop the message for that client;
- ``no_limit``: the same broker and the same client with its announced maximum removed (the behaviour before the
  limit): the client receives and buffers the whole message, then rejects it.

    python benchmarks/oversize_publish.py --json-out docs/results/oversize-publish.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgemole.broker import free_port, mosquitto_broker
from edgemole.data import make_synthetic, write_jsonl
from edgemole.errors import EdgemoleError
from edgemole.mqtt import MqttLink
from edgemole.protocol import Topics, decode
from edgemole.security import FleetDir, init_broker_dir
from edgemole.security.run import SecureMosquitto
from fleet.simulate import credential_flags

#: the client with its MQTT 5 Maximum Packet Size removed: what every client did before the limit
NO_LIMIT = ("import sys, edge_client.client as c; c.packet_limit = lambda n: None; from fleet.cli import main; "
            "main(sys.argv[1:])")


def memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"]}


@contextlib.contextmanager
def setup(mode: str, fd: FleetDir, work: Path) -> Iterator[tuple[str, list[str], MqttLink]]:
    """The broker URL, the client's credential flags, and a connected aggregator-side link."""
    if mode == "tls_acl":
        with SecureMosquitto(fd, work / "tls.log"):
            link = MqttLink(fd.url(), "x", clean_session=True, credentials=fd.credentials("aggregator"),
                            identity="aggregator")
            link.connect(10)
            yield fd.url(), credential_flags(fd.credentials("c0")), link
            link.close()
    else:
        with mosquitto_broker(str(work / f"{mode}.log")) as url:
            link = MqttLink(url, "publisher", clean_session=True)
            link.connect(10)
            yield url, [], link
            link.close()


def measure(mode: str, fd: FleetDir, work: Path, data: Path, size: int) -> dict[str, Any]:
    topics = Topics("bench")
    with setup(mode, fd, work) as (url, flags, link):
        link.subscribe(topics.status("c0"))
        args = ["client", "--broker", url, "--client-id", "c0", "--data", str(data), "--fleet", "bench",
                "--threads", "1", *flags]
        cmd = [sys.executable, "-c", NO_LIMIT, *args] if mode == "no_limit" else [sys.executable, "-m", "fleet",
                                                                                 *args]
        with open(work / f"client-{mode}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                   "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the client is up once it published its status
                m = link.receive(0.5)
                if m is not None and m.payload and decode(m.payload).client == "c0":
                    break
            else:
                raise RuntimeError(f"client did not come up: {(work / f'client-{mode}.log').read_text()[-500:]}")
            time.sleep(3.0)
            before = memory_mb(proc.pid)
            started = time.monotonic()
            outcome = "published"
            try:
                link.publish(topics.assign("c0"), os.urandom(size), wait_s=30)
            except EdgemoleError as exc:
                outcome = f"refused: {exc}"
            if not link.connected:
                outcome = "publisher disconnected by the broker (packet over max_packet_size)"
            time.sleep(5.0)
            after = memory_mb(proc.pid)
            return {"outcome": outcome, "before": before, "after": after,
                    "rss_growth_mb": after["rss_mb"] - before["rss_mb"],
                    "peak_growth_mb": after["peak_rss_mb"] - before["peak_rss_mb"],
                    "publish_s": time.monotonic() - started, "client_alive": proc.poll() is None}
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
            if proc.poll() is None:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the oversize message in MB (default 50)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgemole-oversize-"))
    fd = init_broker_dir(work / "fleet", "bench", ["c0"], host="127.0.0.1", bind="127.0.0.1", port=free_port(),
                         password_port=free_port(), device_root=None)
    data = work / "c0.jsonl"
    write_jsonl(data, make_synthetic(n_per_domain=20, seed=0))
    size = int(args.mb * 1e6)
    result: dict[str, Any] = {
        "setup": {"message_bytes": size, "client": "edgemole client (eager), connected and waiting for a task",
                  "limits": {"fleet.max_message_bytes": 16 * 2**20,
                             "max_packet_size (broker) and MQTT 5 Maximum Packet Size (client)":
                             fd.meta["max_packet_bytes"]},
                  "memory": "/proc/<pid>/status VmRSS (now) and VmHWM (peak), 3 s before and 5 s after the publish",
                  "command": "python benchmarks/oversize_publish.py " + " ".join(sys.argv[1:])},
    }
    for mode in ("tls_acl", "mqtt5_limit", "no_limit"):
        result[mode] = measure(mode, fd, work, data, size)
        print(f"{mode}: {result[mode]['outcome']}, peak +{result[mode]['peak_growth_mb']:.0f} MB", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
