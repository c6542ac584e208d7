"""Rover-side library: what the ROS2 node on the robot imports.

- `RoverClient` streams samples to the training server (ZeroMQ PUSH, never blocks the control
  loop: a full send queue drops the sample and counts it; ZeroMQ reconnects by itself when the
  server restarts or the link comes back, delivering what is still queued).
- `ModelWatcher` receives new policies: from the server's PUB socket (topic `model`, the ONNX
  bytes with a SHA-256) and/or by watching the `remote_trained.*` link in a models directory that
  `tether deploy` copies into. Either way it hands back a local file path.
- `RoverPolicy` runs a model: `.onnx` with ONNX Runtime, `.rknn` with `rknnlite` on the RK3588
  NPU; both take (rgb, depth, proprio) and return [linear_cmd, angular_cmd] in [-1, 1].

This module imports neither torch nor the server; numpy, pyzmq and Pillow are enough.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import zmq

from tether.errors import TetherError
from tether.ingest.rover_codec import RoverCodecError, encode, to_network_input

log = logging.getLogger(__name__)

MODEL_TOPIC = b"model"
LINK_NAME = "remote_trained"
MAX_MODEL_BYTES = 256 * 1024 * 1024
DEFAULT_IMAGE_SIZE = (424, 240)
DEFAULT_MAX_DEPTH = 10.0
INPUT_NAMES = ("rgb", "depth", "proprio")


class RoverModelError(TetherError):
    """A model file cannot be loaded on this machine; the message names the fix."""


def default_model_endpoint(connect: str) -> str:
    """The server publishes models on its data port + 1: tcp://HOST:5555 -> tcp://HOST:5556."""
    parts = urlsplit(connect)
    if parts.scheme != "tcp" or parts.port is None or parts.hostname is None:
        raise ValueError(f"cannot derive the model endpoint from {connect!r}; pass it explicitly")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return f"tcp://{host}:{parts.port + 1}"


# ---------------------------------------------------------------------------------------- client


