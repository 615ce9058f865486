"""The link's transport features: URLs with TLS and users, credentials from flags/env, MQTT 5 maximum packet size,
the 3.1.1 fallback for the embedded broker, and the reconnect event."""

from __future__ import annotations

import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from test_mqtt_link import CuttableProxy

from edgemole.broker import embedded_broker
from edgemole.errors import ConfigError
from edgemole.mqtt import RECONNECTED, BrokerCredentials, MqttLink, parse_broker_url


def test_tls_urls_users_and_refused_passwords() -> None:
    assert parse_broker_url("mqtts://h").port == 8883 and parse_broker_url("ssl://h:9").tls
    assert parse_broker_url("mqtt://h").port == 1883 and not parse_broker_url("tcp://h:2").tls
    address = parse_broker_url("mqtts://pi-01@h:8884")
    assert address.username == "pi-01" and address.url == "mqtts://h:8884"
    with pytest.raises(ConfigError, match="password in the broker URL") as err:
        parse_broker_url("mqtt://u:hunter2@h:1883")
    assert "hunter2" not in str(err.value)
    for bad in ("mqtts://", "mqtt://h?x=1", "ws://h:1"):
        with pytest.raises(ConfigError):
            parse_broker_url(bad)


def test_credentials_from_flags_and_environment(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    env = {"EDGEMOLE_MQTT_USERNAME": "pi-01", "EDGEMOLE_MQTT_PASSWORD_FILE": str(secret)}
    creds = BrokerCredentials.resolve(env=env)
    assert creds is not None and creds.password == "s3cret" and creds.credential_name() == "pi-01"
    assert "s3cret" not in repr(creds)
    assert BrokerCredentials.resolve(username="pi-02", env=env).credential_name() == "pi-02"  # flags win
    assert BrokerCredentials.resolve(env={"EDGEMOLE_MQTT_USERNAME": "a", "EDGEMOLE_MQTT_PASSWORD": "p"}).password == "p"
    assert BrokerCredentials.resolve(env={}) is None
    for kwargs, message in (({"password_file": str(tmp_path / "missing")}, "cannot read"),
                            ({"cert_file": str(secret)}, "needs its key"),
                            ({"password_file": str(secret)}, "needs a user name"),
                            ({"ca_file": str(tmp_path / "nope.crt")}, "cannot read")):
        with pytest.raises(ConfigError, match=message):
            BrokerCredentials.resolve(**kwargs, env={})
    # the role's id must be the credential's name; with a name, the MQTT client id is that name
    with pytest.raises(ConfigError, match="differs"):
        MqttLink("mqtt://127.0.0.1:1", "x", credentials=creds, identity="pi-02")
    assert MqttLink("mqtt://127.0.0.1:1", "x", credentials=creds, identity="pi-01").client_id == "pi-01"
    with pytest.raises(ConfigError, match="mqtts://"):
        MqttLink("mqtt://127.0.0.1:1", "x", credentials=BrokerCredentials(ca_file=str(secret)))


@pytest.mark.mosquitto
def test_mqtt5_maximum_packet_size_keeps_large_messages_away(mosquitto: str) -> None:
    small = MqttLink(mosquitto, "small", clean_session=True, max_packet_bytes=100_000)
    sender = MqttLink(mosquitto, "sender", clean_session=True)
    small.connect(10)
    sender.connect(10)
    assert small.protocol == mqtt.MQTTv5
    small.subscribe("big/#")
    time.sleep(0.3)
    sender.publish("big/1", b"x" * 200_000)
    sender.publish("big/2", b"y" * 1000)
    m = small.receive(5)
    assert m is not None and m.topic == "big/2" and small.receive(0.5) is None
    small.close()
    sender.close()


def test_embedded_broker_falls_back_to_mqtt_311(tmp_path: Path) -> None:
    with embedded_broker(str(tmp_path / "amqtt.log")) as url:
        link = MqttLink(url, "old", clean_session=True, max_packet_bytes=1 << 20)
        link.connect(15)
        assert link.protocol == mqtt.MQTTv311
        link.subscribe("a")
        time.sleep(0.3)
        link.publish("a", b"hi")
        m = link.receive(5)
        assert m is not None and m.payload == b"hi"
        link.close()


@pytest.mark.mosquitto
def test_reconnect_puts_one_event_in_the_inbox(mosquitto: str) -> None:
    proxy = CuttableProxy(mosquitto)
    link = MqttLink(proxy.url, "device-r")
    link.connect(10)
    assert link.receive(0.3) is None  # not after the first connect
    proxy.cut()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (m := link.receive(0.5)) is None:
        pass
    assert m is not None and m.topic == RECONNECTED and m.payload == b""
    link.close()
    proxy.close()
