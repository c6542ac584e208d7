"""The rover server's ingestion over real ZeroMQ sockets on 127.0.0.1 (hostile input, counters,
chaining, reconnection) and the rover side of hot reload (ModelWatcher, RoverPolicy, RoverClient)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from tether.ingest.rover import LINK_NAME, ModelWatcher, RoverClient, RoverModelError, RoverPolicy
from tether.ingest.rover_codec import encode
from tether.ingest.rover_server import (
    BehaviourModel,
    RoverServer,
    RoverServerConfig,
    RoverServerError,
    tune_allocator,
)
from tether.nets_rgbd import export_rgbd_onnx

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, **overrides: object) -> RoverServerConfig:
    values: dict[str, object] = dict(
        port=0,
        image_size=(16, 16),
        update_interval=16,
        minibatch_size=8,
        epochs=1,
        checkpoint_interval=100,
        checkpoint_dir=tmp_path / "ckpt",
        tensorboard_dir=None,
        workers=2,
        queue_size=16,
        segment_length=8,
        idle_flush_s=0.3,
        max_frame_side=64,
        seed=0,
    )
    values.update(overrides)
    return RoverServerConfig(**values)  # type: ignore[arg-type]


def _message(
    step: int, done: bool = False, rover_id: str | None = None, size: tuple[int, int] = (24, 32)
) -> bytes:
    rng = np.random.default_rng(step)
    h, w = size
    return encode(
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        rng.uniform(0, 5, (h, w)).astype(np.float32),
        np.array([0.2, 0.0, 0.0, 0.0, 9.8, 3.0], np.float32),
        np.array([0.5, -0.5], np.float32),
        reward=0.5,
        done=done,
        episode_step=step,
        log_prob=-1.0,
        rover_id=rover_id,
    )


def _wait(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def push() -> zmq.Socket:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    yield sock
    sock.close()


def test_hostile_messages_are_counted_by_reason_and_training_goes_on(
    tmp_path: Path, push: zmq.Socket
) -> None:
    server = RoverServer(_config(tmp_path))
    server.start()
    try:
        push.connect(server.endpoint)
        nan = bytearray(_message(0))
        nan[-4:] = struct.pack("<f", float("nan"))
        hostile = [
            b"",
            b"\xff\xff\xff\xff{}",
            b"\x05\x00\x00\x00hello",
            bytes(nan),
            _message(1, size=(65, 32)),  # over this server's max_frame_side
        ]
        for m in hostile:
            push.send(m)
        push.send_multipart([b"part", b"two"])
        for step in range(24):
            push.send(_message(step))
        assert _wait(lambda: server.stats()["decoded"] == 24 and server.updates >= 1, 120), server.stats()
        stats = server.stats()
        assert stats["rejected"] == {
            "truncated": 1,
            "metadata_length": 1,
            "bad_json": 1,
            "non_finite": 1,
            "bad_shape": 1,
            "multipart": 1,
        }
        assert stats["received"] == 24 + len(hostile) + 1
        # A message over libzmq's size limit makes it drop the connection without reading it (what was
        # in flight behind it on that connection is lost too); the client reconnects by itself.
        rejected = dict(stats["rejected"])
        push.send(b"\x02\x00\x00\x00{}" + bytes(server.limits.max_message_bytes + 1))
        step = 24
        deadline = time.monotonic() + 60
        while server.stats()["decoded"] < 24 + 8 and time.monotonic() < deadline:
            push.send(_message(step))
            step += 1
            time.sleep(0.1)
        assert server.stats()["decoded"] >= 24 + 8, server.stats()
        assert server.stats()["rejected"] == rejected  # never read, so never counted as anything
    finally:
        server.stop()


def test_bf16_autocast_update_on_cpu(tmp_path: Path, push: zmq.Socket) -> None:
    server = RoverServer(
        _config(tmp_path, amp="bf16", checkpoint_interval=1, tensorboard_dir=tmp_path / "tb")
    )
    assert server.amp_dtype == torch.bfloat16
    server.start()
    try:
        push.connect(server.endpoint)
        for step in range(40):
            push.send(_message(step))
        assert server.wait_for_updates(1, timeout=120), server.stats()
    finally:
        server.stop()
    rows = [json.loads(line)["data"] for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    metrics = [r for r in rows if "train/policy_loss" in r]
    assert metrics and all(np.isfinite(metrics[0][k]) for k in ("train/policy_loss", "train/value_loss"))
    state = torch.load(tmp_path / "ckpt" / "ppo_update_1.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in state["learner"]["net"].values() if t.is_floating_point())


def test_a_gap_drops_one_sample_and_rovers_do_not_mix(tmp_path: Path, push: zmq.Socket) -> None:
    server = RoverServer(_config(tmp_path, update_interval=1000))
    server.start()
    try:
        push.connect(server.endpoint)
        for step in [*range(10), *range(20, 30)]:  # steps 10..19 never arrive
            push.send(_message(step, rover_id="a"))
        for step in range(12):  # two rovers interleaved, each contiguous
            push.send(_message(step, rover_id="b"))
            push.send(_message(step, done=step == 11, rover_id="c"))
        assert _wait(lambda: server.stats()["decoded"] == 44, 60), server.stats()
        assert _wait(lambda: server.stats()["observed"] == 9 + 9 + 11 + 12, 30), server.stats()
        stats = server.stats()
        # a: 9 transitions before the gap (step 9 lost its successor), 9 after (the last pending);
        # b: 11 (the last pending); c: 12 (ended by done). Flushed when idle.
        assert stats["dropped"] == {"gap": 1} and stats["sources"] == 3 and stats["episodes"] == 1
    finally:
        server.stop()


@pytest.mark.parametrize("decode_batch", [1, 5])
def test_batched_decoding_keeps_arrival_order_and_counts_every_message(
    tmp_path: Path, push: zmq.Socket, decode_batch: int
) -> None:
    server = RoverServer(
        _config(tmp_path, update_interval=1000, decode_batch=decode_batch, jpeg_fast_decode=True, workers=3)
    )
    server.start()
    try:
        push.connect(server.endpoint)
        for step in range(37):  # a burst: batches fill up; any reordering would show up as gaps
            push.send(_message(step, rover_id="a"))
            if step == 17:
                push.send(b"\x05\x00\x00\x00hello")  # a reject inside a batch
        assert _wait(lambda: server.stats()["decoded"] == 37, 60), server.stats()
        assert _wait(lambda: server.stats()["observed"] == 36, 30), server.stats()
        stats = server.stats()
        assert stats["received"] == 38 and stats["rejected"] == {"bad_json": 1} and stats["dropped"] == {}
    finally:
        server.stop()


def test_decode_options_are_validated_and_the_allocator_tuning_is_safe() -> None:
    for bad in (0, 257):
        with pytest.raises(RoverServerError, match="decode_batch"):
            RoverServerConfig(decode_batch=bad).validate()
    assert isinstance(tune_allocator(), bool)  # False (and a no-op) off glibc
    assert tune_allocator() == tune_allocator()  # idempotent


def test_rover_client_queues_while_the_server_is_down_and_delivers_on_reconnect(tmp_path: Path) -> None:
    server = RoverServer(_config(tmp_path, port=0))
    server.start()
    endpoint = server.endpoint
    server.stop()  # a known free port, nothing listening now
    port = int(endpoint.rsplit(":", 1)[1])
    client = RoverClient(endpoint, sndhwm=3, linger_ms=0)
    rng = np.random.default_rng(0)
    frame = (rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), np.full((24, 32), np.nan, np.float32))
    results = [client.send(*frame, np.zeros(6), np.zeros(2), 0.0, False, step) for step in range(5)]
    assert results[:3] == [True] * 3 and results[3:] == [False, False]
    assert (client.sent, client.dropped) == (3, 2)
    second = RoverServer(_config(tmp_path, port=port, pub_port=-1))
    second.start()
    try:
        assert _wait(lambda: second.stats()["decoded"] == 3, 60), second.stats()
        assert second.stats()["rejected"] == {}  # NaN depth went out as 0 (no reading), not rejected
    finally:
        client.close()
        second.stop()


def test_late_subscriber_gets_the_current_model_which_acts_like_the_server_policy(tmp_path: Path) -> None:
    server = RoverServer(_config(tmp_path))
    server.start()
    try:
        time.sleep(0.5)  # the model is published before anyone listens
        watcher = ModelWatcher(tmp_path / "models", connect=server.pub_endpoint)
        path = None
        deadline = time.monotonic() + 30
        while path is None and time.monotonic() < deadline:
            path = watcher.poll(timeout=0.2)
        watcher.close()
    finally:
        server.stop()
    assert path is not None and path.name == "ppo_update_0.onnx"
    link = tmp_path / "models" / f"{LINK_NAME}.onnx"
    assert link.is_symlink() and link.resolve() == path.resolve()
    policy = RoverPolicy.load(link)
    assert policy.image_size == (16, 16) and policy.update == 0
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    depth = rng.uniform(0, 12, (24, 32)).astype(np.float32)
    proprio = np.array([0.1, 0.2, 0.0, 0.0, 9.8, 1.0], np.float32)
    feeds = {k: torch.from_numpy(v) for k, v in policy.inputs(rgb, depth, proprio).items()}
    with torch.no_grad():
        mean = server.net(feeds)[0].numpy()
        action, log_prob = policy.sample(rgb, depth, proprio, rng)
        want_logp = server.net.distribution(feeds).log_prob(torch.from_numpy(action)[None])[0].item()
    assert np.abs(policy.act(rgb, depth, proprio) - mean).max() <= 1e-4
    assert log_prob == pytest.approx(want_logp, abs=1e-4)  # the log_prob the rover sends is PPO's


def test_model_watcher_rejects_tampered_models_and_follows_the_link(tmp_path: Path) -> None:
    from tether.nets_rgbd import RgbdActorCritic

    blob = export_rgbd_onnx(RgbdActorCritic(), (16, 16), {"image_size": [16, 16], "update": 3})
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    watcher = ModelWatcher(tmp_path / "models", connect=f"tcp://127.0.0.1:{port}")
    try:
        good = {"update": 3, "format": "onnx", "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
        bad = {**good, "sha256": "0" * 64}
        got = None
        deadline = time.monotonic() + 30
        while got is None and time.monotonic() < deadline:  # PUB/SUB: resend until the SUB has joined
            pub.send_multipart([b"model", json.dumps(bad).encode(), blob])
            pub.send_multipart([b"model", b"not json", blob])
            pub.send_multipart([b"model", json.dumps(good).encode(), blob])
            got = watcher.poll(timeout=0.2)
        assert got == tmp_path / "models" / "ppo_update_3.onnx"
        assert watcher.rejected >= 2
        assert hashlib.sha256(got.read_bytes()).hexdigest() == good["sha256"]
    finally:
        watcher.close()
        pub.close()
    # The file path: `tether deploy` copies a new model and repoints the link.
    files_only = ModelWatcher(tmp_path / "models")
    assert files_only.poll() is None
    newer = tmp_path / "models" / "ppo_update_9.onnx"
    newer.write_bytes(blob)
    tmp = tmp_path / "models" / "tmp-link"
    os.symlink(newer.name, tmp)
    os.replace(tmp, tmp_path / "models" / f"{LINK_NAME}.onnx")
    assert files_only.poll() == newer.resolve()
    assert files_only.poll() is None


def test_rover_policy_load_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RoverModelError, match="does not exist"):
        RoverPolicy.load(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(RoverModelError, match="not a loadable ONNX"):
        RoverPolicy.load(junk)
    rknn = tmp_path / "m.rknn"
    rknn.write_bytes(b"\x00")
    with pytest.raises(RoverModelError, match="rknn-toolkit-lite2"):
        RoverPolicy.load(rknn)
    other = tmp_path / "m.tflite"
    other.write_bytes(b"\x00")
    with pytest.raises(RoverModelError, match=r"\.onnx or \.rknn"):
        RoverPolicy.load(other)


def test_behaviour_model_learns_the_operator_and_floors_its_std() -> None:
    torch.manual_seed(0)
    model = BehaviourModel(torch.device("cpu"), lr=3e-3, steps=5, min_std=0.1, log_std_init=-0.5)
    g = torch.Generator().manual_seed(1)
    obs = {
        "rgb": torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=g),
        "depth": torch.rand(32, 1, 16, 16, generator=g),
        "proprio": torch.randn(32, 6, generator=g),
    }
    actions = torch.tensor([[0.8, 0.0]]).repeat(32, 1) + 0.02 * torch.randn(32, 2, generator=g)
    first = model.fit_and_score(obs, actions).mean()
    for _ in range(20):
        last = model.fit_and_score(obs, actions)
    assert last.mean() > first + 0.5
    with torch.no_grad():
        assert (model.net(obs) - torch.tensor([0.8, 0.0])).abs().max() < 0.2  # it imitates the operator
        model.net.log_std.fill_(-8.0)  # as if fitted to an operator with almost no noise
    scored = model.fit_and_score(obs, actions)
    # The std floor caps the density: at best the log-density of a 0.1-std Gaussian at its mean.
    cap = 2 * (-np.log(0.1) - 0.5 * np.log(2 * np.pi))
    assert np.isfinite(scored).all() and (scored <= cap + 1e-4).all()
    assert model.samples == 22 * 32