class RoverClient:
    """Non-blocking sample sender. `send()` returns False (and counts a drop) when `sndhwm`
    samples are already queued, e.g. while the server is down; it never stalls the robot."""

    def __init__(
        self,
        connect: str = "tcp://127.0.0.1:5555",
        compress: bool = True,
        jpeg_quality: int = 90,
        sndhwm: int = 200,
        rover_id: str | None = None,
        linger_ms: int = 2000,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if not 1 <= jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be within 1..100")
        self.connect = connect
        self.compress = compress
        self.jpeg_quality = jpeg_quality
        self.rover_id = rover_id
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.LINGER, linger_ms)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 200)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        self._sock.connect(connect)
        self.sent = 0
        self.dropped = 0

    def send(
        self,
        rgb: np.ndarray,
        depth: np.ndarray,
        proprio: np.ndarray,
        action: np.ndarray,
        reward: float,
        done: bool,
        episode_step: int,
        log_prob: float | None = None,
        truncated: bool | None = None,
        timestamp: float | None = None,
    ) -> bool:
        """Queue one sample: the frame seen at `episode_step`, the action then executed (as sampled,
        before any clipping, normalised to [-1, 1]), the reward that followed and whether the
        episode ended. `log_prob` is the action's log-density under the policy that chose it;
        leave it None for teleoperation. Invalid depth (NaN, inf, negative) is sent as 0 (no
        reading). Returns False if the sample was dropped because the send queue is full."""
        depth = np.asarray(depth, dtype=np.float32)
        if not np.isfinite(depth).all() or (depth < 0).any():
            depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
        message = encode(
            rgb,
            depth,
            proprio,
            action,
            reward=reward,
            done=done,
            episode_step=episode_step,
            timestamp=timestamp,
            log_prob=log_prob,
            truncated=truncated,
            rover_id=self.rover_id,
            compress=self.compress,
            jpeg_quality=self.jpeg_quality,
        )
        try:
            self._sock.send(message, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RoverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------- hot reload


def _atomic_symlink(target_name: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target_name, tmp)
    os.replace(tmp, link)


class ModelWatcher:
    """Tells the rover when a new policy is there.

    Two sources, either or both:
    - `connect` (e.g. tcp://SERVER:5556): a ZeroMQ SUB on topic `model`. Each message is three
      frames `[b"model", JSON metadata, model bytes]`; the metadata carries `update`, `sha256`,
      `size` and `format`. A verified model is written atomically to
      `models_dir/ppo_update_<N>.onnx` (with its metadata as `<file>.json` beside it) and the
      `remote_trained.onnx` link is pointed at it.
    - the `remote_trained.onnx` / `remote_trained.rknn` link in `models_dir` (what `tether deploy`
      updates over scp): a change of its target, size or mtime is a new model.

    `poll(timeout)` returns the path of a new model, or None; call it from the control loop.
    """

    def __init__(
        self,
        models_dir: str | Path,
        connect: str | None = None,
        watch_files: bool = True,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.connect = connect
        self.watch_files = watch_files
        self.current_sha: str | None = None
        self.rejected = 0
        self._sock = None
        if connect:
            ctx = context or zmq.Context.instance()
            self._sock = ctx.socket(zmq.SUB)
            self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MODEL_BYTES)
            self._sock.setsockopt(zmq.RCVHWM, 4)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.SUBSCRIBE, MODEL_TOPIC)
            self._sock.connect(connect)
        self._file_state = self._link_state() if watch_files else None

    def _link_state(self) -> tuple[str, int, int] | None:
        for suffix in (".rknn", ".onnx"):
            link = self.models_dir / f"{LINK_NAME}{suffix}"
            try:
                st = link.stat()
            except OSError:
                continue
            return (os.path.realpath(link), st.st_size, st.st_mtime_ns)
        return None

    def current(self) -> Path | None:
        """The model the link points at now, if any."""
        state = self._link_state()
        return Path(state[0]) if state else None

    def poll(self, timeout: float = 0.0) -> Path | None:
        if self._sock is not None:
            got = self._poll_socket(timeout)
            if got is not None:
                self._file_state = self._link_state()
                return got
        elif timeout > 0:
            time.sleep(timeout)
        if self.watch_files:
            state = self._link_state()
            if state is not None and state != self._file_state:
                self._file_state = state
                return Path(state[0])
        return None

    def _poll_socket(self, timeout: float) -> Path | None:
        assert self._sock is not None
        newest: Path | None = None
        wait_ms = int(timeout * 1000)
        while self._sock.poll(wait_ms, zmq.POLLIN):
            wait_ms = 0  # drain what is queued, keep the newest
            frames = self._sock.recv_multipart()
            path = self._accept(frames)
            if path is not None:
                newest = path
        return newest

    def _accept(self, frames: list[bytes]) -> Path | None:
        try:
            if len(frames) != 3 or frames[0] != MODEL_TOPIC:
                raise ValueError("expected [topic, metadata, model]")
            meta = json.loads(frames[1])
            blob = frames[2]
            if not isinstance(meta, dict) or meta.get("size") != len(blob):
                raise ValueError("size mismatch")
            sha = hashlib.sha256(blob).hexdigest()
            if meta.get("sha256") != sha:
                raise ValueError("sha256 mismatch")
            update = meta["update"]
            if not isinstance(update, int) or isinstance(update, bool) or not 0 <= update < 2**63:
                raise ValueError(f"bad update number {update!r:.40}")
            fmt = meta.get("format", "onnx")
            if fmt not in ("onnx", "rknn"):
                raise ValueError(f"unknown format {fmt!r}")
        except (ValueError, KeyError, TypeError) as exc:
            self.rejected += 1
            log.warning("ignoring a malformed model message (%s)", exc)
            return None
        if sha == self.current_sha:
            return None
        name = f"ppo_update_{update}.{fmt}"
        path = self.models_dir / name
        _atomic_write(path, blob)
        _atomic_write(sidecar_path(path), json.dumps(meta, indent=2).encode())
        _atomic_symlink(name, self.models_dir / f"{LINK_NAME}.{fmt}")
        self.current_sha = sha
        log.info("received model update %d (%d bytes)", update, len(blob))
        return path

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def sidecar_path(model_path: Path) -> Path:
    """`ppo_update_7.onnx` → `ppo_update_7.onnx.json` (the convention of `tether.export`)."""
    return model_path.with_name(model_path.name + ".json")


def _read_sidecar(model_path: Path) -> dict[str, Any]:
    for candidate in (sidecar_path(model_path), model_path.with_suffix(".json")):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.warning("ignoring unreadable model metadata %s", candidate)
                continue
            if isinstance(data, dict):
                return data
    return {}


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------- policy


