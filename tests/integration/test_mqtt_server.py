"""The Visual Mapper training server against a real Mosquitto: learning, commands, persistence,
Home Assistant discovery."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mqtt_support import (
    Mosquitto,
    Observer,
    requires_mosquitto,
    send_command,
    transition,
    unique_prefix,
    wait_until,
)

from tether.checkpoint import load_checkpoint
from tether.ingest.android_sim import AndroidSimulator, connect, make_apps, make_client
from tether.ingest.mqtt_protocol import Topics, dumps
from tether.ingest.mqtt_server import MLTrainingServer, ServerConfig

pytestmark = [pytest.mark.integration, requires_mosquitto]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture
def prefix() -> str:
    return unique_prefix()


def make_server(broker: Mosquitto, prefix: str, data_dir: Path, **kw) -> MLTrainingServer:
    cfg = ServerConfig(
        broker="127.0.0.1",
        port=broker.port,
        topic_prefix=prefix,
        client_id=f"server-{prefix}",
        data_dir=data_dir,
        **kw,
    )
    server = MLTrainingServer(cfg)
    server.start()
    return server


def publish_all(port: int, topics: Topics, payloads: list[bytes]) -> None:
    client = make_client(f"pub-{topics.prefix}")
    connect(client, "127.0.0.1", port)
    infos = [client.publish(topics.logs, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


@pytest.mark.learning
def test_devices_explore_and_published_greedy_policy_takes_near_shortest_paths(broker, prefix, tmp_path):
    """Acceptance 2: after a fixed exploration budget, the greedy policy read from the retained
    qtable/<app> messages reaches a goal in ≤ 1.2× the shortest path from ≥ 90 % of start screens."""
    topics = Topics(prefix)
    server = make_server(broker, prefix, tmp_path / "data")
    apps = make_apps(2, seed=3, screens=(9, 13))
    sim = AndroidSimulator(
        broker="127.0.0.1",
        port=broker.port,
        apps=apps,
        devices=4,
        seed=5,
        epsilon=0.3,
        batch=4,
        topic_prefix=prefix,
    )
    try:
        sim.connect()
        sim.run(steps=2000)  # 8,000 taps over 4 devices
        assert sim.flush(60)
        wait_until(lambda: server.counters.accepted == 8000, timeout=60)
        wait_until(lambda: not server._dirty_apps, timeout=10)  # the final values are published
        # A device that connects now gets the retained tables.
        observer = Observer(broker.port, [topics.qtable_filter])
        for app in apps:
            msg = observer.wait_for(lambda app=app: observer.latest_json(topics.qtable(app.package)))
            assert msg["v"] == 1 and msg["app"] == app.package
            score = app.evaluate(msg["q"], tolerance=1.2)
            assert score >= 0.9, f"{app.package}: greedy ≤ 1.2× shortest path from only {score:.0%} of starts"
        observer.close()
    finally:
        sim.close()
        server.stop()


def test_commands_status_train_export_reset(broker, prefix, tmp_path):
    topics = Topics(prefix)
    data = tmp_path / "data"
    server = make_server(broker, prefix, data)
    observer = Observer(broker.port, [topics.status, topics.qtable_filter])
    app = "com.example.cmd"
    try:
        payloads = [dumps(transition("dev-a", seq, app=app)) for seq in range(1, 41)]
        publish_all(broker.port, topics, payloads)
        wait_until(lambda: server.counters.accepted == 40)

        status = send_command(observer, topics, "status")
        assert status["ok"] is True and status["status"]["counters"]["accepted"] == 40
        assert status["status"]["apps"] == 1 and status["status"]["mode"] == "qtable"

        before = server.model.table(app)
        trained = send_command(observer, topics, "train", epochs=2)
        assert trained["ok"] is True and trained["replayed"] == 80
        assert server.model.table(app) != before  # extra passes moved the values

        exported = send_command(observer, topics, "export")
        assert exported["ok"] is True
        (path, digest), *_ = exported["files"].items()
        content = Path(path).read_bytes()
        assert hashlib.sha256(content).hexdigest() == digest
        exported_q = json.loads(content)["q"]
        assert exported_q == server.model.table(app)
        observer.wait_for(lambda: (observer.latest_json(topics.qtable(app)) or {}).get("q") == exported_q)

        reset = send_command(observer, topics, "reset")
        assert reset["ok"] is True and reset["cleared"] == [app]
        backup = load_checkpoint(Path(reset["backup"]))
        assert app in backup["models"]["qtable"]["apps"]  # the backup keeps what was cleared
        assert server.model.stats()["states"] == 0
        observer.wait_for(lambda: (observer.latest_json(topics.qtable(app)) or {}).get("q") == {})
        after = load_checkpoint(data / "mqtt_server.pt")
        assert after["models"]["qtable"]["apps"] == {}

        # Learning continues after a reset, and a repeat of an old (device, seq) is still a duplicate.
        again = [dumps(transition("dev-a", 5, app=app)), dumps(transition("dev-a", 41, app=app))]
        publish_all(broker.port, topics, again)
        wait_until(lambda: server.counters.accepted == 41 and server.counters.duplicates == 1)

        observer.client.publish(topics.command, dumps({"v": 1, "command": "explode"}), qos=1)
        notice = observer.wait_for(
            lambda: next((m for m in observer.json_on(topics.status) if m.get("type") == "error"), None)
        )
        assert notice["reason"] == "bad_command" and notice["topic"] == "command"
    finally:
        observer.close()
        server.stop()


def test_state_survives_a_restart_and_repeats_are_not_relearned(broker, prefix, tmp_path):
    topics = Topics(prefix)
    data = tmp_path / "data"
    app = "com.example.persist"
    payloads = [dumps(transition("dev-b", seq, app=app, reward=float(seq % 3))) for seq in range(1, 101)]
    server = make_server(broker, prefix, data)
    try:
        publish_all(broker.port, topics, payloads[:60])
        wait_until(lambda: server.counters.accepted == 60)
    finally:
        server.stop()
    table = server.model.table(app)
    saved = load_checkpoint(data / "mqtt_server.pt")
    assert saved["counters"]["accepted"] == 60

    # While the server is away the broker queues for its persistent session.
    publish_all(broker.port, topics, payloads[40:])  # 20 repeats + 40 new

    server = make_server(broker, prefix, data)
    try:
        assert server.counters.accepted >= 60
        wait_until(lambda: server.counters.accepted == 100)
        wait_until(lambda: server.counters.duplicates == 20)
        assert set(table) <= set(server.model.table(app))
    finally:
        server.stop()


def test_home_assistant_discovery_and_retained_status(broker, prefix, tmp_path):
    topics = Topics(prefix)
    observer = Observer(broker.port, ["homeassistant/sensor/#", topics.status])
    server = make_server(broker, prefix, tmp_path / "data", ha_discovery=True, status_interval=0.2)
    try:
        node = f"server-{prefix}"
        base = f"homeassistant/sensor/{node}"
        config = observer.wait_for(lambda: observer.latest_json(f"{base}/transitions/config"))
        assert config["state_topic"] == topics.status
        assert config["unique_id"] == f"{node}_transitions"
        assert "value_json.transitions" in config["value_template"]
        sensor = observer.wait_for(lambda: observer.latest_json(f"{base}/status/config"))
        assert sensor["availability_topic"] == topics.status
        publish_all(broker.port, topics, [dumps(transition("dev-c", s)) for s in range(1, 6)])
        status = observer.wait_for(
            lambda: next(
                (m for m in reversed(observer.json_on(topics.status)) if m.get("transitions") == 5), None
            )
        )
        assert status["state"] == "online" and status["counters"]["accepted"] == 5
    finally:
        server.stop()
    offline = observer.wait_for(lambda: (observer.latest_json(topics.status) or {}).get("state") == "offline")
    assert offline
    observer.close()


def test_server_reconnects_after_the_broker_restarts(tmp_path):
    (tmp_path / "b").mkdir()
    broker = Mosquitto(tmp_path / "b").start()
    prefix = unique_prefix()
    topics = Topics(prefix)
    server = make_server(broker, prefix, tmp_path / "data", reconnect_max_delay=2)
    try:
        # start() returns once the broker holds the subscriptions (a new session queues nothing
        # published before them), so a log sent right away is not lost.
        assert server._subscribed.is_set()
        publish_all(broker.port, topics, [dumps(transition("dev-r", 1))])
        wait_until(lambda: server.counters.accepted == 1)
        broker.stop()
        wait_until(lambda: not server.connected, timeout=20)
        broker.start()  # same port, a fresh broker (no persistence): the server subscribes again
        wait_until(lambda: server.connected, timeout=30)
        wait_until(lambda: server._subscribed.is_set())
        observer = Observer(broker.port, [topics.status])
        observer.wait_for(lambda: (observer.latest_json(topics.status) or {}).get("state") == "online")
        observer.close()
        publish_all(broker.port, topics, [dumps(transition("dev-r", 2))])
        wait_until(lambda: server.counters.accepted == 2, timeout=30)
    finally:
        server.stop()
        broker.stop()
