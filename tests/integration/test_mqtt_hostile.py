"""Acceptance 4: thousands of malformed payloads through a real broker. The server keeps
running, rejects every one with a counter and an error notice, memory stays bounded, and
learning goes on."""

from __future__ import annotations

import json
import random
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mqtt_support import Mosquitto, Observer, requires_mosquitto, transition, unique_prefix, wait_until

from tether.ingest.android_sim import connect, make_client
from tether.ingest.mqtt_protocol import MAX_PAYLOAD_BYTES, Topics, dumps
from tether.ingest.mqtt_server import MLTrainingServer, ServerConfig

pytestmark = [pytest.mark.integration, requires_mosquitto]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def hostile_payloads(rng: random.Random) -> list[bytes]:
    """≥ 5,000 payloads, each of which breaks the protocol in one way."""
    good = transition("evil", 1)
    raw = json.dumps(good)
    out: list[bytes] = []

    def variant(**over: object) -> bytes:
        t = dict(good)
        t.update(over)
        return json.dumps(t).encode()

    def without(key: str) -> bytes:
        t = dict(good)
        del t[key]
        return json.dumps(t).encode()

    for _ in range(600):  # truncated JSON, at every kind of cut
        out.append(raw[: rng.randrange(0, len(raw) - 1)].encode())
    for _ in range(300):  # random bytes, often not UTF-8
        out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
    fixed = [
        b"",
        b"null",
        b"[]",
        b"[1, 2, 3]",
        b'"just a string"',
        b"12345",
        b"{",
        b"{}",
        b"[" * 50_000,  # deep nesting
        b'{"v": 1, "seq": ' + b"9" * 5000 + b"}",  # an integer too long to parse
        b"\xff\xfe\x00{}",
    ]
    kinds = [
        # wrong types
        lambda: variant(reward="1.0"),
        lambda: variant(seq=-rng.randrange(1, 10**6)),
        lambda: variant(seq=1.5),
        lambda: variant(seq=10**30),
        lambda: variant(done="true"),
        lambda: variant(done=1),
        lambda: variant(state=rng.randrange(1000)),
        lambda: variant(action=None),
        lambda: variant(available_actions="tap:OK"),
        lambda: variant(available_actions=[1, 2]),
        lambda: variant(features=["a", "b"]),
        lambda: variant(features=[]),
        lambda: variant(episode=True),
        lambda: variant(device_id="evil/+/#"),
        lambda: variant(app="com.example app"),
        lambda: variant(device_id=""),
        lambda: variant(timestamp="yesterday"),
        lambda: variant(surprise="field"),
        lambda: without(rng.choice(["device_id", "seq", "state", "action", "reward", "next_state", "done"])),
        # huge strings and lists (under the size limit, over the field limits)
        lambda: variant(state="S" * rng.randrange(600, 200_000)),
        lambda: variant(device_id="d" * 500),
        lambda: variant(available_actions=["tap"] * 300),
        lambda: variant(features=[0.5] * 5000),
        # non-finite and absurd numbers
        lambda: raw.replace('"reward": 0.5', '"reward": NaN').encode(),
        lambda: raw.replace('"reward": 0.5', '"reward": Infinity').encode(),
        lambda: raw.replace('"reward": 0.5', '"reward": -Infinity').encode(),
        lambda: raw.replace('"reward": 0.5', '"reward": 1e400').encode(),
        lambda: variant(reward=1e12),
        lambda: variant(features=[1.0, float("nan")]),
        # unknown or missing versions
        lambda: variant(v=rng.choice([0, 2, 3, 99, -1])),
        lambda: variant(v="1"),
        lambda: variant(v=True),
        lambda: variant(v=None),
        lambda: variant(v=1.0),
        lambda: without("v"),
        # hostile batches
        lambda: dumps({"v": 1, "batch": []}),
        lambda: dumps({"v": 1, "batch": "lots"}),
        lambda: dumps({"v": 1, "batch": [good, {**good, "reward": "x"}]}),
        lambda: dumps({"v": 1, "batch": [1, 2, 3]}),
        lambda: json.dumps({"v": 2, "batch": [good]}).encode(),
    ]
    out += fixed
    while len(out) < 5_000:
        out.append(kinds[len(out) % len(kinds)]())
    for i in range(30):  # 1 MB blobs
        blob = b'{"v": 1, "state": "' + b"x" * (1 << 20) + b'"}' if i % 2 else bytes(1 << 20)
        assert len(blob) > MAX_PAYLOAD_BYTES
        out.append(blob)
    out.append(dumps({"v": 1, "batch": [good] * 3000}))  # too many items
    rng.shuffle(out)
    return out


