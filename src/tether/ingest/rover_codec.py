"""The rover wire format: one ZeroMQ message per sample, encoded by the rover, decoded by the server.

Layout (all numbers little-endian)::

    [4 bytes: uint32 metadata_length]
    [metadata_length bytes: UTF-8 JSON object]
    [RGB: JPEG when metadata.rgb_compressed, else raw uint8 H*W*3 in row-major HWC order]
    [depth: float32, metres, depth_shape]
    [proprio: float32 x 6: linear_vel, angular_vel, roll, pitch, accel_mag, min_forward_dist]
    [action: float32 x 2: linear_cmd, angular_cmd, normalised to [-1, 1]]

The JPEG length is `metadata.rgb_size` when present, else the total length minus every fixed-size
part; both are accepted. The decoder trusts nothing: the metadata length is bounded before anything
is copied, every shape is bounded before any array exists, the JPEG header must announce exactly the
declared size before it is decoded, and every number must be finite. A rejection raises
`RoverCodecError` whose `reason` is one of `REASONS`, for the server's counters.

The full text, with an example payload, is in docs/protocols.md ("Rover (ZeroMQ)").
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
import time
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
from PIL import Image

try:  # optional: about 1.5x faster than Pillow at decoding (both wrap libjpeg-turbo)
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - exercised where simplejpeg is absent
    _simplejpeg = None

WIRE_VERSION = 1
HEADER = struct.Struct("<I")
LE_FLOAT32 = np.dtype("<f4")
LE_UINT32 = np.dtype("<u4")
# Bit pattern of +inf. A float32 whose bits, read as an unsigned integer, are below it is finite
# and has its sign bit clear; NaN, inf and everything negative (also -0.0) are at or above it.
_FLOAT32_INF_BITS = 0x7F800000
PROPRIO_FIELDS = ("linear_vel", "angular_vel", "roll", "pitch", "accel_mag", "min_forward_dist")
ACTION_FIELDS = ("linear_cmd", "angular_cmd")

# Rejection reasons, one counter each on the server.
REASONS = (
    "too_large",  # message over limits.max_message_bytes
    "truncated",  # shorter than its header says
    "metadata_length",  # zero or over limits.max_metadata_bytes
    "bad_json",  # not UTF-8 JSON, NaN literals, nesting too deep
    "bad_metadata",  # not an object, a required key missing, a value of the wrong type
    "bad_version",  # a `version` this decoder does not speak
    "bad_shape",  # a shape that is malformed, out of bounds or not the expected one
    "length_mismatch",  # the payload length disagrees with the shapes / rgb_size
    "bad_jpeg",  # not a decodable colour JPEG
    "jpeg_size_mismatch",  # the JPEG's own size differs from rgb_shape
    "non_finite",  # NaN or inf in depth, proprio, action, reward, log_prob or timestamp
    "bad_value",  # finite but impossible (negative depth)
)


class RoverCodecError(ValueError):
    """A message that is not a valid rover sample; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CodecLimits:
    """Bounds checked before any allocation. The defaults admit a 2048x2048 camera."""

    max_metadata_bytes: int = 64 * 1024
    max_height: int = 2048
    max_width: int = 2048
    proprio_dim: int = 6
    action_dim: int = 2

    @property
    def max_jpeg_bytes(self) -> int:
        # A JPEG of noise at quality 100 can exceed the raw size a little; twice raw is generous.
        return 2 * self.max_height * self.max_width * 3 + 4096

    @property
    def max_message_bytes(self) -> int:
        fixed = self.max_height * self.max_width * 4 + (self.proprio_dim + self.action_dim) * 4
        return HEADER.size + self.max_metadata_bytes + self.max_jpeg_bytes + fixed


DEFAULT_LIMITS = CodecLimits()


@dataclass
class RoverSample:
    """One decoded message. Arrays own their memory (they do not pin the received frame), except
    `rgb` (raw RGB only) and `depth` of a sample decoded with `copy=False`: read-only views."""

    rgb: np.ndarray  # (H, W, 3) uint8; smaller when decoded with `rgb_min_size`
    depth: np.ndarray  # (Hd, Wd) float32 (little-endian), metres (0 = no reading)
    proprio: np.ndarray  # (6,) float32
    action: np.ndarray  # (2,) float32
    reward: float
    done: bool
    episode_step: int
    timestamp: float | None = None
    log_prob: float | None = None
    truncated: bool = False
    rover_id: str = "default"
    rgb_compressed: bool = False


