"""An in-process broker and a drop-in for :class:`~edgemole.mqtt.MqttLink`, so ``edgemole bench`` can run a whole
fleet in one process (DESIGN.md 7a) with the roles' normal code: every message is still encoded, routed by MQTT
topic filter (``+``, ``#``, retained messages) and decoded, so the bytes counted are the wire bytes.

Scheduling is cooperative and single-threaded. Participants that are driven by messages (the clients) register a
handler with :meth:`MemoryLink.serve`; the one that runs its own loop (the aggregator) calls :meth:`MemoryLink.receive`
as usual. When its inbox is empty, ``receive`` lets the served participants handle their pending messages, one each in
turn (a client's one message may be a whole round of local training), until its own inbox has something or nobody has
anything left to do; then it returns ``None`` at once instead of waiting, so rounds run at compute speed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from paho.mqtt.client import topic_matches_sub

from edgemole.errors import BrokerError
from edgemole.mqtt import Inbound


class MemoryBroker:
    """Topic routing, retained messages and the turn-taking of the links attached to it.

    In one process nothing external can happen, so a participant that keeps waiting while nobody has work waits
    for ever (e.g. a client that stopped answering); after ``stall_timeout_s`` of that, ``receive`` raises a
    :class:`BrokerError` instead of letting the aggregator spin until its deadline.
    """

    def __init__(self, stall_timeout_s: float = 30.0) -> None:
        self.links: list[MemoryLink] = []
        self.retained: dict[str, bytes] = {}
        self.stall_timeout_s = stall_timeout_s
        self._activity = 0  # messages published or handled: progress since the last idle receive
        self._idle: tuple[int, float] | None = None
        self._running = False
        self._turn = -1  # index in ``links`` of the last participant that had a turn

    def route(self, topic: str, payload: bytes, retain: bool) -> None:
        """Deliver to every connected subscriber; a retained message replaces (empty: clears) the topic's."""
        self._activity += 1
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for link in self.links:  # MQTT 3.1.1: the retain flag is set only on delivery at subscription time
            if link.connected and any(topic_matches_sub(f, topic) for f in link.subscriptions):
                link.deliver(Inbound(topic, payload, False))

    def run_others(self, waiting: MemoryLink) -> None:
        """Served links other than ``waiting`` handle their messages, one each per turn, until ``waiting``'s
        inbox has something or no served link has a message; not re-entrant (a handler that waits gets None)."""
        if self._running:
            return
        self._running = True
        try:
            idle_turns = 0  # a whole round of turns with no work means nobody has any
            while not waiting.inbox and idle_turns < len(self.links):
                self._turn = (self._turn + 1) % len(self.links)  # round robin, carried over between calls
                link = self.links[self._turn]
                if link is waiting or link.handler is None or not link.connected or not link.inbox:
                    idle_turns += 1
                    continue
                idle_turns = 0
                self._activity += 1
                link.handler(link.inbox.popleft())
        finally:
            self._running = False

    def idle(self, timeout_s: float) -> None:
        """A receive found nothing; a second one in a row without progress anywhere means nothing can happen."""
        now = time.monotonic()
        if self._idle is None or self._idle[0] != self._activity:
            self._idle = (self._activity, now)
            return
        if now - self._idle[1] > self.stall_timeout_s:
            raise BrokerError(f"in-memory fleet stalled: nothing to handle for {self.stall_timeout_s:.0f} s "
                              "while a participant waits (did a client stop answering?)")
        time.sleep(min(max(timeout_s, 0.0), 0.05))  # only in that dead end: do not burn the core meanwhile


class MemoryLink:
    """One participant's connection to a :class:`MemoryBroker`, with :class:`MqttLink`'s interface and counters."""

    def __init__(self, broker: MemoryBroker, client_id: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.inbox: deque[Inbound] = deque()
        self.subscriptions: list[str] = []
        self.handler: Callable[[Inbound], None] | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        #: kept for interface parity: :class:`MqttLink` re-publishes it after a reconnect, which never happens here
        self.birth: tuple[str, bytes] | None = None
        self._connected = False
        broker.links.append(self)

    def serve(self, handler: Callable[[Inbound], None]) -> None:
        """Have the broker hand this link's messages to ``handler`` whenever another participant waits."""
        self.handler = handler

    def deliver(self, inbound: Inbound) -> None:
        self.bytes_in += len(inbound.payload)
        self.inbox.append(inbound)

    def connect(self, timeout_s: float = 30.0) -> None:
        self._connected = True
        self._send_retained(self.subscriptions)

    def subscribe(self, *topics: str) -> None:
        """Subscribe; the retained messages that match arrive at once, flagged ``retain``."""
        new = [t for t in topics if t not in self.subscriptions]
        self.subscriptions.extend(new)
        if self._connected:
            self._send_retained(topics)

    def _send_retained(self, filters: tuple[str, ...] | list[str]) -> None:
        for topic, payload in list(self.broker.retained.items()):
            if any(topic_matches_sub(f, topic) for f in filters):
                self.deliver(Inbound(topic, payload, True))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, wait_s: float | None = 30.0) -> int:
        """Route ``payload`` now; returns the bytes sent (what MQTT would carry as payload)."""
        if not self._connected:
            raise BrokerError(f"publish to {topic} on a closed in-memory link ({self.client_id})")
        self.bytes_out += len(payload)
        self.broker.route(topic, bytes(payload), retain)
        return len(payload)

    def receive(self, timeout_s: float) -> Inbound | None:
        """The next message; when there is none, the other participants work first; None if nobody can."""
        if not self.inbox:
            self.broker.run_others(self)
        if self.inbox:
            return self.inbox.popleft()
        self.broker.idle(timeout_s)
        return None

    @property
    def connected(self) -> bool:
        return self._connected

    def close(self) -> None:
        self._connected = False


class RecordingLink:
    """A link that only keeps what its owner publishes: one client driven message by message, with no broker (the
    native client's ``edgemole-device round`` has the same one), for parity checks and benchmarks."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.birth: tuple[str, bytes] | None = None
        self.bytes_in = self.bytes_out = 0
        self.connected = True

    def connect(self, timeout_s: float = 30.0) -> None: ...
    def subscribe(self, *topics: str) -> None: ...
    def receive(self, timeout_s: float) -> None: ...
    def close(self) -> None: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, wait_s: float | None = 30.0) -> int:
        self.published.append((topic, payload))
        self.bytes_out += len(payload)
        return len(payload)
