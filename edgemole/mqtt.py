"""A thin layer over paho-mqtt shared by the aggregator, the edge client and the simulator.

Messages are handed from paho's network thread to the owner's thread through a queue, so that all
state changes happen in one thread and training never blocks keep-alives. Byte counters measure
exactly the payloads that crossed the wire in each direction. The transport (``mqtts://``, CA, client
certificate, password) and the identity rule live here too, so every role gets them the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgemole.errors import BrokerError, ConfigError, first_line

log = logging.getLogger(__name__)


#: topic of the inbox event a link emits after every successful re-connect (never after the first connect): the
#: roles re-publish what the broker may have lost (retained state, outstanding assignments, a kept update)
RECONNECTED = "$edgemole/reconnected"

#: bytes an MQTT packet carries besides the message (fixed and variable header, topic, properties)
PACKET_HEADROOM = 64 * 1024

TLS_SCHEMES = ("mqtts", "ssl")
PLAIN_SCHEMES = ("mqtt", "tcp")
#: seconds an MQTT 5 CONNECT waits for its CONNACK before the link tries MQTT 3.1.1
V5_CONNACK_S = 3.0
#: ``EDGEMOLE_MQTT_VERSION=3.1.1`` skips the MQTT 5 attempt (``edgemole simulate`` sets it for its embedded amqtt
#: broker, which would cost every role V5_CONNACK_S at connect); unset or ``5``: MQTT 5, falling back to 3.1.1
MQTT_VERSION_ENV = "EDGEMOLE_MQTT_VERSION"
URL_HINT = "expected mqtt://host:port or mqtts://host:port"


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    #: user name given in the URL (``mqtt://user@host``); a password there is refused
    username: str | None = None

    @property
    def url(self) -> str:
        """The URL without credentials: safe to log."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Accept ``mqtt://``/``tcp://`` (plain, port 1883), ``mqtts://``/``ssl://`` (TLS, port 8883) or ``host:port``.

    A password in the URL is refused: it would end up in shell history, process lists and logs.
    """
    text = url if "://" in url else f"mqtt://{url}"
    try:
        parsed = urlparse(text)
        tls = parsed.scheme in TLS_SCHEMES
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"invalid broker URL {_redact(url)!r} ({URL_HINT})") from None
    if parsed.password is not None:
        raise ConfigError(f"a password in the broker URL {_redact(url)!r} is refused: use --password-file or "
                          "EDGEMOLE_MQTT_PASSWORD")
    if (parsed.scheme not in TLS_SCHEMES + PLAIN_SCHEMES or not parsed.hostname
            or parsed.path not in ("", "/") or parsed.query):
        raise ConfigError(f"invalid broker URL {_redact(url)!r} ({URL_HINT})")
    return BrokerAddress(parsed.hostname, port, tls, parsed.username or None)


def _redact(url: str) -> str:
    """``url`` with any ``user:password@`` part masked, for error messages."""
    head, sep, tail = url.partition("://")
    if sep and "@" in tail.split("/", 1)[0]:
        userinfo, _, rest = tail.partition("@")
        return f"{head}://{userinfo.split(':', 1)[0]}:***@{rest}" if ":" in userinfo else url
    return url


def packet_limit(max_message_bytes: int) -> int:
    """The MQTT maximum packet size that lets through a message of ``max_message_bytes`` and nothing much larger."""
    return max_message_bytes + PACKET_HEADROOM


@dataclass(frozen=True)
class BrokerCredentials:
    """How a role proves who it is to the broker: a CA to trust, a client certificate (mutual TLS), a user name and
    a password. The password is read from a file or ``EDGEMOLE_MQTT_PASSWORD`` and never shown (``repr`` hides it)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                username: str | None = None, password_file: str | None = None,
                env: Mapping[str, str] | None = None) -> BrokerCredentials | None:
        """Flags first, then ``EDGEMOLE_MQTT_*`` variables; None when nothing is configured. Reads the password
        and checks every file now, so that a mistake is one line before anything connects."""
        env = os.environ if env is None else env
        pick = lambda value, var: value if value else (env.get(var) or None)  # noqa: E731
        ca_file = pick(ca_file, "EDGEMOLE_MQTT_CA_FILE")
        cert_file = pick(cert_file, "EDGEMOLE_MQTT_CERT_FILE")
        key_file = pick(key_file, "EDGEMOLE_MQTT_KEY_FILE")
        username = pick(username, "EDGEMOLE_MQTT_USERNAME")
        password_file = pick(password_file, "EDGEMOLE_MQTT_PASSWORD_FILE")
        password = None
        if password_file:
            try:
                password = Path(password_file).read_text().strip("\r\n")
            except OSError as exc:
                raise ConfigError(f"cannot read the MQTT password file {password_file}: {exc.strerror}") from None
            if not password:
                raise ConfigError(f"the MQTT password file {password_file} is empty")
        elif env.get("EDGEMOLE_MQTT_PASSWORD"):
            password = env["EDGEMOLE_MQTT_PASSWORD"]
        if not any((ca_file, cert_file, key_file, username, password)):
            return None
        creds = cls(ca_file, cert_file, key_file, username, password_file, password)
        creds.check()
        return creds

    def check(self) -> None:
        """One-line errors for unreadable files, a certificate without its key, a password without a user name."""
        for what, path in (("CA file", self.ca_file), ("certificate file", self.cert_file),
                           ("key file", self.key_file)):
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"cannot read the MQTT {what} {path}")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("a client certificate needs its key and a key its certificate (--cert-file, --key-file)")
        if self.password is not None and not self.username:
            raise ConfigError("an MQTT password needs a user name (--username or EDGEMOLE_MQTT_USERNAME)")

    @property
    def tls_material(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    def credential_name(self) -> str | None:
        """The identity the broker will see: the user name, else the client certificate's common name."""
        if self.username:
            return self.username
        if self.cert_file:
            return certificate_common_name(self.cert_file)
        return None


def certificate_common_name(cert_file: str) -> str:
    """The subject CN of a PEM certificate (Mosquitto's ``use_identity_as_username`` takes the same)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the client certificate {cert_file}: {first_line(exc)}") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ConfigError(f"the client certificate {cert_file} has no common name")
    return str(names[0].value)


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
    """One MQTT connection with an inbound queue, QoS 1 publishing and wire byte counters.

    It speaks MQTT 5 (announcing ``max_packet_bytes`` as its Maximum Packet Size, so that the broker drops a larger
    message instead of sending it) and falls back to 3.1.1 for a broker that refuses v5 (the embedded amqtt). With
    ``credentials`` that name an identity the MQTT client id is that name (the generated broker config sets
    ``use_username_as_clientid``, and the ACL is written per identity); ``identity`` is the role's own id, refused
    when it differs from the credential's name.
    """

    def __init__(
        self,
        broker: str,
        client_id: str,
        *,
        clean_session: bool = False,
        will: tuple[str, bytes] | None = None,
        credentials: BrokerCredentials | None = None,
        identity: str | None = None,
        max_packet_bytes: int | None = None,
    ) -> None:
        self.address = parse_broker_url(broker)
        self.credentials = credentials
        if self.address.username and credentials is not None and credentials.username \
                and credentials.username != self.address.username:
            raise ConfigError(f"the broker URL names user {self.address.username!r} but the credentials "
                              f"{credentials.username!r}")
        if self.address.username and (credentials is None or not credentials.username):
            credentials = self.credentials = BrokerCredentials(
                **{**(vars(credentials) if credentials else {}), "username": self.address.username})
        name = credentials.credential_name() if credentials is not None else None
        if name is not None and identity is not None and name != identity:
            raise ConfigError(f"id {identity!r} differs from the name {name!r} of its broker credential: "
                              "a device may only speak as itself")
        if credentials is not None and credentials.tls_material and not self.address.tls:
            raise ConfigError(f"a CA file or client certificate needs an mqtts:// broker URL, not "
                              f"{self.address.url}")
        if credentials is not None and credentials.password is not None and not self.address.tls:
            log.warning("sending the MQTT password to %s without TLS: anyone on the path can read it (use mqtts://)",
                        self.address.url)
        self.client_id = name or client_id
        self.clean_session = clean_session
        self.max_packet_bytes = max_packet_bytes
        self.will = will
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.bytes_in = 0
        self.bytes_out = 0
        self._subscriptions: list[str] = []
        #: retained (topic, payload) re-published after every reconnect: a device's latest status, which the
        #: broker replaced by the last will ("offline") when the connection dropped
        self.birth: tuple[str, bytes] | None = None
        self._connected = threading.Event()
        self._refused: str | None = None
        self._ever_connected = False
        self._early_drops = 0  # connections closed before any CONNACK: TLS or the client certificate refused
        #: the protocol spoken: MQTT 5 unless the broker refused it (or the environment asks for 3.1.1)
        version = os.environ.get(MQTT_VERSION_ENV, "5")
        if version not in ("5", "3.1.1"):
            raise ConfigError(f"{MQTT_VERSION_ENV} must be 5 or 3.1.1, got {version!r}")
        self.protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
        self._client = self._make_client()

    def _make_client(self) -> mqtt.Client:
        v5 = self.protocol == mqtt.MQTTv5
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if v5 else self.clean_session,
            protocol=self.protocol,
        )
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        creds = self.credentials
        if self.address.tls:
            try:
                client.tls_set(ca_certs=creds.ca_file if creds else None, certfile=creds.cert_file if creds else None,
                               keyfile=creds.key_file if creds else None, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError(f"cannot load the TLS files for {self.address.url}: {first_line(exc)}") from None
        if creds is not None and creds.username:
            client.username_pw_set(creds.username, creds.password)
        if self.will is not None:
            client.will_set(self.will[0], self.will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Properties | None:
        if self.protocol != mqtt.MQTTv5:
            return None
        props = Properties(PacketTypes.CONNECT)
        # a persistent session (3.1.1's clean_session=False) never expires; a clean one ends with the connection
        props.SessionExpiryInterval = 0 if self.clean_session else 0xFFFFFFFF
        if self.max_packet_bytes:
            props.MaximumPacketSize = min(self.max_packet_bytes, 268_435_460)
        return props

    # -- paho callbacks (network thread) -------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self._refused = str(reason_code)
            return
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        if self.birth is not None:
            client.publish(self.birth[0], self.birth[1], qos=1, retain=True)
        if self._ever_connected:
            self.inbox.put(Inbound(RECONNECTED, b"", False))
        self._ever_connected = True
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._connected.clear()
        if not self._ever_connected:
            self._early_drops += 1
        elif reason_code != 0:
            log.warning("lost connection to %s (%s); reconnecting", self.address.url, reason_code)

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        payload = bytes(message.payload)
        self.bytes_in += len(payload)
        self.inbox.put(Inbound(message.topic, payload, bool(message.retain)))

    # -- owner thread --------------------------------------------------------------------------
    def connect(self, timeout_s: float = 30.0) -> None:
        """Connect with exponential back-off; a one-line :class:`BrokerError` if the broker stays away or refuses."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._open(deadline, timeout_s)
            self._client.loop_start()
            # amqtt neither answers nor closes a v5 CONNECT with properties: 3.1.1 is tried after V5_CONNACK_S
            attempt_end = min(deadline, time.monotonic() + V5_CONNACK_S) if self.protocol == mqtt.MQTTv5 \
                else deadline
            while not self._connected.wait(0.1):
                if self._refused or self._early_drops >= self._drops_to_give_up() or time.monotonic() > attempt_end:
                    break
            if self._connected.is_set():
                return
            self._client.loop_stop()
            with contextlib.suppress(Exception):
                self._client.disconnect()
            # a broker without MQTT 5 refuses it (amqtt: "unsupported protocol version") or, given v5 properties,
            # drops the connection: try again in 3.1.1, which also tells a real refusal from the protocol
            if self.protocol == mqtt.MQTTv5 and time.monotonic() < deadline and (
                    not self._refused or "protocol version" in self._refused.lower()):
                log.info("%s refused MQTT 5; trying MQTT 3.1.1", self.address.url)
                self.protocol, self._refused, self._early_drops = mqtt.MQTTv311, None, 0
                self._client = self._make_client()
                continue
            if self._refused:
                raise BrokerError(f"MQTT broker at {self.address.url} refused the connection as "
                                  f"{self.client_id!r}: {self._refused}")
            if self._early_drops:
                raise BrokerError(f"MQTT broker at {self.address.url} closed the connection before accepting it as "
                                  f"{self.client_id!r}" + (" (client certificate missing, revoked or not trusted?)"
                                                           if self.address.tls else ""))
            raise BrokerError(f"no CONNACK from MQTT broker at {self.address.url} within {timeout_s:.0f} s"
                              + (" (TLS or credentials refused?)" if self.address.tls or self.credentials else ""))

    def _drops_to_give_up(self) -> int:
        """Connections closed before a CONNACK that end an attempt: one in MQTT 5 (then 3.1.1 is tried), two in
        3.1.1 (a TLS listener that refuses the client certificate closes every connection)."""
        return 1 if self.protocol == mqtt.MQTTv5 else 2

    def _open(self, deadline: float, timeout_s: float) -> None:
        """Open the TCP (and TLS) connection, retrying while the broker is not there yet."""
        delay, attempts, last = 0.25, 0, ""
        while True:
            attempts += 1
            try:
                v5 = {"clean_start": self.clean_session, "properties": self._connect_properties()} \
                    if self.protocol == mqtt.MQTTv5 else {}
                self._client.connect(self.address.host, self.address.port, keepalive=30, **v5)
                return
            except ssl.SSLError as exc:  # a certificate that does not verify does not verify on the next try
                raise BrokerError(f"TLS handshake with {self.address.url} failed: {exc.reason or first_line(exc)}"
                                  ) from None
            except OSError as exc:
                last = exc.strerror or str(exc)
            if time.monotonic() + delay > deadline:
                raise BrokerError(
                    f"cannot reach MQTT broker at {self.address.url} after {attempts} attempts: {last}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

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