# ----------------------------------------------------------------------------------------- JPEG


def jpeg_backend() -> str:
    """Which JPEG library is in use: 'simplejpeg' when installed, else 'pillow'."""
    return "simplejpeg" if _simplejpeg is not None else "pillow"


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if _simplejpeg is not None:
        return bytes(_simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB", colorsubsampling="420"))
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def decode_jpeg(
    data: bytes | memoryview,
    height: int,
    width: int,
    min_size: tuple[int, int] | None = None,
    fast: bool = False,
) -> np.ndarray:
    """Decode a colour JPEG that must be exactly `height` x `width`, reading the header first so a
    lying header never allocates. With `min_size` (w, h) libjpeg may decode at 1/2, 1/4 or 1/8
    scale as long as the result stays at least that large (the server resizes down anyway).

    `fast` uses libjpeg-turbo's fast integer DCT and fast chroma upsampling (simplejpeg only):
    5-10% quicker, but no longer bit-identical to a standard decoder (mean error about 1 grey
    level, up to ~80 at sharp colour edges). Off by default, so both backends give the same image."""
    if _simplejpeg is not None:
        try:
            h, w, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
        except ValueError as exc:
            raise RoverCodecError("bad_jpeg", f"unreadable JPEG header ({exc})") from None
        if (h, w) != (height, width):
            raise RoverCodecError("jpeg_size_mismatch", f"JPEG is {h}x{w}, rgb_shape says {height}x{width}")
        if colorspace not in ("YCbCr", "RGB"):
            raise RoverCodecError("bad_jpeg", f"JPEG colorspace {colorspace} is not colour")
        min_w, min_h = min_size if min_size else (0, 0)
        try:
            img = _simplejpeg.decode_jpeg(
                data, colorspace="RGB", fastdct=fast, fastupsample=fast, min_height=min_h, min_width=min_w
            )
        except ValueError as exc:
            raise RoverCodecError("bad_jpeg", f"JPEG does not decode ({exc})") from None
        return img
    try:
        im = Image.open(io.BytesIO(bytes(data)), formats=["JPEG"])
    except Exception as exc:
        raise RoverCodecError("bad_jpeg", f"not a JPEG ({exc.__class__.__name__})") from None
    if im.size != (width, height):
        raise RoverCodecError(
            "jpeg_size_mismatch", f"JPEG is {im.size[1]}x{im.size[0]}, rgb_shape says {height}x{width}"
        )
    if im.mode not in ("RGB", "YCbCr"):
        raise RoverCodecError("bad_jpeg", f"JPEG mode {im.mode} is not colour")
    if min_size:
        im.draft("RGB", min_size)
    try:
        im.load()
    except Exception as exc:  # truncated or corrupt scan data
        raise RoverCodecError("bad_jpeg", f"JPEG does not decode ({exc.__class__.__name__})") from None
    return np.asarray(im.convert("RGB") if im.mode != "RGB" else im)


# --------------------------------------------------------------------------------------- encode


def encode(
    rgb: np.ndarray,
    depth: np.ndarray,
    proprio: np.ndarray,
    action: np.ndarray,
    *,
    reward: float,
    done: bool,
    episode_step: int,
    timestamp: float | None = None,
    log_prob: float | None = None,
    truncated: bool | None = None,
    rover_id: str | None = None,
    compress: bool = True,
    jpeg_quality: int = 90,
    include_rgb_size: bool = True,
) -> bytes:
    """Encode one sample. `rgb` (H, W, 3) uint8; `depth` (H', W') metres, finite and >= 0 (send 0 for
    no reading); `action` is what was executed, in [-1, 1], and `log_prob` its log-density under
    the policy that chose it (omit for teleoperation)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise RoverCodecError("bad_shape", f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    depth_le = np.ascontiguousarray(np.asarray(depth).astype(LE_FLOAT32, copy=False))
    if depth_le.ndim == 3 and depth_le.shape[2] == 1:
        depth_le = depth_le[:, :, 0]
    if depth_le.ndim != 2:
        raise RoverCodecError("bad_shape", f"depth must be (H, W), got {depth_le.shape}")
    proprio_le = np.ascontiguousarray(np.asarray(proprio).astype(LE_FLOAT32, copy=False).reshape(-1))
    action_le = np.ascontiguousarray(np.asarray(action).astype(LE_FLOAT32, copy=False).reshape(-1))
    for name, arr in (("depth", depth_le), ("proprio", proprio_le), ("action", action_le)):
        if not np.isfinite(arr).all():
            raise RoverCodecError("non_finite", f"{name} holds NaN or inf")
    rgb_bytes = encode_jpeg(rgb, jpeg_quality) if compress else np.ascontiguousarray(rgb).tobytes()
    meta: dict[str, Any] = {
        "version": WIRE_VERSION,
        "timestamp": time.time() if timestamp is None else float(timestamp),
        "episode_step": int(episode_step),
        "reward": float(reward),
        "done": bool(done),
        "rgb_shape": list(rgb.shape),
        "depth_shape": list(depth_le.shape),
        "proprio_shape": list(proprio_le.shape),
        "action_shape": list(action_le.shape),
        "rgb_compressed": bool(compress),
    }
    if include_rgb_size:
        meta["rgb_size"] = len(rgb_bytes)
    if log_prob is not None:
        meta["log_prob"] = float(log_prob)
    if truncated is not None:
        meta["truncated"] = bool(truncated)
    if rover_id is not None:
        meta["rover_id"] = str(rover_id)
    try:
        meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError:
        raise RoverCodecError("non_finite", "reward, timestamp or log_prob is NaN or inf") from None
    return b"".join(
        (
            HEADER.pack(len(meta_bytes)),
            meta_bytes,
            rgb_bytes,
            depth_le.tobytes(),
            proprio_le.tobytes(),
            action_le.tobytes(),
        )
    )


# --------------------------------------------------------------------------------------- decode


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shape(meta: dict[str, Any], key: str) -> list[int]:
    value = meta.get(key)
    if not isinstance(value, list) or not 1 <= len(value) <= 3 or not all(_is_int(v) for v in value):
        raise RoverCodecError("bad_shape", f"{key} must be a list of 1-3 integers, got {value!r:.80}")
    return value


def _finite(meta: dict[str, Any], key: str, required: bool) -> float | None:
    value = meta.get(key)
    if value is None:
        if required:
            raise RoverCodecError("bad_metadata", f"metadata lacks '{key}'")
        return None
    if not _is_number(value):
        raise RoverCodecError("bad_metadata", f"'{key}' must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise RoverCodecError("non_finite", f"'{key}' is not finite")
    return value


def _bool(meta: dict[str, Any], key: str, default: bool | None) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, bool):
        raise RoverCodecError("bad_metadata", f"'{key}' must be true or false, got {value!r:.40}")
    return value


def parse_metadata(
    message: bytes | bytearray | memoryview, limits: CodecLimits = DEFAULT_LIMITS
) -> tuple[dict[str, Any], int]:
    """Check the length prefix and parse the JSON. Returns (metadata, offset of the RGB payload)."""
    total = len(message)
    if total > limits.max_message_bytes:
        raise RoverCodecError("too_large", f"{total} bytes exceeds the {limits.max_message_bytes}-byte limit")
    if total < HEADER.size:
        raise RoverCodecError("truncated", f"{total} bytes is shorter than the 4-byte header")
    (meta_len,) = HEADER.unpack_from(message, 0)
    if meta_len == 0 or meta_len > limits.max_metadata_bytes:
        raise RoverCodecError(
            "metadata_length", f"metadata_length {meta_len} is outside 1..{limits.max_metadata_bytes}"
        )
    end = HEADER.size + meta_len
    if end > total:
        raise RoverCodecError("truncated", f"metadata_length {meta_len} runs past the {total}-byte message")
    try:
        meta = json.loads(bytes(message[HEADER.size : end]), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise RoverCodecError("bad_json", f"metadata is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise RoverCodecError("bad_metadata", f"metadata must be a JSON object, got {type(meta).__name__}")
    return meta, end


def _check_depth(depth: np.ndarray) -> None:
    # One pass over the bits instead of min() and max(); the slow path only names the reason.
    if depth.size == 0 or int(depth.view(LE_UINT32).max()) < _FLOAT32_INF_BITS:
        return
    if not np.isfinite(depth).all():
        raise RoverCodecError("non_finite", "depth holds NaN or inf")
    if (depth < 0).any():
        raise RoverCodecError("bad_value", "depth holds negative distances")
    # Only -0.0 sets the sign bit without being negative: accepted, as a value it is 0.


def decode(
    message: bytes | bytearray | memoryview,
    limits: CodecLimits = DEFAULT_LIMITS,
    rgb_min_size: tuple[int, int] | None = None,
    *,
    jpeg_fast: bool = False,
    copy: bool = True,
) -> RoverSample:
    """Validate and decode one message. With `rgb_min_size` (w, h) a JPEG may come back smaller
    than rgb_shape (but at least that size); raw RGB always comes back at rgb_shape. `jpeg_fast`:
    see `decode_jpeg`. With `copy=False` raw RGB and depth are read-only views into `message`
    (saves two copies when the caller converts them anyway, as `decode_for_network` does)."""
    view = memoryview(message).cast("B") if not isinstance(message, bytes) else message
    meta, offset = parse_metadata(view, limits)
    total = len(view)

    version = meta.get("version", WIRE_VERSION)
    if version != WIRE_VERSION or not _is_int(version):
        raise RoverCodecError("bad_version", f"wire version {version!r:.20} is not {WIRE_VERSION}")

    rgb_shape = _shape(meta, "rgb_shape")
    depth_shape = _shape(meta, "depth_shape")
    if len(rgb_shape) != 3 or rgb_shape[2] != 3:
        raise RoverCodecError("bad_shape", f"rgb_shape must be [H, W, 3], got {rgb_shape}")
    if len(depth_shape) == 3 and depth_shape[2] == 1:
        depth_shape = depth_shape[:2]
    if len(depth_shape) != 2:
        raise RoverCodecError("bad_shape", f"depth_shape must be [H, W], got {depth_shape}")
    for name, (h, w) in (("rgb_shape", rgb_shape[:2]), ("depth_shape", depth_shape)):
        if not (1 <= h <= limits.max_height and 1 <= w <= limits.max_width):
            raise RoverCodecError(
                "bad_shape", f"{name} {h}x{w} is outside 1..{limits.max_height} x 1..{limits.max_width}"
            )
    if _shape(meta, "proprio_shape") != [limits.proprio_dim]:
        raise RoverCodecError("bad_shape", f"proprio_shape must be [{limits.proprio_dim}]")
    if _shape(meta, "action_shape") != [limits.action_dim]:
        raise RoverCodecError("bad_shape", f"action_shape must be [{limits.action_dim}]")

    compressed = _bool(meta, "rgb_compressed", None) if "rgb_compressed" in meta else None
    if compressed is None:
        raise RoverCodecError("bad_metadata", "metadata lacks 'rgb_compressed'")
    reward = _finite(meta, "reward", required=True)
    done = _bool(meta, "done", None) if "done" in meta else None
    if done is None:
        raise RoverCodecError("bad_metadata", "metadata lacks 'done'")
    step = meta.get("episode_step")
    if not _is_int(step) or not 0 <= step < 2**53:
        raise RoverCodecError(
            "bad_metadata", f"'episode_step' must be a non-negative integer, got {step!r:.40}"
        )
    timestamp = _finite(meta, "timestamp", required=False)
    log_prob = _finite(meta, "log_prob", required=False)
    truncated = _bool(meta, "truncated", False)
    rover_id = meta.get("rover_id", "default")
    if not isinstance(rover_id, str) or not 1 <= len(rover_id) <= 64:
        raise RoverCodecError("bad_metadata", "'rover_id' must be a string of 1-64 characters")

    h, w = rgb_shape[0], rgb_shape[1]
    depth_bytes = depth_shape[0] * depth_shape[1] * 4
    tail = depth_bytes + (limits.proprio_dim + limits.action_dim) * 4
    rgb_len = total - offset - tail
    declared = meta.get("rgb_size")
    if declared is not None and (not _is_int(declared) or declared < 0):
        raise RoverCodecError(
            "bad_metadata", f"'rgb_size' must be a non-negative integer, got {declared!r:.40}"
        )
    if declared is not None and declared != rgb_len:
        raise RoverCodecError(
            "length_mismatch", f"rgb_size {declared} but the message leaves {rgb_len} bytes for RGB"
        )
    expected_raw = h * w * 3
    if not compressed and rgb_len != expected_raw:
        raise RoverCodecError(
            "length_mismatch", f"raw RGB needs {expected_raw} bytes, the message has {rgb_len}"
        )
    if compressed and not 0 < rgb_len <= limits.max_jpeg_bytes:
        raise RoverCodecError(
            "length_mismatch", f"JPEG length {rgb_len} is outside 1..{limits.max_jpeg_bytes}"
        )

    rgb_end = offset + rgb_len
    depth = np.frombuffer(view, dtype=LE_FLOAT32, count=depth_shape[0] * depth_shape[1], offset=rgb_end)
    proprio = np.frombuffer(view, dtype=LE_FLOAT32, count=limits.proprio_dim, offset=rgb_end + depth_bytes)
    action = np.frombuffer(
        view, dtype=LE_FLOAT32, count=limits.action_dim, offset=rgb_end + depth_bytes + limits.proprio_dim * 4
    )
    for name, arr in (("proprio", proprio), ("action", action)):
        if not np.isfinite(arr).all():
            raise RoverCodecError("non_finite", f"{name} holds NaN or inf")
    _check_depth(depth)

    if compressed:
        rgb = decode_jpeg(view[offset:rgb_end], h, w, rgb_min_size, jpeg_fast)
    else:
        rgb = np.frombuffer(view, dtype=np.uint8, count=expected_raw, offset=offset).reshape(h, w, 3)
        if copy:
            rgb = rgb.copy()
        else:
            rgb.flags.writeable = False  # also when `message` is a bytearray
    depth = depth.reshape(depth_shape)
    if copy:
        depth = depth.astype(np.float32)
    else:
        depth.flags.writeable = False
    return RoverSample(
        rgb=rgb,
        depth=depth,
        proprio=proprio.astype(np.float32),
        action=action.astype(np.float32),
        reward=float(reward),  # type: ignore[arg-type]
        done=done,
        episode_step=int(step),
        timestamp=timestamp,
        log_prob=log_prob,
        truncated=truncated,
        rover_id=rover_id,
        rgb_compressed=compressed,
    )


# ----------------------------------------------------------------------------------- preprocess


@functools.lru_cache(maxsize=64)
def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """Source index per output pixel of Pillow's NEAREST resize, bit for bit: Pillow accumulates
    `xo += scale` from `scale / 2` and truncates, so the sum is replayed in the same order."""
    scale = size_in / size_out
    xo = 0.0 + scale * 0.5
    index = np.empty(size_out, np.intp)
    for i in range(size_out):
        index[i] = int(xo)
        xo += scale
    index.flags.writeable = False
    return index


def _resize_depth_nearest(depth: np.ndarray, w: int, h: int) -> np.ndarray:
    # Same pixels as Pillow's NEAREST, without copying the full frame into an image first.
    return depth[_nearest_index(depth.shape[0], h)[:, None], _nearest_index(depth.shape[1], w)]


def to_network_input(
    rgb: np.ndarray, depth: np.ndarray, image_size: tuple[int, int], max_depth: float
) -> tuple[np.ndarray, np.ndarray]:
    """Bring one frame to the network's input: RGB (3, h, w) uint8 and depth (1, h, w) float32 in
    [0, 1] (metres / max_depth, clipped), both at `image_size` (w, h). RGB is resized with Pillow's
    antialiased bilinear filter; depth with nearest-neighbour (Pillow's sampling) so no depth is
    invented at object edges or between a reading and a 0 (no reading). Depth of another size than
    RGB is resized to the same `image_size`, so the two branches always see aligned pixels. Both
    outputs are new arrays, never views of the inputs."""
    w, h = image_size
    if rgb.shape[:2] != (h, w):
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.Resampling.BILINEAR))
    if depth.shape != (h, w):
        depth = _resize_depth_nearest(depth, w, h)
    depth01 = np.multiply(depth, np.float32(1.0 / max_depth), dtype=np.float32)
    np.clip(depth01, 0.0, 1.0, out=depth01)
    # HWC -> CHW. `.copy()` always allocates (ascontiguousarray may return a view for 1x1 frames).
    return rgb.transpose(2, 0, 1).copy(), depth01[None]


def decode_for_network(
    message: bytes | bytearray | memoryview,
    image_size: tuple[int, int],
    max_depth: float,
    limits: CodecLimits = DEFAULT_LIMITS,
    *,
    jpeg_fast: bool = False,
) -> tuple[RoverSample, np.ndarray, np.ndarray]:
    """What a server decode worker does per message: `decode` (JPEG scaled down by libjpeg when
    `image_size` allows) and `to_network_input`, without copying raw RGB or depth out of the
    message first. Returns (sample, rgb (3, h, w) uint8, depth (1, h, w) float32); the sample's
    `rgb` and `depth` may be views into `message`, so keep the two returned arrays, not those."""
    sample = decode(message, limits, rgb_min_size=image_size, jpeg_fast=jpeg_fast, copy=False)
    rgb, depth = to_network_input(sample.rgb, sample.depth, image_size, max_depth)
    return sample, rgb, depth