def test_malformed_flood_is_rejected_counted_and_harmless(tmp_path):
    broker = Mosquitto(tmp_path).start()
    prefix = unique_prefix()
    topics = Topics(prefix)
    server = MLTrainingServer(
        ServerConfig(
            broker="127.0.0.1",
            port=broker.port,
            topic_prefix=prefix,
            client_id=f"hostile-{prefix}",
            data_dir=tmp_path / "data",
            status_interval=0.5,
        )
    )
    server.start()
    observer = Observer(broker.port, [topics.status, topics.qtable_filter])
    attacker = make_client(f"attacker-{prefix}")
    attacker.max_inflight_messages_set(200)
    try:
        connect(attacker, "127.0.0.1", broker.port)
        payloads = hostile_payloads(random.Random(5))
        assert len(payloads) >= 5_000
        rss_before = _rss_mb()

        # An honest device keeps exploring during the attack.
        honest_done = threading.Event()

        def honest() -> None:
            client = make_client(f"honest-{prefix}")
            connect(client, "127.0.0.1", broker.port)
            infos = [
                client.publish(topics.logs, dumps(transition("honest", s)), qos=1) for s in range(1, 201)
            ]
            for info in infos:
                info.wait_for_publish(60)
            client.disconnect()
            client.loop_stop()
            honest_done.set()

        thread = threading.Thread(target=honest)
        thread.start()
        infos = [attacker.publish(topics.logs, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(60)
        thread.join(60)
        assert honest_done.is_set()

        total = len(payloads)
        wait_until(
            lambda: server.counters.received == total + 200,
            timeout=90,
            describe=lambda: f"received {server.counters.received} of {total + 200}",
        )
        wait_until(lambda: server.counters.accepted == 200)  # every honest transition learned
        counters = server.counters.as_dict()
        assert counters["rejected_total"] == total, counters["rejected"]  # every hostile one rejected
        for reason in (
            "bad_json",
            "bad_encoding",
            "not_object",
            "too_large",
            "too_long",
            "non_finite",
            "unknown_version",
            "missing_version",
            "bad_type",
            "unknown_field",
            "missing_field",
            "bad_id",
            "out_of_range",
            "empty_batch",
        ):
            assert counters["rejected"].get(reason, 0) > 0, f"no payload was rejected as {reason}"
        assert server.connected and server._learner is not None and server._learner.is_alive()

        # Rejections are announced on the status topic (rate-limited), with a reason code.
        notices = [m for m in observer.json_on(topics.status) if m.get("type") == "error"]
        assert notices and all(n["reason"] in counters["rejected"] for n in notices)
        assert len(notices) < total  # rate-limited, not one notice per bad payload
        status = observer.wait_for(
            lambda: next(
                (
                    m
                    for m in reversed(observer.json_on(topics.status))
                    if m.get("type") == "status" and m["errors"]
                ),
                None,
            )
        )
        assert status["counters"]["rejected_total"] > 0

        # Memory stays bounded: nothing of the flood is kept.
        assert _rss_mb() - rss_before < 200
        assert len(server._errors) <= 10 and len(server._queue) == 0

        # Learning continues: a new transition still changes the published Q-values.
        client = make_client(f"late-{prefix}")
        connect(client, "127.0.0.1", broker.port)
        late = transition("late", 1, app="com.example.late", state="after-attack", reward=1.0, done=True)
        client.publish(topics.logs, dumps(late), qos=1).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
        table = observer.wait_for(lambda: observer.latest_json(topics.qtable("com.example.late")))
        assert table["q"]["after-attack"]["tap:Next"] > 0
    finally:
        attacker.disconnect()
        attacker.loop_stop()
        observer.close()
        server.stop()
        broker.stop()
