"""The native client's MQTT link (devices/native/src/mqtt_link.cpp) against a real Mosquitto, through
``edgemole-mqtt-tool``, with paho-mqtt on the other side: the exact client id and session flags, QoS 1 both ways,
the retained birth status and last will, a persistent session, keep-alive while only polling, reconnection after a
broker restart, payloads above the 16 MiB message limit, and one-line errors for brokers it cannot use."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from native import OwnMosquitto, native_build

from edgemole.broker import free_port
from edgemole.mqtt import parse_broker_url

pytestmark = pytest.mark.mosquitto

DEVICE_ID = "edgemole:demo:device:phone-1"


@pytest.fixture(scope="module")
def tool() -> Path:
    """The tool from the session's native build."""
    binary = native_build() / "tests" / "edgemole-mqtt-tool"
    if not binary.exists():
        pytest.fail(f"{binary} was not built")
    return binary


class Peer:
    """A paho-mqtt client on the other side of the broker that records everything it receives."""

    def __init__(self, url: str, client_id: str | None = None) -> None:
        address = parse_broker_url(url)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._acks: dict[int, threading.Event] = {}
        self._connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"peer-{uuid.uuid4().hex}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda *args: self._connected.set()
        self.client.on_message = lambda client, userdata, message: self.messages.put(message)
        self.client.on_subscribe = lambda client, userdata, mid, *args: self._ack(mid).set()
        self.client.connect(address.host, address.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(10), "the peer could not connect"

    def _ack(self, mid: int) -> threading.Event:
        return self._acks.setdefault(mid, threading.Event())

    def subscribe(self, *topics: str) -> None:
        for topic in topics:
            _, mid = self.client.subscribe(topic, qos=1)
            assert self._ack(mid).wait(10), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(30)

    def expect(self, topic: str, payload: bytes | None = None, timeout_s: float = 15.0) -> mqtt.MQTTMessage:
        """The next message on ``topic`` (with ``payload`` when given); others are skipped."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if message.topic == topic and (payload is None or message.payload == payload):
                return message
        raise AssertionError(f"nothing{' matching' if payload else ''} arrived on {topic} within {timeout_s} s")

    def retained(self, topic: str, timeout_s: float = 5.0) -> mqtt.MQTTMessage:
        """The retained message of ``topic``, as a new subscriber gets it."""
        self.subscribe(topic)
        message = self.expect(topic, timeout_s=timeout_s)
        assert message.retain
        return message

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def peer(url: str) -> Iterator[Peer]:
    p = Peer(url)
    try:
        yield p
    finally:
        p.close()


class Tool:
    """``edgemole-mqtt-tool`` running in the background; its stdout lines are collected as they come."""

    def __init__(self, binary: Path, *args: str) -> None:
        self.proc = subprocess.Popen([str(binary), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout_s: float = 30.0) -> str:
        """The next stdout line starting with ``prefix``."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"the tool printed no {prefix!r} within {timeout_s} s; saw {self.seen}; "
                             f"exit code {self.proc.poll()}")

    def finish(self, timeout_s: float = 60.0) -> tuple[int, str]:
        """Exit code and stderr once the tool has ended."""
        rc = self.proc.wait(timeout_s)
        assert self.proc.stderr is not None
        return rc, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def tools() -> Iterator[list[Tool]]:
    """Tools started by a test; killed at its end whatever happened."""
    started: list[Tool] = []
    yield started
    for t in started:
        t.kill()


def start(started: list[Tool], binary: Path, *args: str) -> Tool:
    t = Tool(binary, *args)
    started.append(t)
    return t


def run_tool(binary: Path, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout_s, check=False,
                          env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})


def write(path: Path, payload: bytes) -> str:
    path.write_bytes(payload)
    return str(path)


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[OwnMosquitto]:
    broker = OwnMosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


