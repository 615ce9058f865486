"""The embedded default broker (amqtt on loopback) for ``edgemole simulate`` without ``--broker``.

It runs in a child process so that it never competes with the simulator's own thread and dies with
it. Production fleets and the test-suite use Mosquitto; any MQTT 3.1.1 broker works.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from edgemole.errors import BrokerError


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts TCP connections (or the process died, or time ran out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"broker process exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise BrokerError(f"broker did not listen on {host}:{port} within {timeout_s:.0f} s")


#: what amqtt logs when a peer only probes the port (``wait_for_port``) or goes away without a DISCONNECT
ORDINARY_DISCONNECT_MESSAGES = ("No data to decode MQTT packet fixed header", "Failed to initialize client session")


class QuietDisconnects(logging.Filter):
    """Drop amqtt's (and asyncio's) reports of ordinary disconnects, whose stack traces made a normal run's broker
    log look broken, and cut every other logged exception to one line (real errors stay visible, briefly)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from amqtt.errors import NoDataError, ZeroLengthReadError

        ordinary = (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError, NoDataError,
                    ZeroLengthReadError, EOFError)
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ordinary):
            return False
        if any(m in record.getMessage() for m in ORDINARY_DISCONNECT_MESSAGES):
            return False
        if exc is not None:
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
        return True


async def _serve(port: int, max_bytes: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 1000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(broker.shutdown(), 5)


@contextlib.contextmanager
def embedded_broker(log_path: str | None = None, timeout_s: float = 30.0) -> Iterator[str]:
    """Start amqtt on a free loopback port in a child process; yields its ``mqtt://`` URL."""
    port = free_port()
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgemole.broker", "--port", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for_port("127.0.0.1", port, timeout_s, proc)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log_path:
            out.close()


def mosquitto_binary() -> str | None:
    """Path of the ``mosquitto`` executable (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


@contextlib.contextmanager
def mosquitto_broker(log_path: str | None = None, timeout_s: float = 10.0) -> Iterator[str]:
    """A private Mosquitto on a free loopback port (anonymous, no persistence); yields its URL."""
    binary = mosquitto_binary()
    if binary is None:
        raise BrokerError("mosquitto is not installed (Debian/Ubuntu: apt-get install -y mosquitto)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="edgemole-mosquitto-") as tmp:
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port("127.0.0.1", port, timeout_s, proc)
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)
            if log_path:
                out.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="embedded amqtt broker on loopback")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s broker %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietDisconnects())
    asyncio.run(_serve(args.port, args.max_bytes))


if __name__ == "__main__":
    main()