class RoverPolicy:
    """A deployed policy. `act()` is deterministic (the mean action); `sample()` adds the policy's
    own Gaussian exploration noise and returns the log-probability the server needs."""

    def __init__(
        self,
        run: Any,
        image_size: tuple[int, int],
        max_depth: float,
        log_std: np.ndarray | None,
        path: Path,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self._run = run
        self.meta = meta or {}
        update = self.meta.get("update")
        self.update: int | None = int(update) if isinstance(update, int) else None
        self.image_size = image_size
        self.max_depth = max_depth
        self.log_std = log_std
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> RoverPolicy:
        """Load `.onnx` (ONNX Runtime) or `.rknn` (rknnlite, on the rover). Input size, depth scale
        and exploration std come from the model's `tether.rover` metadata property (ONNX) or its
        sidecar `<file>.json` (what `tether deploy` and `ModelWatcher` write beside each model)."""
        path = Path(path)
        if not path.is_file():
            raise RoverModelError(
                f"model {path} does not exist; check the path or run `tether deploy` again."
            )
        meta = _read_sidecar(path)
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            import onnxruntime as ort

            try:
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise RoverModelError(
                    f"model {path} is not a loadable ONNX file ({exc.__class__.__name__}); copy it again."
                ) from None
            custom = session.get_modelmeta().custom_metadata_map
            if "tether.rover" in custom:
                meta = {**meta, **json.loads(custom["tether.rover"])}
            names = {i.name for i in session.get_inputs()}
            if names != set(INPUT_NAMES):
                raise RoverModelError(
                    f"model {path} takes inputs {sorted(names)}, not rgb, depth and proprio."
                )

            def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
                return np.asarray(session.run(None, feeds)[0])

        elif suffix == ".rknn":
            try:
                from rknnlite.api import RKNNLite
            except ImportError:
                raise RoverModelError(
                    f"{path} is an RKNN model and needs rknn-toolkit-lite2 (rknnlite), which only runs "
                    "on the RK3588; install it there, or load the .onnx file instead."
                ) from None
            rknn = RKNNLite()
            if rknn.load_rknn(str(path)) != 0 or rknn.init_runtime() != 0:
                raise RoverModelError(f"rknnlite could not load {path}; check the NPU driver and the file.")
            # The RKNN model keeps the ONNX input order, which the sidecar records.
            order = [i["name"] for i in meta.get("inputs", [])] or list(INPUT_NAMES)

            def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
                return np.asarray(rknn.inference(inputs=[feeds[n] for n in order], data_format="nchw")[0])

        else:
            raise RoverModelError(f"unknown model type {path.suffix!r}; use a .onnx or .rknn file.")
        size = meta.get("image_size", DEFAULT_IMAGE_SIZE)
        log_std = meta.get("log_std")
        return cls(
            run,
            (int(size[0]), int(size[1])),
            float(meta.get("max_depth", DEFAULT_MAX_DEPTH)),
            np.asarray(log_std, dtype=np.float64) if log_std is not None else None,
            path,
            meta,
        )

    def inputs(self, rgb: np.ndarray, depth: np.ndarray, proprio: np.ndarray) -> dict[str, np.ndarray]:
        """The model's feeds for one frame (what the server trains on: `to_network_input`)."""
        rgb_chw, depth01 = to_network_input(
            np.asarray(rgb), np.asarray(depth, dtype=np.float32), self.image_size, self.max_depth
        )
        return {
            "rgb": rgb_chw[None],
            "depth": depth01[None],
            "proprio": np.asarray(proprio, np.float32).reshape(1, -1),
        }

    def act(self, rgb: np.ndarray, depth: np.ndarray, proprio: np.ndarray) -> np.ndarray:
        """[linear_cmd, angular_cmd] in [-1, 1], deterministic."""
        return self._run(self.inputs(rgb, depth, proprio))[0].astype(np.float32)

    def sample(
        self, rgb: np.ndarray, depth: np.ndarray, proprio: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, float | None]:
        """An exploratory action (mean + Gaussian noise with the policy's std) and its log-density,
        or the mean and None when the model carries no std. Execute `clip(action, -1, 1)` but send
        the action as returned: its log_prob is for the unclipped value."""
        mean = self.act(rgb, depth, proprio).astype(np.float64)
        if self.log_std is None:
            return mean.astype(np.float32), None
        std = np.exp(self.log_std)
        action = mean + std * rng.standard_normal(mean.shape)
        action32 = action.astype(np.float32)
        z = (action32.astype(np.float64) - mean) / std
        log_prob = float(np.sum(-0.5 * z**2 - self.log_std - 0.5 * math.log(2 * math.pi)))
        return action32, log_prob


__all__ = [
    "LINK_NAME",
    "MODEL_TOPIC",
    "ModelWatcher",
    "RoverClient",
    "RoverCodecError",
    "RoverModelError",
    "RoverPolicy",
    "default_model_endpoint",
]
