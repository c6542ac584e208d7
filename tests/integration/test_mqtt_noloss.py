"""Acceptance 3: 20,000 transitions sent with QoS 1 while the server process is SIGKILLed and
restarted mid-stream are all learned, none twice.

Every transition has its own screen and ends its episode with reward 1, so after one update its
Q-value is exactly α and after two it would be α + α(1 − α): the final table shows, transition by
transition, that nothing was lost and nothing was learned twice.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mqtt_support import Mosquitto, Observer, requires_mosquitto, unique_prefix, wait_until

from tether.checkpoint import load_checkpoint
from tether.ingest.android_sim import connect, make_client
from tether.ingest.mqtt_protocol import Topics, dumps
from tether.ingest.mqtt_server import MLTrainingServer, ServerConfig

pytestmark = [pytest.mark.integration, requires_mosquitto]

TOTAL = 20_000
DEVICES = 4
ALPHA = 0.5


def _serve(config: ServerConfig) -> None:
    """Child process body: run the server until SIGTERM (or until it is SIGKILLed)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = MLTrainingServer(config)
    server.start()
    stop.wait()
    server.stop()


def _spawn(config: ServerConfig) -> mp.Process:
    # fork: the child starts in milliseconds with everything already imported.
    proc = mp.get_context("fork").Process(target=_serve, args=(config,), daemon=True)
    proc.start()
    return proc


def _payloads() -> list[bytes]:
    """20,000 transitions in messages of 1 to 20, interleaving four devices."""
    rng = random.Random(11)
    seqs = dict.fromkeys(range(DEVICES), 0)
    out = []
    sent = 0
    while sent < TOTAL:
        dev = rng.randrange(DEVICES)
        n = min(rng.randint(1, 20), TOTAL - sent)
        items = []
        for _ in range(n):
            seqs[dev] += 1
            s = seqs[dev]
            items.append(
                {
                    "device_id": f"phone-{dev}",
                    "app": "com.example.noloss",
                    "episode": s,
                    "step": 0,
                    "seq": s,
                    "state": f"d{dev}-s{s}",
                    "action": "tap:OK",
                    "reward": 1.0,
                    "next_state": "end",
                    "done": True,
                }
            )
        out.append(dumps({"v": 1, **items[0]}) if n == 1 else dumps({"v": 1, "batch": items}))
        sent += n
    return out


def test_sigkill_mid_stream_loses_nothing_and_learns_nothing_twice(tmp_path):
    broker = Mosquitto(tmp_path).start()
    prefix = unique_prefix()
    topics = Topics(prefix)
    config = ServerConfig(
        broker="127.0.0.1",
        port=broker.port,
        topic_prefix=prefix,
        client_id=f"noloss-{prefix}",
        data_dir=tmp_path / "data",
        save_interval=0.5,  # checkpoints land mid-stream, before and after the kill
        status_interval=0.2,
        learning_rate=ALPHA,
    )
    observer = Observer(broker.port, [topics.status])
    server = _spawn(config)
    publisher = make_client(f"devices-{prefix}")
    publisher.max_inflight_messages_set(200)
    try:
        online = lambda: (observer.latest_json(topics.status) or {}).get("state") == "online"  # noqa: E731
        observer.wait_for(online, 60)
        connect(publisher, "127.0.0.1", broker.port)
        payloads = _payloads()
        expected_states = {
            item["state"] for p in payloads for item in (lambda m: m.get("batch", [m]))(json.loads(p))
        }
        assert len(expected_states) == TOTAL
        kill_at = len(payloads) // 3
        infos = []
        for i, payload in enumerate(payloads):
            if i == kill_at:
                # Let the server be busy with a backlog, then kill it without warning.
                time.sleep(0.2)
                os.kill(server.pid, signal.SIGKILL)
                server.join(10)
                observer.wait_for(lambda: not online())  # the Last Will
            if i == kill_at + len(payloads) // 3:
                server = _spawn(config)  # restarted while devices keep sending
            infos.append(publisher.publish(topics.logs, payload, qos=1))
        for info in infos:
            info.wait_for_publish(30)  # the broker has every message
        observer.wait_for(online, 60)

        def learned() -> int:
            status = observer.latest_json(topics.status) or {}
            return int(status.get("transitions", -1))

        wait_until(
            lambda: learned() == TOTAL,
            timeout=90,
            interval=0.1,
            describe=lambda: f"the server counts {learned()} transitions learned of {TOTAL} sent",
        )
        time.sleep(1.0)  # would-be duplicates have had time to be (wrongly) counted
        assert learned() == TOTAL
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        if server.is_alive():
            os.kill(server.pid, signal.SIGTERM)
            server.join(30)
        observer.close()
        broker.stop()

    state = load_checkpoint(config.data_dir / "mqtt_server.pt")
    assert state["counters"]["accepted"] == TOTAL
    table = state["models"]["qtable"]["apps"]["com.example.noloss"]["table"]["q"]
    learned_states = {s: row["tap:OK"] for s, row in table.items() if s != "end"}
    missing = expected_states - set(learned_states)
    assert not missing, f"{len(missing)} transitions were lost, e.g. {sorted(missing)[:3]}"
    assert set(learned_states) == expected_states
    twice = [s for s, q in learned_states.items() if abs(q - ALPHA) > 1e-9]
    assert not twice, f"{len(twice)} transitions were learned more than once, e.g. {twice[:3]}"
