"""`--dqn` mode: the model topic carries an ONNX model that ONNX Runtime loads, described by its
JSON envelope, and its Q-values match the ones published on the qtable topic."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

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

from tether.ingest.android_sim import AndroidSimulator, connect, make_apps, make_client
from tether.ingest.mqtt_protocol import Topics, dumps
from tether.ingest.mqtt_server import MLTrainingServer, ServerConfig, state_bucket

pytestmark = [pytest.mark.integration, requires_mosquitto]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dqn_model_topic_carries_an_onnx_model_runtime_loads(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    broker = Mosquitto(tmp_path).start()
    prefix = unique_prefix()
    topics = Topics(prefix)
    data = tmp_path / "data"
    cfg = ServerConfig(
        broker="127.0.0.1",
        port=broker.port,
        topic_prefix=prefix,
        client_id=f"dqn-{prefix}",
        data_dir=data,
        use_dqn=True,
        provider="npu",  # not available here: one log line, then CPU
        model_interval=3600,  # only the export command publishes the model in this test
    )
    server = MLTrainingServer(cfg)
    server.start()
    observer = Observer(broker.port, [topics.model, topics.model_onnx, topics.status, topics.qtable_filter])
    apps = make_apps(2, seed=3, screens=(8, 10))
    sim = AndroidSimulator(
        broker="127.0.0.1", port=broker.port, apps=apps, devices=2, seed=1, batch=10, topic_prefix=prefix
    )
    try:
        sim.connect()
        sim.run(steps=400)
        assert sim.flush(60)
        wait_until(lambda: server.counters.accepted == 800, timeout=60)
        wait_until(lambda: server.model.updates > 0, timeout=60)

        reply = send_command(observer, topics, "export", timeout=60)
        assert reply["ok"] is True, reply
        envelope = observer.wait_for(lambda: observer.latest_json(topics.model))
        blob = observer.wait_for(lambda: observer.retained.get(topics.model_onnx))
        assert envelope["v"] == 1 and envelope["format"] == "onnx" and envelope["version"] >= 1
        assert envelope["sha256"] == hashlib.sha256(blob).hexdigest() == reply["sha256"]
        assert envelope["bytes"] == len(blob)
        spec = envelope["input"]
        assert spec["name"] == "bucket" and spec["dtype"] == "int64" and spec["buckets"] == 4096
        assert set(envelope["actions"]) == {a for app in apps for s in app.edges for a in app.edges[s]}

        session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["q_values"]

        # A device computes the bucket from the documented hash and gets the published Q-values.
        app = apps[0]
        table = observer.wait_for(lambda: observer.latest_json(topics.qtable(app.package)))["q"]
        states = sorted(table)
        buckets = np.array([state_bucket(app.package, s, spec["buckets"]) for s in states], dtype=np.int64)
        (q,) = session.run(None, {"bucket": buckets})
        assert q.shape == (len(states), envelope["output"]["shape"][1])
        index = {a: i for i, a in enumerate(envelope["actions"])}
        for row, s in enumerate(states):
            for action, value in table[s].items():
                assert q[row, index[action]] == pytest.approx(value, abs=1e-4)

        assert server.status()["provider"] == "CPUExecutionProvider"
        assert any("npu" in r.getMessage() and "not available" in r.getMessage() for r in caplog.records)
    finally:
        sim.close()
        observer.close()
        server.stop()

    # The DQN, its replay memory and its action vocabulary survive a restart.
    updates, actions = server.model.updates, list(server.model.actions)
    again = MLTrainingServer(cfg)
    again.start()
    try:
        assert again.model.updates == updates and again.model.actions == actions
        assert again.model.size == 800
        client = make_client(f"late-{prefix}")
        connect(client, "127.0.0.1", broker.port)
        client.publish(
            topics.logs, dumps(transition("late", 1, features=[0.1, 0.2])), qos=1
        ).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
        # This DQN embeds screen ids; a feature vector is refused, not silently mixed in.
        wait_until(lambda: again.counters.rejected.get("features_mismatch") == 1)
    finally:
        again.stop()
        broker.stop()
