"""MQTT topic names, all under ``<prefix>/<fleet>/``.

The aggregator subscribes with wildcards (``clients/+/update``) and learns the sender from the
topic; the validator then checks that the message's own ``client`` field agrees with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgemole.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(value: str, what: str) -> str:
    """Reject names that would break topic structure (``/``, ``+``, ``#``) or are unreasonably long."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(
            f"invalid {what} {value!r}: use 1-64 characters from letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Every topic of one fleet; ``prefix`` may contain ``/`` (e.g. ``site1/edgemole``)."""

    fleet: str = "default"
    prefix: str = "edgemole"

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet name")
        parts = self.prefix.split("/")
        if not self.prefix or any(not p or "+" in p or "#" in p for p in parts):
            raise ConfigError(f"invalid topic prefix {self.prefix!r}: no empty levels, '+' or '#'")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    @property
    def task(self) -> str:
        """Retained: the fleet's task (model, labels, adapter and training settings)."""
        return f"{self.base}/task"

    @property
    def round(self) -> str:
        """Retained: the current round announcement."""
        return f"{self.base}/round"

    @property
    def metrics(self) -> str:
        """Per-round results published by the aggregator."""
        return f"{self.base}/metrics"

    def mqtt_client_id(self, role: str) -> str:
        """MQTT session id of a role (a device id, ``aggregator`` or ``observer-<pid>``) in this fleet.

        ``:`` cannot occur in names, and devices are ``device:<id>``, so no two roles or fleets collide.
        """
        return f"edgemole:{self.fleet}:{role}"

    def device_mqtt_id(self, client: str) -> str:
        return self.mqtt_client_id(f"device:{client}")

    def assign(self, client: str) -> str:
        return f"{self.base}/clients/{client}/assign"

    def update(self, client: str) -> str:
        return f"{self.base}/clients/{client}/update"

    def status(self, client: str) -> str:
        """Retained device status; the broker publishes the client's last will here when it vanishes."""
        return f"{self.base}/clients/{client}/status"

    @property
    def all_updates(self) -> str:
        return f"{self.base}/clients/+/update"

    @property
    def all_status(self) -> str:
        return f"{self.base}/clients/+/status"

    def parse_client_topic(self, topic: str) -> tuple[str, str] | None:
        """``(client_id, kind)`` for a ``clients/<id>/<kind>`` topic of this fleet, else None."""
        head = f"{self.base}/clients/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :].split("/")
        if len(rest) != 2 or not _NAME.fullmatch(rest[0]):
            return None
        return rest[0], rest[1]
