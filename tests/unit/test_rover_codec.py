"""The rover wire format: round trips, an encoder written independently from the spec text, and
thousands of malformed messages that must all be rejected cleanly without large allocations."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from tether.ingest import rover_codec
from tether.ingest.rover_codec import (
    REASONS,
    CodecLimits,
    RoverCodecError,
    decode,
    decode_for_network,
    decode_jpeg,
    encode,
    to_network_input,
)

H, W = 240, 424


def _frame(h: int = H, w: int = W, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(
        np.uint8
    )
    depth = rng.uniform(0.0, 8.0, (h, w)).astype(np.float32)
    proprio = np.array([0.3, -0.2, 0.01, -0.02, 9.8, 1.7], np.float32)
    action = np.array([0.5, -0.25], np.float32)
    return rgb, depth, proprio, action


@pytest.fixture(params=["simplejpeg", "pillow"])
def jpeg_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each JPEG library the codec can use."""
    if request.param == "pillow":
        monkeypatch.setattr(rover_codec, "_simplejpeg", None)
    elif rover_codec._simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    assert rover_codec.jpeg_backend() == request.param
    return str(request.param)


# ------------------------------------------------------------------------------------ round trip


def test_raw_round_trip_is_exact() -> None:
    rgb, depth, proprio, action = _frame()
    msg = encode(
        rgb, depth, proprio, action, reward=1.25, done=True, episode_step=7, compress=False, log_prob=-1.5
    )
    s = decode(msg)
    assert np.array_equal(s.rgb, rgb)
    assert (
        np.array_equal(s.depth, depth)
        and np.array_equal(s.proprio, proprio)
        and np.array_equal(s.action, action)
    )
    assert (s.reward, s.done, s.episode_step, s.log_prob, s.rgb_compressed) == (1.25, True, 7, -1.5, False)
    assert s.rgb.flags.writeable and s.depth.dtype == np.float32


def test_jpeg_round_trip_is_close(jpeg_backend: str) -> None:
    rgb, depth, proprio, action = _frame()
    msg = encode(rgb, depth, proprio, action, reward=-5.01, done=False, episode_step=0, jpeg_quality=95)
    raw = encode(rgb, depth, proprio, action, reward=-5.01, done=False, episode_step=0, compress=False)
    assert len(msg) < len(raw) - H * W  # the JPEG really is much smaller than raw RGB
    s = decode(msg)
    assert s.rgb.shape == (H, W, 3) and s.rgb.dtype == np.uint8
    assert np.abs(s.rgb.astype(int) - rgb.astype(int)).mean() < 3.0
    assert np.array_equal(s.depth, depth) and s.reward == -5.01 and s.done is False and s.log_prob is None


def test_jpeg_may_decode_at_reduced_scale_but_not_below_the_minimum(jpeg_backend: str) -> None:
    rgb, depth, proprio, action = _frame()
    msg = encode(rgb, depth, proprio, action, reward=0.0, done=False, episode_step=0)
    s = decode(msg, rgb_min_size=(106, 60))
    assert s.rgb.shape[0] >= 60 and s.rgb.shape[1] >= 106 and s.rgb.shape[0] < H


def test_decode_accepts_bytearray_and_memoryview() -> None:
    msg = encode(*_frame(12, 16), reward=0.0, done=False, episode_step=3)
    assert decode(bytearray(msg)).episode_step == 3
    assert decode(memoryview(msg)).episode_step == 3