def test_client_id_qos_birth_and_last_will(tool: Path, mosquitto: str, tmp_path: Path, tools: list[Tool]) -> None:
    with peer(mosquitto) as other:
        other.subscribe("t/status", "t/out")
        t = start(tools, tool, "--broker", mosquitto, "--client-id", DEVICE_ID,
                  "--will-topic", "t/status", "--will-file", write(tmp_path / "will.bin", b"offline\x00\xff"),
                  "--birth-topic", "t/status", "--birth-file", write(tmp_path / "birth.bin", b"online"),
                  "--subscribe", "t/in", "--publish", f"t/out={write(tmp_path / 'out.bin', b'up' * 500)}",
                  "--hold", "--timeout", "60")
        t.expect("ready")
        assert t.expect("published t/out") == "published t/out 1000"
        # Paho's synchronous API without callbacks: the link runs on the caller's thread only (qemu needs that);
        # checked on Linux when the tool runs natively (an emulator has threads of its own)
        status = Path(f"/proc/{t.proc.pid}/status")
        if status.exists() and "Name:\tedgemole-mqtt" in (text := status.read_text()):
            assert "Threads:\t1\n" in text
        # the exact MQTT client id, MQTT 3.1.1 (p2), clean session off (c0), keep-alive 30 s
        log = (tmp_path / "mosquitto.log").read_text()
        assert f"as {DEVICE_ID} (p2, c0, k30)" in log
        # the birth status is retained; the tool's publish arrives with QoS 1 (the peer subscribed at QoS 1)
        birth = other.expect("t/status", b"online")
        assert birth.qos == 1
        out = other.expect("t/out", b"up" * 500)
        assert out.qos == 1
        with peer(mosquitto) as late:
            assert late.retained("t/status").payload == b"online"
        # the tool subscribed at QoS 1: a QoS 1 message reaches it as QoS 1
        other.publish("t/in", b"down")
        assert t.expect("received 0") == "received 0 t/in 4 retained=0 qos=1"

        # killed without a DISCONNECT: the broker publishes the last will, retained
        t.proc.send_signal(signal.SIGKILL)
        t.proc.wait(10)
        will = other.expect("t/status", b"offline\x00\xff")
        assert will.qos == 1
    with peer(mosquitto) as late:
        assert late.retained("t/status").payload == b"offline\x00\xff"


