"""Username/password against a Mosquitto with `allow_anonymous false`, and the messages a user
sees when the broker refuses them or is not there."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mqtt_support import (
    MOSQUITTO_PASSWD,
    Mosquitto,
    Observer,
    free_port,
    requires_mosquitto,
    transition,
    unique_prefix,
)

from tether.ingest.android_sim import connect, make_client
from tether.ingest.mqtt_protocol import Topics, dumps
from tether.ingest.mqtt_server import MLTrainingServer, MQTTConnectionError, ServerConfig

pytestmark = [
    pytest.mark.integration,
    requires_mosquitto,
    pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed"),
]

USERS = {"tether": "s3cret-pass", "phone": "phone-pass"}


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory):
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto-auth"), users=USERS).start()
    yield b
    b.stop()


def _config(port: int, tmp_path: Path, **kw) -> ServerConfig:
    prefix = kw.pop("topic_prefix", unique_prefix())
    kw.setdefault("connect_timeout", 5)
    return ServerConfig(
        broker="127.0.0.1",
        port=port,
        topic_prefix=prefix,
        client_id=f"auth-{prefix}",
        data_dir=tmp_path / "data",
        **kw,
    )


def test_with_the_right_credentials_devices_are_learned_from(auth_broker, tmp_path):
    cfg = _config(auth_broker.port, tmp_path, username="tether", password=USERS["tether"])
    topics = Topics(cfg.topic_prefix)
    server = MLTrainingServer(cfg)
    server.start()
    observer = Observer(auth_broker.port, [topics.qtable_filter], username="phone", password=USERS["phone"])
    try:
        phone = make_client("phone-1", username="phone", password=USERS["phone"])
        connect(phone, "127.0.0.1", auth_broker.port)
        phone.publish(
            topics.logs, dumps(transition("phone-1", 1, reward=1.0, done=True)), qos=1
        ).wait_for_publish(10)
        phone.disconnect()
        phone.loop_stop()
        table = observer.wait_for(lambda: observer.latest_json(topics.qtable("com.example.test")))
        assert table["q"]["screen1"]["tap:Next"] == pytest.approx(0.5)
    finally:
        observer.close()
        server.stop()


@pytest.mark.parametrize(
    ("username", "password"),
    [("tether", "wrong-password"), ("nobody", "whatever"), (None, None)],
    ids=["wrong-password", "unknown-user", "anonymous"],
)
def test_refused_credentials_give_a_clear_message(auth_broker, tmp_path, username, password):
    server = MLTrainingServer(_config(auth_broker.port, tmp_path, username=username, password=password))
    with pytest.raises(MQTTConnectionError) as err:
        server.start()
    msg = str(err.value)
    assert f"127.0.0.1:{auth_broker.port}" in msg
    assert "not authorized" in msg or "authentication failed" in msg
    assert "--username" in msg and "--password" in msg  # names the fix
    assert "publish" in msg or "wrong username or password" in msg


def test_connection_refused_names_the_likely_causes(tmp_path):
    port = free_port()  # nothing listens here
    server = MLTrainingServer(_config(port, tmp_path))
    with pytest.raises(MQTTConnectionError) as err:
        server.start()
    msg = str(err.value)
    assert "connection refused" in msg and f"127.0.0.1:{port}" in msg
    assert "broker" in msg and "running" in msg and f"firewall allows TCP port {port}" in msg


@pytest.fixture
def half_broker(request: pytest.FixtureRequest) -> Iterator[int]:
    """A TCP listener that speaks only part of MQTT: with `connack` it accepts the CONNECT and
    then ignores every packet (no SUBACK); without, it never answers at all."""
    connack = request.param
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conns.append(conn)
            if connack:
                conn.recv(1024)  # CONNECT
                conn.sendall(b"\x20\x02\x00\x00")  # CONNACK: no session, accepted

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in conns:
        conn.close()
    listener.close()


@pytest.mark.parametrize(
    ("half_broker", "expected"),
    [(False, "got no MQTT answer"), (True, "did not acknowledge the subscriptions")],
    indirect=["half_broker"],
)
def test_a_listener_that_stops_answering_gives_a_clear_message(half_broker, expected, tmp_path):
    server = MLTrainingServer(_config(half_broker, tmp_path, connect_timeout=1))
    with pytest.raises(MQTTConnectionError, match=expected) as err:
        server.start()
    assert f"127.0.0.1:{half_broker}" in str(err.value)


def test_unresolvable_broker_names_the_flag(tmp_path):
    cfg = _config(1883, tmp_path)
    cfg.broker = "no-such-host.invalid"
    with pytest.raises(MQTTConnectionError, match=r"cannot resolve the MQTT broker address .* --broker"):
        MLTrainingServer(cfg).start()


def test_cli_prints_one_line_and_exits_2_on_bad_credentials(auth_broker, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ML_", "MQTT_"))}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tether.cli",
            "mqtt",
            "-b",
            "127.0.0.1",
            "-p",
            str(auth_broker.port),
            "-u",
            "tether",
            "--password",
            "wrong-password",
            "--data-dir",
            str(tmp_path / "data"),
            "--options-file",
            str(tmp_path / "absent.json"),
            "--client-id",
            f"cli-{unique_prefix()}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr and "--username" in result.stderr
