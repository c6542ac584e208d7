"""Training speed with the live service and one connected dashboard-like client vs without.

Runs the same job config several times, alternating the two setups so drift on a shared machine
hits both, and prints each run's steps/s and the ratio of the medians (target: within 5 %).

    .venv/bin/python benchmarks/bench_service.py                      # cartpole, 30k steps, 3 pairs
    .venv/bin/python benchmarks/bench_service.py --preset lunabotics --steps 50000 --repeats 2

Steps/s is measured between the run's `started` event and its last metrics row, so env and
network construction and the final checkpoint are not part of it. Process CPU time per 1000
steps (all threads, the service's included) is printed beside it: on a busy shared machine it is
the steadier of the two. The client is a real WebSocket on a real socket that decodes every
event, as the dashboard does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from tether.config import load_config
from tether.metrics import METRICS_UPDATE, TRAINING_STATUS, MetricsBus
from tether.trainer import Trainer


class Meter:
    """A bus sink on the trainer thread: wall clock and process CPU time (all threads, the
    service's included) at the `started` event and at every metrics row."""

    def __init__(self) -> None:
        self.start: tuple[float, float, int] | None = None
        self.last: tuple[float, float, int] | None = None

    def __call__(self, event: dict) -> None:
        now = (time.perf_counter(), time.process_time())
        if event["type"] == TRAINING_STATUS and event["data"]["status"] == "started":
            self.start = (*now, int(event["data"].get("step", 0)))
        elif event["type"] == METRICS_UPDATE and self.start is not None:
            self.last = (*now, int(event["data"]["step"]))

    def result(self) -> tuple[float, float]:
        """Steps per wall-clock second, and process CPU milliseconds per 1000 steps."""
        if self.start is None or self.last is None:
            raise SystemExit("no metrics rows: raise --steps so at least one update happens")
        steps = self.last[2] - self.start[2]
        return steps / (self.last[0] - self.start[0]), 1e6 * (self.last[1] - self.start[1]) / steps


class DashboardClient(threading.Thread):
    """Reads and decodes every event from /ws until the run ends, like the dashboard."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        from websockets.sync.client import connect

        self.ws = connect(url.replace("http://", "ws://") + "ws", subprotocols=["tether"])  # type: ignore[list-item]
        self.received = 0

    def run(self) -> None:
        try:
            for raw in self.ws:
                event = json.loads(raw)
                self.received += 1
                if event["type"] == TRAINING_STATUS and event["data"]["status"] in (
                    "finished",
                    "stopped",
                    "error",
                ):
                    break
        finally:
            self.ws.close()


def one_run(
    preset: str, overrides: list[str], root: Path, index: int, served: bool
) -> tuple[float, float, int]:
    from tether.commands.serve import start_service_for_trainer

    config, _ = load_config(preset, overrides)
    bus = MetricsBus()
    meter = Meter()
    bus.add_sink(meter)
    trainer = Trainer(config, root / f"{'served' if served else 'plain'}-{index}", bus=bus)
    handle = client = None
    if served:
        handle = start_service_for_trainer(trainer, host="127.0.0.1", port=0, token=None)
        client = DashboardClient(handle.url)
        client.start()
    try:
        trainer.run()
    finally:
        if client is not None:
            client.join(60)
        if handle is not None:
            handle.stop()
    sps, cpu = meter.result()
    return sps, cpu, (client.received if client is not None else 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cartpole")
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (plain, served)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    args = parser.parse_args(argv)
    # One torch thread unless told otherwise: the comparison is about the service, and on a shared
    # machine oversubscribed OpenMP threads would swamp it with noise.
    overrides = ["torch_threads=1", *args.overrides, f"schedule.total_steps={args.steps}"]

    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        root = Path(tmp)
        for i in range(args.repeats):
            # Alternate the order so neither setup always runs on a warmer (or busier) machine.
            for with_service in (i % 2 == 1, i % 2 == 0):
                sps, cpu, received = one_run(args.preset, overrides, root, i, with_service)
                runs[with_service].append((sps, cpu))
                label = f"with service + 1 client ({received} events)" if with_service else "without service"
                print(f"run {i + 1}: {label:<42} {sps:10,.0f} steps/s  {cpu:8,.0f} CPU ms / 1000 steps")

    base_sps, live_sps = (statistics.median(s for s, _ in runs[k]) for k in (False, True))
    base_cpu, live_cpu = (statistics.median(c for _, c in runs[k]) for k in (False, True))
    ratio = live_sps / base_sps
    print(f"\n{args.preset}, {args.steps:,} steps per run, {args.repeats} pairs (medians)")
    print(f"without service: {base_sps:10,.0f} steps/s  {base_cpu:8,.0f} CPU ms / 1000 steps")
    print(f"with service:    {live_sps:10,.0f} steps/s  {live_cpu:8,.0f} CPU ms / 1000 steps")
    verdict = "within" if abs(1 - ratio) <= 0.05 else "outside"
    print(f"steps/s ratio (with / without): {ratio:.3f}  ({verdict} 5 %)")
    print(f"CPU-time ratio (with / without): {live_cpu / base_cpu:.3f}  (process CPU, all threads)")


if __name__ == "__main__":
    main()
