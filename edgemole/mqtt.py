"""A thin layer over paho-mqtt shared by the aggregator, the edge client and the simulator.

Messages are handed from paho's network thread to the owner's thread through a queue, so that all
state changes happen in one thread and training never blocks keep-alives. Byte counters measure
exactly the payloads that crossed the wire in each direction.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from edgemole.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Accept ``mqtt://host:port``, ``tcp://host:port`` or ``host:port`` (port defaults to 1883)."""
    text = url if "://" in url else f"mqtt://{url}"
    try:
        parsed = urlparse(text)
        port = parsed.port or 1883
    except ValueError:
        raise ConfigError(f"invalid broker URL {url!r} (expected mqtt://host:port)") from None
    if parsed.scheme not in ("mqtt", "tcp") or not parsed.hostname or parsed.path not in ("", "/"):
        raise ConfigError(f"invalid broker URL {url!r} (expected mqtt://host:port)")
    return BrokerAddress(parsed.hostname, port)


@dataclass
class Inbound:
    topic: str
    payload: bytes
    retain: bool


class Link(Protocol):
    """What the roles need from a transport: :class:`MqttLink` here, or the bench's in-memory link."""

    birth: tuple[str, bytes] | None
    bytes_in: int
    bytes_out: int

    def connect(self, timeout_s: float = 30.0) -> None: ...
    def subscribe(self, *topics: str) -> None: ...
    def publish(self, topic: str, payload: bytes, *, retain: bool = False, wait_s: float | None = 30.0) -> int: ...
    def receive(self, timeout_s: float) -> Inbound | None: ...
    def close(self) -> None: ...

    @property
    def connected(self) -> bool: ...


class MqttLink:
    """One MQTT connection with an inbound queue, QoS 1 publishing and wire byte counters."""

    def __init__(
        self,
        broker: str,
        client_id: str,
        *,
        clean_session: bool = False,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.address = parse_broker_url(broker)
        self.client_id = client_id
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.bytes_in = 0
        self.bytes_out = 0
        self._subscriptions: list[str] = []
        #: retained (topic, payload) re-published after every reconnect: a device's latest status, which the
        #: broker replaced by the last will ("offline") when the connection dropped
        self.birth: tuple[str, bytes] | None = None
        self._connected = threading.Event()
        self._refused: str | None = None
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- paho callbacks (network thread) -------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self._refused = str(reason_code)
            return
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        if self.birth is not None:
            client.publish(self.birth[0], self.birth[1], qos=1, retain=True)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._connected.clear()
        if reason_code != 0:
            log.warning("lost connection to %s (%s); reconnecting", self.address.url, reason_code)

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        payload = bytes(message.payload)
        self.bytes_in += len(payload)
        self.inbox.put(Inbound(message.topic, payload, bool(message.retain)))

    # -- owner thread --------------------------------------------------------------------------
    def connect(self, timeout_s: float = 30.0) -> None:
        """Connect with exponential back-off; a one-line :class:`BrokerError` if the broker stays away."""
        deadline = time.monotonic() + timeout_s
        delay, attempts, last = 0.25, 0, ""
        while True:
            attempts += 1
            try:
                self._client.connect(self.address.host, self.address.port, keepalive=30)
                break
            except OSError as exc:
                last = exc.strerror or str(exc)
            if time.monotonic() + delay > deadline:
                raise BrokerError(
                    f"cannot reach MQTT broker at {self.address.url} after {attempts} attempts: {last}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        self._client.loop_start()
        while not self._connected.wait(0.1):
            if self._refused:
                self.close()
                raise BrokerError(f"MQTT broker at {self.address.url} refused the connection: {self._refused}")
            if time.monotonic() > deadline:
                self.close()
                raise BrokerError(f"no CONNACK from MQTT broker at {self.address.url} within {timeout_s:.0f} s")

    def subscribe(self, *topics: str) -> None:
        """Subscribe now and after every reconnect, at QoS 1."""
        for topic in topics:
            if topic not in self._subscriptions:
                self._subscriptions.append(topic)
            self._client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, wait_s: float | None = 30.0) -> int:
        """Publish at QoS 1; by default wait until the broker acknowledged it. Returns bytes sent."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            raise BrokerError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if wait_s is not None and info.rc == mqtt.MQTT_ERR_SUCCESS:
            info.wait_for_publish(timeout=wait_s)  # when offline, paho queues it for the reconnect
        self.bytes_out += len(payload)
        return len(payload)

    def receive(self, timeout_s: float) -> Inbound | None:
        """Next inbound message, or None after ``timeout_s``."""
        try:
            return self.inbox.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            return None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def close(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
