"""The MQTT link against a real Mosquitto: delivery, byte counters, and status restored after a reconnect."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from edgemole.errors import ConfigError
from edgemole.mqtt import MqttLink, parse_broker_url

pytestmark = pytest.mark.mosquitto


def _drain_until(link: MqttLink, topic: str, payload: bytes, timeout_s: float) -> list[bytes]:
    seen: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = link.receive(0.2)
        if m is not None and m.topic == topic:
            seen.append(m.payload)
            if m.payload == payload:
                return seen
    raise AssertionError(f"{payload!r} never arrived on {topic}; saw {seen}")


def test_publish_receive_and_byte_counters(mosquitto: str) -> None:
    a, b = MqttLink(mosquitto, "a"), MqttLink(mosquitto, "b")
    a.connect(10)
    b.connect(10)
    a.subscribe("x/#")
    time.sleep(0.3)
    b.publish("x/1", b"hello" * 1000)
    m = a.receive(5)
    assert m is not None and m.topic == "x/1" and m.payload == b"hello" * 1000
    assert b.bytes_out == 5000 and a.bytes_in == 5000
    a.close()
    b.close()


class CuttableProxy:
    """A loopback TCP relay to the broker whose live connections can be cut, like a network drop."""

    def __init__(self, upstream: str) -> None:
        self.upstream = parse_broker_url(upstream)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"mqtt://127.0.0.1:{self.server.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection((self.upstream.host, self.upstream.port))
            self.conns += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self.conns.clear()

    def close(self) -> None:
        self.cut()
        self.server.close()


def test_status_is_restored_after_the_connection_drops(mosquitto: str) -> None:
    watcher = MqttLink(mosquitto, "watcher", clean_session=True)
    watcher.connect(10)
    watcher.subscribe("f/status")
    proxy = CuttableProxy(mosquitto)
    device = MqttLink(proxy.url, "device-1", will=("f/status", b"offline"))
    device.connect(10)
    device.birth = ("f/status", b"ready")
    device.publish("f/status", b"ready", retain=True)
    _drain_until(watcher, "f/status", b"ready", 10)
    proxy.cut()  # the network drops: the broker publishes the last will ...
    _drain_until(watcher, "f/status", b"offline", 10)
    # ... and the device reconnects by itself and restores its status over the will
    _drain_until(watcher, "f/status", b"ready", 30)
    device.close()
    proxy.close()
    watcher.close()


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://h:1884").url == "mqtt://h:1884"
    assert parse_broker_url("localhost").port == 1883
    for bad in ("http://h:1", "mqtt://", "mqtt://h:99999", "mqtt://h:1/path"):
        with pytest.raises(ConfigError):
            parse_broker_url(bad)