def test_clean_disconnect_sends_no_will_and_the_session_persists(tool: Path, mosquitto: str, tmp_path: Path) -> None:
    common = ("--broker", mosquitto, "--client-id", DEVICE_ID, "--will-topic", "t/status",
              "--will-file", write(tmp_path / "will.bin", b"offline"))
    first = run_tool(tool, *common, "--subscribe", "t/queued", "--birth-topic", "t/status",
                     "--birth-file", write(tmp_path / "birth.bin", b"online"))
    assert first.returncode == 0, first.stderr
    assert "done received=0" in first.stdout
    with peer(mosquitto) as other:
        assert other.retained("t/status").payload == b"online"  # a clean disconnect: no will
        other.publish("t/queued", b"while you were away")
    # same client id, no --subscribe: the broker kept the session and its QoS 1 message
    second = run_tool(tool, *common, "--receive", "1", "--timeout", "20", "--out", str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert "received 0 t/queued 19 retained=0 qos=1" in second.stdout
    assert (tmp_path / "0.bin").read_bytes() == b"while you were away"


def test_poll_keeps_the_connection_and_queues_messages(tool: Path, mosquitto: str, tmp_path: Path,
                                                       tools: list[Tool]) -> None:
    """With a 2 s keep-alive the broker drops a silent client after 3 s; polling every 0.2 s for 7 s keeps it."""
    t = start(tools, tool, "--broker", mosquitto, "--client-id", DEVICE_ID, "--keepalive", "2",
              "--subscribe", "t/in", "--busy", "7", "--poll-ms", "200", "--receive", "2", "--timeout", "20")
    t.expect("ready")
    with peer(mosquitto) as other:
        other.publish("t/in", b"one")
        other.publish("t/in", b"two")
    assert t.expect("busy", 30) == "busy queued=2"
    assert t.expect("received 0") == "received 0 t/in 3 retained=0 qos=1"
    assert t.expect("received 1") == "received 1 t/in 3 retained=0 qos=1"
    done = t.expect("done")
    assert "reconnects=0" in done and "bytes_in=6" in done
    rc, err = t.finish()
    assert rc == 0, err
    log = (tmp_path / "mosquitto.log").read_text()
    assert "exceeded timeout" not in log


def test_reconnects_after_a_broker_restart(tool: Path, own_mosquitto: OwnMosquitto, tmp_path: Path,
                                           tools: list[Tool]) -> None:
    url = own_mosquitto.url
    t = start(tools, tool, "--broker", url, "--client-id", DEVICE_ID,
              "--will-topic", "t/status", "--will-file", write(tmp_path / "will.bin", b"offline"),
              "--birth-topic", "t/status", "--birth-file", write(tmp_path / "birth.bin", b"ready"),
              "--subscribe", "t/in", "--receive", "1", "--timeout", "60")
    t.expect("ready")
    with peer(url) as other:
        assert other.retained("t/status").payload == b"ready"
    # the broker goes away and comes back on the same port with no memory of the session
    own_mosquitto.stop()
    time.sleep(1.0)
    own_mosquitto.start()
    with peer(url) as other:
        # the link reconnected and re-published its birth status (the new broker had none)
        deadline = time.monotonic() + 30
        while True:
            with peer(url) as probe:
                probe.subscribe("t/status")
                with contextlib.suppress(AssertionError):
                    if probe.expect("t/status", timeout_s=1).payload == b"ready":
                        break
            assert time.monotonic() < deadline, "the tool never re-published its birth status"
        # and subscribed again: a message reaches it
        other.publish("t/in", b"after the restart")
        assert t.expect("received 0") == "received 0 t/in 17 retained=0 qos=1"
    done = t.expect("done")
    assert "reconnects=1" in done
    rc, err = t.finish()
    assert rc == 0, err
    assert "lost connection to " + url in err and "reconnected to " + url in err


def test_a_publish_while_the_broker_is_away_is_sent_after_reconnecting(tool: Path, own_mosquitto: OwnMosquitto,
                                                                      tmp_path: Path, tools: list[Tool]) -> None:
    """The broker goes away during "training" (the link only polls) and returns while the update is published."""
    t = start(tools, tool, "--broker", own_mosquitto.url, "--client-id", DEVICE_ID, "--subscribe", "t/in",
              "--busy", "3", "--poll-ms", "100", "--retain",
              "--publish-after", f"t/update={write(tmp_path / 'update.bin', b'update')}", "--timeout", "1")
    t.expect("ready")
    own_mosquitto.stop()
    t.expect("busy", 30)
    time.sleep(1.5)  # publish() is now waiting for the broker
    own_mosquitto.start()
    assert t.expect("published t/update", 60) == "published t/update 6"
    assert "reconnects=1" in t.expect("done")
    rc, err = t.finish()
    assert rc == 0, err
    with peer(own_mosquitto.url) as other:
        assert other.retained("t/update").payload == b"update"


def test_payloads_above_the_message_limit_cross_whole(tool: Path, mosquitto: str, tmp_path: Path,
                                                      tools: list[Tool]) -> None:
    """17 MiB is more than the 16 MiB that decode() accepts: the link must still carry it (decode rejects it)."""
    big_in = os.urandom(17 * 1024 * 1024)
    big_out = os.urandom(17 * 1024 * 1024 + 3)
    out_dir = tmp_path / "received"
    out_dir.mkdir()
    with peer(mosquitto) as other:
        other.subscribe("t/out")
        t = start(tools, tool, "--broker", mosquitto, "--client-id", DEVICE_ID, "--subscribe", "t/in",
                  "--publish", f"t/out={write(tmp_path / 'out.bin', big_out)}", "--receive", "1",
                  "--timeout", "120", "--out", str(out_dir))
        t.expect("ready")
        assert t.expect("published t/out", 120) == f"published t/out {len(big_out)}"
        assert other.expect("t/out", timeout_s=60).payload == big_out
        other.publish("t/in", big_in)
        assert t.expect("received 0", 120) == f"received 0 t/in {len(big_in)} retained=0 qos=1"
    rc, err = t.finish(120)
    assert rc == 0, err
    assert (out_dir / "0.bin").read_bytes() == big_in


def test_broker_url_forms(tool: Path, mosquitto: str) -> None:
    port = parse_broker_url(mosquitto).port
    for url in (f"tcp://127.0.0.1:{port}", f"127.0.0.1:{port}", f"MQTT://localhost:{port}/"):
        result = run_tool(tool, "--broker", url, "--client-id", DEVICE_ID)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ready\n")


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unusable_brokers_give_one_line_errors(tool: Path, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    began = time.monotonic()
    result = run_tool(tool, "--broker", f"127.0.0.1:{port}", "--client-id", DEVICE_ID, "--connect-timeout", "2")
    assert time.monotonic() - began < 15
    line = _one_error_line(result)
    assert line.startswith(f"error: cannot reach MQTT broker at mqtt://127.0.0.1:{port} after ")
    assert result.returncode == 1

    denying = OwnMosquitto(tmp_path, anonymous=False)  # Mosquitto 2 refuses anonymous clients by default
    denying.start()
    try:
        result = run_tool(tool, "--broker", denying.url, "--client-id", DEVICE_ID, "--connect-timeout", "10")
    finally:
        denying.stop()
    assert _one_error_line(result) == f"error: MQTT broker at {denying.url} refused the connection: not authorized"

    for url in ("http://127.0.0.1:1883", "mqtt://127.0.0.1:99999", "mqtt://host:1883/path", "mqtt://", "ssl://@h"):
        result = run_tool(tool, "--broker", url, "--client-id", DEVICE_ID)
        assert _one_error_line(result) == (f"error: invalid broker URL '{url}' "
                                           "(expected mqtt://host:port or mqtts://host:port)")
    # a password never goes into a URL (process listings, logs), and is never shown back
    result = run_tool(tool, "--broker", "mqtt://pi-01:s3cret@127.0.0.1:1883", "--client-id", DEVICE_ID)
    assert _one_error_line(result) == ("error: the broker URL must not hold a password "
                                       "(use password_file or EDGEMOLE_MQTT_PASSWORD)")
    assert "s3cret" not in result.stderr