def test_decode_without_copies_gives_read_only_views_with_the_same_values() -> None:
    rgb, depth, proprio, action = _frame(12, 16)
    msg = encode(rgb, depth, proprio, action, reward=0.0, done=False, episode_step=1, compress=False)
    s = decode(bytearray(msg), copy=False)
    assert np.array_equal(s.rgb, rgb) and np.array_equal(s.depth, depth)
    assert not s.rgb.flags.writeable and not s.depth.flags.writeable  # views, even of a bytearray
    assert s.proprio.flags.writeable and s.action.flags.writeable  # small: always copied


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("nan"), "non_finite"),
        (-float("nan"), "non_finite"),  # sign bit set
        (float("inf"), "non_finite"),
        (-float("inf"), "non_finite"),
        (-1e-30, "bad_value"),
        (-3.0, "bad_value"),
        (3.4e38, None),  # the largest finite float32s are accepted
        (-0.0, None),  # sign bit set, but as a distance it is 0 (no reading)
    ],
)
def test_every_depth_value_is_classified_like_the_spec_says(value: float, reason: str | None) -> None:
    meta, jpg, tail, _ = _parts()
    for pos in (0, 12 * 16 // 2, 12 * 16 - 1):  # first, middle and last depth value
        t = bytearray(tail)
        t[4 * pos : 4 * pos + 4] = struct.pack("<f", value)
        msg = _assemble(meta, jpg, bytes(t))
        if reason is None:
            assert decode(msg).depth.reshape(-1)[pos] == np.float32(value)
        else:
            with pytest.raises(RoverCodecError) as err:
                decode(msg)
            assert err.value.reason == reason


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("size", [(W, H), (106, 60), (53, 30), (100, 50)])
def test_decode_for_network_equals_decode_then_network_input(compress: bool, size: tuple[int, int]) -> None:
    rgb, depth, proprio, action = _frame()
    msg = encode(rgb, depth, proprio, action, reward=0.5, done=False, episode_step=4, compress=compress)
    ref = decode(msg, rgb_min_size=size)
    ref_rgb, ref_depth = to_network_input(ref.rgb, ref.depth, size, 4.0)
    sample, rgb_in, depth_in = decode_for_network(memoryview(msg), size, 4.0)
    assert np.array_equal(rgb_in, ref_rgb) and np.array_equal(depth_in, ref_depth)
    assert rgb_in.shape == (3, size[1], size[0]) and depth_in.shape == (1, size[1], size[0])
    # The network inputs own their memory: keeping them must not pin the received message.
    assert rgb_in.base is None and depth_in.base is not None and depth_in.base.base is None
    assert rgb_in.flags.writeable and depth_in.flags.writeable
    assert sample.episode_step == 4 and np.array_equal(sample.action, action)


def test_default_jpeg_decoding_is_the_standard_one_and_fast_is_an_opt_in() -> None:
    if rover_codec._simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    rgb = _frame(64, 96)[0]
    rgb[20:40, 30:60] = (255, 0, 0)  # a sharp colour edge, where fast upsampling differs most
    jpg = _jpeg(rgb)
    pillow = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    assert np.array_equal(decode_jpeg(jpg, 64, 96), pillow)  # bit-identical to the other backend
    fast = decode_jpeg(jpg, 64, 96, fast=True)
    assert fast.shape == pillow.shape and np.abs(fast.astype(int) - pillow).mean() < 3.0


def test_encode_refuses_non_finite_values() -> None:
    rgb, depth, proprio, action = _frame(8, 8)
    depth[0, 0] = np.nan
    with pytest.raises(RoverCodecError) as err:
        encode(rgb, depth, proprio, action, reward=0.0, done=False, episode_step=0)
    assert err.value.reason == "non_finite"
    with pytest.raises(RoverCodecError):
        encode(*_frame(8, 8), reward=float("inf"), done=False, episode_step=0)


# ---------------------------------------------------------------- an encoder written from the spec


def spec_encode(
    rgb: np.ndarray,
    depth: np.ndarray,
    proprio: np.ndarray,
    action: np.ndarray,
    compressed: bool,
    with_rgb_size: bool,
    extra: dict | None = None,
) -> bytes:
    """Written from the wire-format text only: [uint32 LE metadata_length][JSON metadata][RGB: JPEG
    or raw uint8][depth float32 LE][proprio float32 LE][action float32 LE]."""
    if compressed:
        out = io.BytesIO()
        Image.fromarray(rgb).save(out, format="JPEG", quality=80)
        rgb_bytes = out.getvalue()
    else:
        rgb_bytes = rgb.tobytes()
    meta = {
        "timestamp": 1234567890.123,
        "episode_step": 42,
        "reward": 0.5,
        "done": False,
        "rgb_shape": list(rgb.shape),
        "depth_shape": list(depth.shape),
        "proprio_shape": [6],
        "action_shape": [2],
        "rgb_compressed": compressed,
    }
    if with_rgb_size:
        meta["rgb_size"] = len(rgb_bytes)
    meta.update(extra or {})
    meta_bytes = json.dumps(meta).encode()
    floats = lambda a: struct.pack(f"<{a.size}f", *a.ravel().tolist())  # noqa: E731
    return (
        struct.pack("<I", len(meta_bytes))
        + meta_bytes
        + rgb_bytes
        + floats(depth)
        + floats(proprio)
        + floats(action)
    )


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("with_rgb_size", [True, False])
def test_independent_spec_encoder_is_accepted(
    compressed: bool, with_rgb_size: bool, jpeg_backend: str
) -> None:
    rgb, depth, proprio, action = _frame()
    s = decode(spec_encode(rgb, depth, proprio, action, compressed, with_rgb_size))
    assert s.rgb.shape == (H, W, 3)
    if not compressed:
        assert np.array_equal(s.rgb, rgb)
    assert np.array_equal(s.depth, depth)
    assert s.proprio.tolist() == pytest.approx(proprio.tolist())
    assert s.action.tolist() == [0.5, -0.25]
    assert (s.episode_step, s.reward, s.done, s.timestamp) == (42, 0.5, False, 1234567890.123)
    assert s.rover_id == "default" and s.log_prob is None and s.truncated is False


def test_spec_encoder_with_depth_of_another_size_and_a_trailing_channel() -> None:
    rgb, _, proprio, action = _frame(48, 64)
    depth = np.full((24, 32, 1), 2.0, np.float32)
    s = decode(spec_encode(rgb, depth, proprio, action, True, False))
    assert s.depth.shape == (24, 32)
    rgb_in, depth_in = to_network_input(s.rgb, s.depth, (32, 24), max_depth=4.0)
    assert rgb_in.shape == (3, 24, 32) and depth_in.shape == (1, 24, 32)
    assert np.allclose(depth_in, 0.5)


def test_unknown_version_is_rejected_and_unknown_keys_are_ignored() -> None:
    frame = _frame(8, 8)
    ok = decode(spec_encode(*frame, False, True, {"firmware": "1.2", "rover_id": "north"}))
    assert ok.rover_id == "north"
    with pytest.raises(RoverCodecError) as err:
        decode(spec_encode(*frame, False, True, {"version": 2}))
    assert err.value.reason == "bad_version"


# ---------------------------------------------------------------------------- targeted rejections


def _jpeg(rgb: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(out, format=fmt)
    return out.getvalue()


def _assemble(meta: dict, rgb_bytes: bytes, tail: bytes, edit: tuple[bytes, bytes] | None = None) -> bytes:
    mb = json.dumps(meta).encode()
    if edit is not None:
        assert edit[0] in mb
        mb = mb.replace(*edit)
    return struct.pack("<I", len(mb)) + mb + rgb_bytes + tail


def _parts(h: int = 12, w: int = 16) -> tuple[dict, bytes, bytes, np.ndarray]:
    rgb, depth, proprio, action = _frame(h, w)
    meta = {
        "timestamp": 1.0,
        "episode_step": 1,
        "reward": 0.0,
        "done": False,
        "rgb_shape": [h, w, 3],
        "depth_shape": [h, w],
        "proprio_shape": [6],
        "action_shape": [2],
        "rgb_compressed": True,
    }
    tail = depth.astype("<f4").tobytes() + proprio.astype("<f4").tobytes() + action.astype("<f4").tobytes()
    return meta, _jpeg(rgb), tail, rgb


def _with(meta: dict, **changes: object) -> dict:
    out = dict(meta)
    for k, v in changes.items():
        if v is _DELETE:
            out.pop(k, None)
        else:
            out[k] = v
    return out


_DELETE = object()


def _cases() -> list[tuple[str, Callable[[], bytes], str]]:
    meta, jpg, tail, rgb = _parts()
    good = _assemble(meta, jpg, tail)
    nan_tail = bytearray(tail)
    nan_tail[-4:] = struct.pack("<f", float("nan"))
    neg_tail = bytearray(tail)
    neg_tail[:4] = struct.pack("<f", -1.0)
    inf_tail = bytearray(tail)
    inf_tail[-32:-28] = struct.pack("<f", float("inf"))  # proprio[0]
    return [
        ("empty", lambda: b"", "truncated"),
        ("three bytes", lambda: b"\x01\x00\x00", "truncated"),
        ("4 GB metadata length", lambda: b"\xff\xff\xff\xff" + good[4:], "metadata_length"),
        ("zero metadata length", lambda: b"\x00\x00\x00\x00" + good[4:], "metadata_length"),
        ("metadata past the end", lambda: struct.pack("<I", 60000) + b"{}", "truncated"),
        ("big-endian length", lambda: struct.pack(">I", len(json.dumps(meta))) + good[4:], "metadata_length"),
        ("not JSON", lambda: struct.pack("<I", 5) + b"hello" + tail, "bad_json"),
        ("invalid UTF-8", lambda: struct.pack("<I", 3) + b"\xff\xfe{" + tail, "bad_json"),
        ("NaN literal", lambda: _assemble(meta, jpg, tail, (b'"reward": 0.0', b'"reward": NaN')), "bad_json"),
        ("deep nesting", lambda: struct.pack("<I", 20000) + b"[" * 10000 + b"]" * 10000, "bad_json"),
        ("JSON list", lambda: _assemble([1, 2], jpg, tail), "bad_metadata"),  # type: ignore[arg-type]
        ("reward as string", lambda: _assemble(_with(meta, reward="1"), jpg, tail), "bad_metadata"),
        ("reward as bool", lambda: _assemble(_with(meta, reward=True), jpg, tail), "bad_metadata"),
        (
            "reward 1e999",
            lambda: _assemble(meta, jpg, tail, (b'"reward": 0.0', b'"reward": 1e999')),
            "non_finite",
        ),
        ("no reward", lambda: _assemble(_with(meta, reward=_DELETE), jpg, tail), "bad_metadata"),
        ("done as int", lambda: _assemble(_with(meta, done=1), jpg, tail), "bad_metadata"),
        ("no done", lambda: _assemble(_with(meta, done=_DELETE), jpg, tail), "bad_metadata"),
        ("step negative", lambda: _assemble(_with(meta, episode_step=-1), jpg, tail), "bad_metadata"),
        ("step float", lambda: _assemble(_with(meta, episode_step=1.5), jpg, tail), "bad_metadata"),
        (
            "no compressed flag",
            lambda: _assemble(_with(meta, rgb_compressed=_DELETE), jpg, tail),
            "bad_metadata",
        ),
        (
            "compressed as string",
            lambda: _assemble(_with(meta, rgb_compressed="yes"), jpg, tail),
            "bad_metadata",
        ),
        ("log_prob string", lambda: _assemble(_with(meta, log_prob="x"), jpg, tail), "bad_metadata"),
        ("rover_id huge", lambda: _assemble(_with(meta, rover_id="r" * 65), jpg, tail), "bad_metadata"),
        ("rgb 4 channels", lambda: _assemble(_with(meta, rgb_shape=[12, 16, 4]), jpg, tail), "bad_shape"),
        (
            "rgb shape huge",
            lambda: _assemble(_with(meta, rgb_shape=[10**9, 10**9, 3]), jpg, tail),
            "bad_shape",
        ),
        ("rgb shape zero", lambda: _assemble(_with(meta, rgb_shape=[0, 16, 3]), jpg, tail), "bad_shape"),
        (
            "rgb shape strings",
            lambda: _assemble(_with(meta, rgb_shape=["12", 16, 3]), jpg, tail),
            "bad_shape",
        ),
        ("rgb shape bools", lambda: _assemble(_with(meta, rgb_shape=[True, 16, 3]), jpg, tail), "bad_shape"),
        ("depth 3-D", lambda: _assemble(_with(meta, depth_shape=[12, 16, 2]), jpg, tail), "bad_shape"),
        ("depth 2049 wide", lambda: _assemble(_with(meta, depth_shape=[1, 2049]), jpg, tail), "bad_shape"),
        ("proprio 7", lambda: _assemble(_with(meta, proprio_shape=[7]), jpg, tail), "bad_shape"),
        ("action 3", lambda: _assemble(_with(meta, action_shape=[3]), jpg, tail), "bad_shape"),
        (
            "depth larger than sent",
            lambda: _assemble(_with(meta, depth_shape=[120, 160]), jpg, tail),
            "length_mismatch",
        ),
        (
            "rgb_size lies",
            lambda: _assemble(_with(meta, rgb_size=len(jpg) + 1), jpg, tail),
            "length_mismatch",
        ),
        ("rgb_size negative", lambda: _assemble(_with(meta, rgb_size=-1), jpg, tail), "bad_metadata"),
        (
            "raw too short",
            lambda: _assemble(_with(meta, rgb_compressed=False), rgb.tobytes()[:-1], tail),
            "length_mismatch",
        ),
        (
            "tail missing",
            lambda: _assemble(_with(meta, rgb_size=len(jpg)), jpg, tail[:-4]),
            "length_mismatch",
        ),
        ("no JPEG at all", lambda: _assemble(meta, b"", tail), "length_mismatch"),
        ("PNG not JPEG", lambda: _assemble(meta, _jpeg(rgb, fmt="PNG"), tail), "bad_jpeg"),
        ("grey JPEG", lambda: _assemble(meta, _jpeg(rgb, mode="L"), tail), "bad_jpeg"),
        (
            "JPEG lies about its size",
            lambda: _assemble(meta, _jpeg(np.zeros((24, 16, 3), np.uint8)), tail),
            "jpeg_size_mismatch",
        ),
        ("JPEG truncated", lambda: _assemble(meta, jpg[: len(jpg) // 2], tail), "bad_jpeg"),
        ("NaN action", lambda: _assemble(meta, jpg, bytes(nan_tail)), "non_finite"),
        ("inf proprio", lambda: _assemble(meta, jpg, bytes(inf_tail)), "non_finite"),
        ("negative depth", lambda: _assemble(meta, jpg, bytes(neg_tail)), "bad_value"),
        (
            "too large",
            lambda: struct.pack("<I", 2) + b"{}" + bytes(CodecLimits().max_message_bytes),
            "too_large",
        ),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_malformed_message_is_rejected_with_its_reason(
    case: tuple[str, Callable[[], bytes], str], jpeg_backend: str
) -> None:
    _, build, reason = case
    with pytest.raises(RoverCodecError) as err:
        decode(build())
    assert err.value.reason == reason
    assert err.value.reason in REASONS
    assert isinstance(err.value, ValueError)


# ----------------------------------------------------------------------------------------- fuzz


def _malformed(rng: np.random.Generator, valid: list[tuple[dict, bytes, bytes, np.ndarray]]) -> bytes:
    """One message that is invalid by construction (each branch breaks a rule of the format)."""
    meta, jpg, tail, _ = valid[int(rng.integers(len(valid)))]
    msg = _assemble(meta, jpg, tail)
    kind = int(rng.integers(12))
    if kind == 0:  # truncated anywhere before the end
        return msg[: int(rng.integers(0, len(msg)))]
    if kind == 1:  # a length field that lies (bigger than the message or the limit, or zero)
        lie = int(rng.choice([0, len(msg), 2**16 + 1, 2**31, 2**32 - 1, int(rng.integers(len(msg), 2**32))]))
        return struct.pack("<I", lie) + msg[4:]
    if kind == 2:  # extra bytes after a message whose rgb_size is declared
        return _assemble({**meta, "rgb_size": len(jpg)}, jpg, tail) + rng.bytes(int(rng.integers(1, 64)))
    if kind == 3:  # a shape that lies about the payload
        key = str(rng.choice(["rgb_shape", "depth_shape"]))
        shape = list(meta[key])
        i = int(rng.integers(2))
        shape[i] = int(rng.choice([shape[i] + int(rng.integers(1, 5000)), -shape[i], 0, 2**40]))
        return _assemble({**meta, key: shape}, jpg, tail)
    if kind == 4:  # a required key missing
        key = str(
            rng.choice(["reward", "done", "episode_step", "rgb_shape", "depth_shape", "rgb_compressed"])
        )
        return _assemble({k: v for k, v in meta.items() if k != key}, jpg, tail)
    if kind == 5:  # a value of the wrong type
        key = str(rng.choice(["reward", "done", "episode_step", "rgb_compressed", "log_prob", "rgb_size"]))
        bad = (
            [None, "1", [1], {"a": 1}, True]
            if key != "done" and key != "rgb_compressed"
            else [None, 1, "true", []]
        )
        value = bad[int(rng.integers(len(bad)))]
        if key in ("log_prob",) and value is None:
            value = "x"
        if key == "reward" and value is None:
            value = "nan"
        if key == "rgb_size" and value is True:
            value = -5
        if key == "rgb_size" and value is None:
            value = 1.5
        return _assemble({**meta, key: value}, jpg, tail)
    if kind == 6:  # NaN or inf among the floats
        t = bytearray(tail)
        pos = 4 * int(rng.integers(len(t) // 4))
        t[pos : pos + 4] = struct.pack("<f", float(rng.choice([np.nan, np.inf, -np.inf])))
        return _assemble(meta, jpg, bytes(t))
    if kind == 7:  # not JSON / not an object
        junk = [b"{", b"nul", b"[1,2", b'{"a":}', b"\x00\x01", b'"str"', b"42", b"[]", b"{'a': 1}"]
        body = junk[int(rng.integers(len(junk)))]
        return struct.pack("<I", len(body)) + body + jpg + tail
    if kind == 8:  # the JPEG cut short, lengths kept consistent
        cut = jpg[: int(rng.integers(2, len(jpg) - 8))]
        return _assemble({**meta, "rgb_size": len(cut)}, cut, tail)
    if kind == 9:  # a JPEG of another size than declared
        h, w = meta["rgb_shape"][:2]
        other = _jpeg(np.zeros((h + 8 * int(rng.integers(1, 4)), w, 3), np.uint8))
        return _assemble(meta, other, tail)
    if kind == 10:  # random bytes in place of the JPEG
        blob = rng.bytes(int(rng.integers(1, 400)))
        return _assemble(meta, blob, tail)
    # pure noise
    return rng.bytes(int(rng.integers(0, 300)))


def test_fuzzed_malformed_messages_are_all_rejected_without_large_allocations(jpeg_backend: str) -> None:
    rng = np.random.default_rng(1234 if jpeg_backend == "simplejpeg" else 4321)
    valid = [_parts(12, 16), _parts(24, 32), _parts(8, 8)]
    n = 5200 if jpeg_backend == "simplejpeg" else 2600  # 7,800 in all across the two backends
    traced = 600  # tracemalloc slows Python down a lot; the first 600 (every kind, many times) are traced
    reasons: dict[str, int] = {}
    peak = 0
    tracemalloc.start()
    try:
        for i in range(n):
            if i == traced:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            msg = _malformed(rng, valid)
            with pytest.raises(RoverCodecError) as err:
                decode(msg)
            reasons[err.value.reason] = reasons.get(err.value.reason, 0) + 1
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
    assert 0 < peak < 8 * 1024 * 1024, f"fuzzing allocated {peak} bytes at peak"
    assert sum(reasons.values()) == n
    assert set(reasons) <= set(REASONS)
    assert len(reasons) >= 8  # the generator really exercises many rules


def test_random_byte_flips_never_raise_anything_but_codec_errors() -> None:
    rng = np.random.default_rng(99)
    meta, jpg, tail, _ = _parts(16, 24)
    base = bytearray(_assemble(meta, jpg, tail))
    accepted = 0
    for _ in range(1500):
        msg = bytearray(base)
        for _ in range(int(rng.integers(1, 6))):
            msg[int(rng.integers(len(msg)))] = int(rng.integers(256))
        try:
            s = decode(bytes(msg))
        except RoverCodecError:
            continue
        accepted += 1
        assert s.rgb.shape == (16, 24, 3) and np.isfinite(s.depth).all() and (s.depth >= 0).all()
    assert accepted < 1500


# -------------------------------------------------------------------------------- network input


def test_network_input_scales_and_clips_depth_and_resizes_both_to_one_size() -> None:
    rgb = np.zeros((60, 80, 3), np.uint8)
    rgb[:, :40] = 200
    depth = np.array([[0.0, 5.0, 20.0, 10.0]], np.float32).repeat(3, 0)  # (3, 4): another size
    rgb_in, depth_in = to_network_input(rgb, depth, (8, 6), max_depth=10.0)
    assert rgb_in.shape == (3, 6, 8) and rgb_in.dtype == np.uint8
    assert depth_in.shape == (1, 6, 8) and depth_in.dtype == np.float32
    assert set(np.unique(depth_in).tolist()) == {0.0, 0.5, 1.0}  # nearest: no invented depths
    assert rgb_in[:, :, 0].min() > 150 and rgb_in[:, :, -1].max() < 50


@pytest.mark.parametrize(
    ("src", "dst"),
    [((424, 240), (106, 60)), ((424, 240), (100, 57)), ((7, 3), (16, 16)), ((640, 480), (424, 240))],
)
def test_depth_resize_picks_the_same_pixels_as_pillow_nearest(
    src: tuple[int, int], dst: tuple[int, int]
) -> None:
    depth = np.random.default_rng(0).uniform(0, 1, (src[1], src[0])).astype(np.float32)
    expected = np.asarray(Image.fromarray(depth).resize(dst, Image.Resampling.NEAREST))
    rgb = np.zeros((dst[1], dst[0], 3), np.uint8)
    _, depth_in = to_network_input(rgb, depth, dst, max_depth=1.0)  # in [0, 1): scaling is exact
    assert np.array_equal(depth_in[0], expected)
