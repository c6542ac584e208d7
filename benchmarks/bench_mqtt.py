"""End-to-end MQTT ingest benchmark for the Visual Mapper training server.

Starts its own Mosquitto on a free port, runs `MLTrainingServer` (Q-table mode, journal on) in
this process, and a publisher in a separate process that sends pre-built QoS 1 messages flat
out. Measures:

* single-transition messages: transitions/s from the first publish until the learner has
  counted them all;
* batched messages (`--batch-size` transitions each): the same in transitions/s;
* latency: probe transitions (each with a new screen id) sent at a steady rate while nothing
  else runs, timed from publish until a `qtable/<app>` message holding that screen arrives.

The peer, measured in the same run on the same broker, is a bare paho subscriber with a
persistent QoS 1 session that only counts messages: the ratio shows what validation, the
journal, de-duplication and learning cost on top of MQTT itself.

Wall-clock rates depend on what else the machine runs, so the CPU time this process (the server:
paho's network thread and the learner) spent per transition is printed too, with the rate it
implies for one fully available core.

    .venv/bin/python benchmarks/bench_mqtt.py [--single 20000] [--batched 200000] [--batch-size 500]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tether.ingest.android_sim import connect, make_apps, make_client, set_nodelay
from tether.ingest.mqtt_protocol import Topics, dumps
from tether.ingest.mqtt_server import MLTrainingServer, ServerConfig

PREFIX = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\n"
        "max_inflight_messages 0\npersistence false\nset_tcp_nodelay true\nlog_dest none\n"
    )
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def build_payloads(n_transitions: int, batch: int, device: str) -> list[bytes]:
    """Random walks over simulated app graphs, as single messages (batch=1) or batches."""
    import random

    apps = make_apps(4, seed=7, screens=(30, 60))
    rng = random.Random(1)
    out: list[bytes] = []
    items: list[dict[str, Any]] = []
    app, screen, step, episode = apps[0], apps[0].starts()[0], 0, 0
    for seq in range(1, n_transitions + 1):
        action = rng.choice(app.actions(screen))
        nxt = app.edges[screen][action]
        done = nxt in app.goals
        items.append(
            {
                "device_id": device,
                "app": app.package,
                "episode": episode,
                "step": step,
                "seq": seq,
                "state": screen,
                "action": action,
                "reward": 1.0 if done else -0.01,
                "next_state": nxt,
                "done": done,
                "available_actions": app.actions(nxt),
                "timestamp": 1.7e9,
            }
        )
        step += 1
        if done or step >= 30:
            app = rng.choice(apps)
            screen, step, episode = rng.choice(app.starts()), 0, episode + 1
        else:
            screen = nxt
        if len(items) == batch:
            out.append(dumps({"v": 1, **items[0]}) if batch == 1 else dumps({"v": 1, "batch": items}))
            items = []
    if items:
        out.append(dumps({"v": 1, "batch": items}))
    return out


def publisher(port: int, payloads: list[bytes], started: Any, finished: Any) -> None:
    """Child process: publish every payload with QoS 1 (window of 1000 in flight), wait for acks."""
    sys.setswitchinterval(0.0005)
    client = make_client(f"bench-pub-{time.time_ns()}")
    client.max_inflight_messages_set(1000)
    acked = [0]
    lock = threading.Lock()

    def on_publish(c: Any, u: Any, mid: int, rc: Any, p: Any) -> None:
        with lock:
            acked[0] += 1

    client.on_publish = on_publish
    connect(client, "127.0.0.1", port)
    topic = Topics(PREFIX).logs
    started.set()
    for i, payload in enumerate(payloads):
        while i - acked[0] >= 2000:
            time.sleep(0.0005)
        client.publish(topic, payload, qos=1)
    while acked[0] < len(payloads):
        time.sleep(0.005)
    finished.set()
    client.disconnect()
    client.loop_stop()


def run_publisher(port: int, payloads: list[bytes]) -> tuple[BaseProcess, Any, Any]:
    ctx = mp.get_context("fork")
    started, finished = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=publisher, args=(port, payloads, started, finished), daemon=True)
    proc.start()
    if not started.wait(30):
        raise RuntimeError("publisher did not start")
    return proc, started, finished


def measure_server(
    port: int, workdir: Path, payloads: list[bytes], transitions: int, tag: str
) -> tuple[float, float]:
    """(transitions/s wall clock, CPU seconds this process spent per transition)."""
    server = MLTrainingServer(
        ServerConfig(
            broker="127.0.0.1",
            port=port,
            topic_prefix=PREFIX,
            client_id=f"bench-server-{tag}",
            data_dir=workdir / f"server-{tag}",
            status_interval=5.0,
        )
    )
    server.start()
    try:
        proc, _, _ = run_publisher(port, payloads)
        t0, c0 = time.perf_counter(), time.process_time()
        deadline = time.monotonic() + 600
        while server.counters.accepted + server.counters.duplicates < transitions:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server counted only {server.counters.accepted} of {transitions}")
            time.sleep(0.01)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        proc.join(30)
    finally:
        server.stop()
    return transitions / elapsed, cpu / transitions


def measure_peer(
    port: int, payloads: list[bytes], messages_per_payload: int, tag: str
) -> tuple[float, float]:
    """A bare persistent QoS 1 subscriber that only counts: (transitions/s, CPU s per transition)."""
    count = [0]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-peer-{tag}", clean_session=False)
    client.on_socket_open = set_nodelay

    def on_message(c: Any, u: Any, msg: Any) -> None:
        count[0] += 1

    client.on_message = on_message
    connect(client, "127.0.0.1", port)
    sub = threading.Event()
    client.on_subscribe = lambda *a: sub.set()
    client.subscribe(Topics(PREFIX).logs, qos=1)
    sub.wait(10)
    proc, _, _ = run_publisher(port, payloads)
    t0, c0 = time.perf_counter(), time.process_time()
    while count[0] < len(payloads):
        time.sleep(0.01)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    proc.join(30)
    client.disconnect()
    client.loop_stop()
    n = len(payloads) * messages_per_payload
    return n / elapsed, cpu / n


def measure_latency(port: int, workdir: Path, probes: int, rate: float) -> list[float]:
    server = MLTrainingServer(
        ServerConfig(
            broker="127.0.0.1",
            port=port,
            topic_prefix=PREFIX,
            client_id="bench-server-latency",
            data_dir=workdir / "server-latency",
        )
    )
    server.start()
    topics = Topics(PREFIX)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    app = "com.example.latency"

    def on_qtable(c: Any, u: Any, msg: Any) -> None:
        now = time.perf_counter()
        q = json.loads(msg.payload)["q"]
        with lock:
            for state in [s for s in sent if s in q]:
                latencies.append(now - sent.pop(state))

    client = make_client("bench-probe")
    client.message_callback_add(topics.qtable(app), on_qtable)
    connect(client, "127.0.0.1", port)
    client.subscribe(topics.qtable(app), qos=1)
    time.sleep(0.5)
    try:
        for i in range(probes):
            state = f"probe-{i}"
            payload = dumps(
                {
                    "v": 1,
                    "device_id": "probe",
                    "app": app,
                    "episode": 0,
                    "step": i,
                    "seq": i + 1,
                    "state": state,
                    "action": "tap:OK",
                    "reward": 1.0,
                    "next_state": "home",
                    "done": False,
                    "available_actions": ["tap:OK"],
                }
            )
            with lock:
                sent[state] = time.perf_counter()
            client.publish(topics.logs, payload, qos=1)
            time.sleep(1.0 / rate)
        deadline = time.monotonic() + 5
        while sent and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        client.disconnect()
        client.loop_stop()
        server.stop()
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--single", type=int, default=20_000, help="single-transition messages")
    parser.add_argument("--batched", type=int, default=200_000, help="transitions sent in batches")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--probe-rate", type=float, default=20.0)
    args = parser.parse_args()
    if shutil.which("mosquitto") is None:
        sys.exit("mosquitto is not on PATH")
    workdir = Path(tempfile.mkdtemp(prefix="tether-bench-mqtt-"))
    broker, port = start_broker(workdir)
    try:
        single = build_payloads(args.single, 1, "bench-single")
        batched = build_payloads(args.batched, args.batch_size, "bench-batched")
        rows = []
        srv, srv_cpu = measure_server(port, workdir, single, args.single, "single")
        peer, peer_cpu = measure_peer(port, single, 1, "single")
        rows.append(("single-transition messages", srv, srv_cpu, peer, peer_cpu, 5_000))
        srv_b, srv_b_cpu = measure_server(port, workdir, batched, args.batched, "batched")
        peer_b, peer_b_cpu = measure_peer(port, batched, args.batch_size, "batched")
        rows.append((f"batched ({args.batch_size}/message)", srv_b, srv_b_cpu, peer_b, peer_b_cpu, 100_000))
        lat = measure_latency(port, workdir, args.probes, args.probe_rate)
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(
        f"\nMQTT ingest through Mosquitto ({sys.platform}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, load average {load})"
    )
    print(
        f"{'case':30s} {'tether tr/s':>11s} {'bare paho':>10s} {'ratio':>6s}  "
        f"{'tether CPU µs/tr':>16s} {'= tr/s per core':>15s} {'bare CPU µs/tr':>14s}  target"
    )
    for name, srv_rate, srv_cpu, peer_rate, peer_cpu, target in rows:
        per_core = 1.0 / srv_cpu if srv_cpu > 0 else float("inf")
        verdict = "met" if srv_rate >= target else ("met per core" if per_core >= target else "MISSED")
        print(
            f"{name:30s} {srv_rate:11,.0f} {peer_rate:10,.0f} {srv_rate / peer_rate:6.2f}  "
            f"{srv_cpu * 1e6:16.1f} {per_core:15,.0f} {peer_cpu * 1e6:14.1f}  {target:,} {verdict}"
        )
    if lat:
        p50, p99 = pct(lat, 0.50) * 1e3, pct(lat, 0.99) * 1e3
        print(
            f"log → Q-table latency over {len(lat)}/{args.probes} probes: p50 {p50:.1f} ms, "
            f"p99 {p99:.1f} ms, "
            f"mean {statistics.mean(lat) * 1e3:.1f} ms "
            f"(target p99 ≤ 100 ms: {'ok' if p99 <= 100 else 'MISSED'})"
        )
    else:
        print("latency: no probe came back")


if __name__ == "__main__":
    main()
