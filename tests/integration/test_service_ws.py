"""The `/ws` event stream over real sockets: a real training run, replay, auth, slow and hostile clients."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tether.metrics import METRICS_UPDATE, TRAINING_STATUS
from tether.service.app import create_app
from tether.service.jobs import JobManager
from tether.service.server import ServiceHandle, start_in_thread

pytestmark = pytest.mark.integration

TOKEN = "ws-token_0123456789"
SHORT_RUN: dict[str, Any] = {
    "preset": "cartpole",
    "steps": 4096,
    "overrides": [
        "torch_threads=1",
        "environment.num_envs=4",
        "training.rollout_steps=16",
        "training.num_epochs=1",
        "training.batch_size=64",
        "schedule.checkpoint_every=1000",
    ],
}


@contextmanager
def serve(
    tmp_path: Path, token: str | None = None, queue: int = 1000
) -> Iterator[tuple[ServiceHandle, JobManager]]:
    torch.set_num_threads(1)
    manager = JobManager(tmp_path / "runs", default_preset="cartpole")
    handle = start_in_thread(create_app(manager, token=token, ws_queue_size=queue), port=0)
    try:
        yield handle, manager
    finally:
        manager.shutdown(timeout=60)
        handle.stop()


def ws_url(handle: ServiceHandle, query: str = "") -> str:
    return handle.url.replace("http://", "ws://") + "ws" + query


async def collect_until_done(ws: Any, timeout: float = 300.0) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        raw = await asyncio.wait_for(ws.recv(), max(1.0, deadline - time.monotonic()))
        event = json.loads(raw)
        events.append(event)
        if event["type"] == TRAINING_STATUS and event["data"]["status"] in ("finished", "stopped", "error"):
            return events


def test_short_real_run_streams_started_metrics_finished_in_order(tmp_path: Path) -> None:
    with serve(tmp_path) as (handle, manager):

        async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            async with websockets.connect(ws_url(handle), subprotocols=["tether"]) as ws:
                assert ws.subprotocol == "tether"
                async with httpx.AsyncClient(base_url=handle.url, timeout=60) as client:
                    response = await client.post("/control/start", json=SHORT_RUN)
                    assert response.status_code == 201, response.text
                live = await collect_until_done(ws)
            # A client that connects after the run first receives the recent history.
            async with websockets.connect(ws_url(handle)) as late:
                replay = [json.loads(await asyncio.wait_for(late.recv(), 30)) for _ in range(len(live))]
            return live, replay

        live, replay = asyncio.run(scenario())

    kinds = [(e["type"], e["data"].get("status")) for e in live]
    assert kinds[0] == (TRAINING_STATUS, "started")
    assert kinds[-1] == (TRAINING_STATUS, "finished")
    middle = live[1:-1]
    assert len(middle) >= 10 and all(e["type"] == METRICS_UPDATE for e in middle)
    for event in live:
        assert set(event) == {"type", "seq", "time", "data"}
    seqs = [e["seq"] for e in live]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    steps = [e["data"]["step"] for e in middle]
    assert steps == sorted(steps) and steps[-1] == 4096
    rewards = [r for e in middle for r in e["data"]["episode_rewards"]]
    assert rewards and all(isinstance(r, float) for r in rewards)
    assert live[-1]["data"]["run_id"] == live[0]["data"]["run_id"] == manager.run_id()
    assert replay == live  # same events, same order, same payloads


def test_websocket_token_rule(tmp_path: Path) -> None:
    with serve(tmp_path, token=TOKEN) as (handle, manager):
        manager.bus.emit(METRICS_UPDATE, {"step": 1})

        async def scenario() -> None:
            for kwargs in (
                {},
                {"additional_headers": {"Authorization": "Bearer nope"}},
                {"subprotocols": ["tether", "bearer.nope"]},
                {"subprotocols": ["tether", "bearer."]},
            ):
                with pytest.raises(InvalidStatus) as info:
                    async with websockets.connect(ws_url(handle), **kwargs):
                        pass
                assert info.value.response.status_code == 403
            with pytest.raises(InvalidStatus):
                async with websockets.connect(ws_url(handle, "?token=nope")):
                    pass
            for url, kwargs in (
                (ws_url(handle), {"additional_headers": {"Authorization": f"Bearer {TOKEN}"}}),
                (ws_url(handle), {"subprotocols": ["tether", f"bearer.{TOKEN}"]}),
                (ws_url(handle, f"?token={TOKEN}"), {}),
            ):
                async with websockets.connect(url, **kwargs) as ws:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    assert event["type"] == METRICS_UPDATE and event["data"] == {"step": 1}
                    if "subprotocols" in kwargs:
                        assert ws.subprotocol == "tether"  # the token is never echoed back

        asyncio.run(scenario())


def test_foreign_origin_websocket_is_refused(tmp_path: Path) -> None:
    with serve(tmp_path) as (handle, _):

        async def scenario() -> None:
            with pytest.raises(InvalidStatus) as info:
                async with websockets.connect(ws_url(handle), origin="http://evil.example"):
                    pass
            assert info.value.response.status_code == 403
            async with websockets.connect(ws_url(handle), origin=handle.url.rstrip("/")) as ws:
                await ws.ping()

        asyncio.run(scenario())


def test_slow_client_drops_oldest_and_never_blocks_the_emitter(tmp_path: Path) -> None:
    """A viewer that reads nothing: every emit still returns, and when it reads at last it gets
    the newest events with the oldest dropped (its queue is bounded)."""
    total = 3000
    with serve(tmp_path, queue=50) as (handle, manager):

        async def scenario() -> list[int]:
            async with websockets.connect(ws_url(handle), max_queue=1) as ws:
                while manager.bus.subscriber_count == 0:  # the server subscribes right after the handshake
                    await asyncio.sleep(0.05)
                payload = {"episode_rewards": [1.0] * 500}
                for i in range(1, total + 1):
                    manager.bus.emit(
                        METRICS_UPDATE, {"step": i, **payload}
                    )  # would block if the viewer could
                seen: list[int] = []
                while True:
                    try:
                        event = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    except TimeoutError:
                        return seen
                    seen.append(event["data"]["step"])
                    if event["data"]["step"] == total:
                        return seen

        seen = asyncio.run(scenario())
    assert seen[-1] == total
    assert len(seen) < total  # some were dropped for this viewer…
    assert seen == sorted(seen)  # …the oldest ones, order kept


def test_disconnect_unsubscribes_and_hostile_messages_are_harmless(tmp_path: Path) -> None:
    with serve(tmp_path) as (handle, manager):

        async def scenario() -> None:
            async with websockets.connect(ws_url(handle)) as ws:
                while manager.bus.subscriber_count != 1:
                    await asyncio.sleep(0.02)
                for junk in ("", "not json", '{"type": "control", "data": "stop"}', "\x00" * 100):
                    await ws.send(junk)
                await ws.send(b"\xff\xfe binary")
                manager.bus.emit(METRICS_UPDATE, {"step": 7})
                event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert event["data"] == {"step": 7}  # still served after the junk
            while manager.bus.subscriber_count != 0:
                await asyncio.sleep(0.02)

            async with websockets.connect(ws_url(handle), max_size=None) as ws:
                await ws.send("x" * (200 * 1024))  # over the server's frame limit
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await asyncio.wait_for(ws.recv(), 30)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1009
            while manager.bus.subscriber_count != 0:
                await asyncio.sleep(0.02)

        asyncio.run(asyncio.wait_for(scenario(), 120))


def test_non_finite_metrics_arrive_as_valid_json(tmp_path: Path) -> None:
    with serve(tmp_path) as (handle, manager):
        manager.bus.emit(
            METRICS_UPDATE, {"step": 1, "train/explained_variance": float("nan"), "x": [float("-inf")]}
        )

        async def scenario() -> str:
            async with websockets.connect(ws_url(handle)) as ws:
                return str(await asyncio.wait_for(ws.recv(), 30))

        raw = asyncio.run(scenario())
    assert "NaN" not in raw and "Infinity" not in raw
    assert json.loads(raw)["data"] == {"step": 1, "train/explained_variance": None, "x": [None]}


def test_query_tokens_never_reach_the_log(tmp_path: Path) -> None:
    """uvicorn logs WebSocket paths with their query string; a `?token=` must come out masked."""
    lines: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    manager = JobManager(tmp_path / "runs")
    handle = start_in_thread(create_app(manager, token=TOKEN), port=0, log_level="info")
    grab = Grab()
    logging.getLogger("uvicorn.error").addHandler(grab)
    try:

        async def scenario() -> None:
            async with websockets.connect(ws_url(handle, f"?token={TOKEN}")) as ws:
                await ws.ping()
            with pytest.raises(InvalidStatus):
                async with websockets.connect(ws_url(handle, "?token=guess-123&x=1")):
                    pass

        asyncio.run(scenario())
    finally:
        logging.getLogger("uvicorn.error").removeHandler(grab)
        handle.stop()
    text = "\n".join(lines)
    assert "/ws?token=***" in text  # the lines are there…
    assert TOKEN not in text and "guess-123" not in text  # …without the secrets
