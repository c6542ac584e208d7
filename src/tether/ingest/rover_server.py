"""The rover training server: ZeroMQ PULL in, RGB-D PPO, checkpoints, models out on a PUB socket.

Threads and what they own:

- receiver: the PULL socket. Counts every message and hands it to the decode pool, keeping a
  bounded queue of futures in arrival order (when the queue is full it waits, so ZeroMQ's own
  high-water marks push back to the rover, whose client drops rather than block).
- decode pool (`workers` threads): validation, JPEG decoding and resizing. libjpeg-turbo,
  Pillow's resize and numpy's large copies release the GIL, so threads scale without copying
  frames between processes. The receiver hands over up to `decode_batch` messages that are
  already waiting as one task, so the pool's per-task cost is paid once per batch.
- trainer (the thread that calls `run()`): the only owner of the model. It takes decoded samples
  in arrival order, chains each rover's samples into transitions, fills in `value` (and `logp`
  for teleoperated samples, from the fitted behaviour policy), feeds PPO, updates, checkpoints,
  and exports the policy for the publisher.
- publisher: the XPUB socket. Sends each new model, and re-sends the latest one to every new
  subscriber, so a rover that (re)connects late still gets the current policy.

Transitions: a message carries (frame_t, action_t, reward_t, done_t); the next message from the
same rover (`rover_id`, "default" when absent) with episode_step + 1 supplies next_obs. A gap in
episode_step (lost messages, a rover restart) drops the sample whose successor is unknown. Each
rover's transitions go to PPO in contiguous segments of `segment_length`; the last transition of a
segment is marked truncated (PPO bootstraps it from V(next_obs), which is known), so several
rovers can share one rollout without their trajectories being mixed in GAE.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import platform
import queue
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import zmq

from tether.algos.base import Transitions
from tether.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, rng_state, set_rng_state
from tether.errors import TetherError
from tether.ingest.rover import MODEL_TOPIC
from tether.ingest.rover_codec import CodecLimits, RoverCodecError, decode_for_network
from tether.metrics import METRICS_UPDATE, TRAINING_STATUS, JsonlSink, MetricsBus, TensorBoardSink
from tether.nets_rgbd import RgbdActorCritic, export_rgbd_onnx, parameter_count, rgbd_observation_space

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "ppo_update_"
CHECKPOINT_KIND = "rover-ppo"
ACTION_SPACE = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


class RoverServerError(TetherError):
    """The rover server cannot start as configured; the message names the fix."""


# glibc mallopt parameters (malloc.h) and the values the server sets.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest on 64-bit: frames come from the heap
_TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024  # keep freed frames for reuse instead of unmapping them


def tune_allocator() -> bool:
    """Let glibc reuse freed frame buffers instead of returning them to the OS (process-wide).

    A decode worker allocates each frame's arrays (~0.7 MB at 424x240) and the trainer thread frees
    them later; glibc then trims the worker's arena and the next frames fault in fresh zeroed
    pages, about 60 page faults per frame, which made pooled decoding ~30% slower than decoding
    inline. With these settings the process keeps up to `_TRIM_THRESHOLD_BYTES` of free memory
    per arena. Returns False (and changes nothing) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1 and ok


@dataclass
class RoverServerConfig:
    """Everything `tether rover-server` takes. PPO defaults are the rover design's."""

    port: int = 5555  # 0: any free port (tests)
    bind: str = "127.0.0.1"
    pub_port: int | None = None  # None: port + 1; -1: no publisher
    image_size: tuple[int, int] = (424, 240)  # network input (w, h); frames of any size are resized
    max_depth: float = 10.0  # metres mapped to 1.0
    max_frame_side: int = 2048  # largest camera height/width accepted on the wire
    update_interval: int = 8192  # rollout capacity: samples per PPO update
    checkpoint_interval: int = 10  # updates between checkpoints
    checkpoint_dir: Path = Path("checkpoints")
    tensorboard_dir: Path | None = Path("runs")
    keep_checkpoints: int = 5
    publish_interval: int = 1  # updates between model exports to the PUB socket (0: never)
    learning_rate: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    epochs: int = 4
    minibatch_size: int = 256
    max_grad_norm: float = 0.5
    log_std_init: float = -0.5
    workers: int = 2
    decode_batch: int = 8  # messages already waiting that go to the pool as one task
    jpeg_fast_decode: bool = False  # libjpeg-turbo fast DCT/upsampling: 5-10% faster, not bit-exact
    tune_allocator: bool = True  # glibc keeps freed frame memory for reuse (see `tune_allocator`)
    queue_size: int = 512  # decoded or decoding messages held before the receiver waits
    rcvhwm: int = 1000
    segment_length: int = 64
    max_sources: int = 64
    idle_flush_s: float = 5.0
    device: str = "auto"
    amp: str = "auto"  # auto | off | bf16 | fp16
    bc_warm_start: bool = True
    behaviour_lr: float = 1e-3
    behaviour_steps: int = 2
    behaviour_min_std: float = 0.1
    torch_threads: int | None = None
    seed: int = 0
    resume: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checkpoint_dir"] = str(self.checkpoint_dir)
        data["tensorboard_dir"] = str(self.tensorboard_dir) if self.tensorboard_dir else None
        data["image_size"] = list(self.image_size)
        return data

    def validate(self) -> None:
        w, h = self.image_size
        checks = [
            (16 <= w <= 2048 and 16 <= h <= 2048, "--image-size must be between 16x16 and 2048x2048"),
            (self.update_interval >= 2, "--update-interval must be at least 2"),
            (self.checkpoint_interval >= 1, "--checkpoint-interval must be at least 1"),
            (self.workers >= 1, "--workers must be at least 1"),
            (1 <= self.decode_batch <= 256, "decode_batch must be within 1..256"),
            (self.minibatch_size >= 1, "--minibatch-size must be at least 1"),
            (self.segment_length >= 1, "segment_length must be at least 1"),
            (self.amp in ("auto", "off", "bf16", "fp16"), "--amp must be auto, off, bf16 or fp16"),
            (self.max_depth > 0, "--max-depth must be positive"),
            (0 <= self.port <= 65535, "--port must be within 0..65535"),
            (16 <= self.max_frame_side <= 8192, "max_frame_side must be within 16..8192"),
        ]
        for ok, message in checks:
            if not ok:
                raise RoverServerError(message + ".")


@dataclass
class _Decoded:
    obs: dict[str, np.ndarray]
    action: np.ndarray
    reward: float
    done: bool
    truncated: bool
    episode_step: int
    log_prob: float | None
    rover_id: str


@dataclass
class _Row:
    sample: _Decoded
    next_obs: dict[str, np.ndarray]
    terminated: bool
    truncated: bool


@dataclass
class _Chain:
    rows: list[_Row] = field(default_factory=list)
    pending: _Decoded | None = None
    episode_return: float = 0.0
    episode_intact: bool = True
    last_seen: float = 0.0


def _stack(rows: list[_Row]) -> dict[str, np.ndarray]:
    return {k: np.stack([r.sample.obs[k] for r in rows]) for k in rows[0].sample.obs}


def _to_device(obs: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in obs.items()}


class BehaviourModel:
    """The teleoperator's policy, fitted by maximum likelihood as its samples arrive.

    Samples without `log_prob` come from a behaviour policy we do not know (a person with a
    joystick). PPO's ratio π_θ(a|s)/μ(a|s) needs μ; this model estimates it. Each teleop segment is
    first used for `steps` gradient steps of negative log-likelihood, then scored, with the std
    floored at `min_std` so a near-deterministic operator cannot produce unbounded ratios."""

    def __init__(
        self, device: torch.device, lr: float, steps: int, min_std: float, log_std_init: float
    ) -> None:
        self.net = RgbdActorCritic(log_std_init=log_std_init).to(device)
        params = [p for name, p in self.net.named_parameters() if not name.startswith("value_head")]
        self.optimizer = torch.optim.Adam(params, lr=lr)
        self.steps = steps
        self.min_std = min_std
        self.samples = 0

    def fit_and_score(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> np.ndarray:
        self.net.train()
        for _ in range(self.steps):
            loss = -self.net.distribution(obs).log_prob(actions).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.samples += int(actions.shape[0])
        with torch.no_grad():
            mean = self.net(obs).float()
            std = self.net.log_std.exp().clamp(min=self.min_std).expand_as(mean)
            return torch.distributions.Normal(mean, std).log_prob(actions).sum(-1).cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "samples": self.samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.samples = int(state["samples"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RoverServerError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 where the hardware has it (GPUs since Ampere, CPUs with AVX512-BF16/AMX), fp16
    on older GPUs, off on other CPUs (emulated bf16 is slower than fp32 there)."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else None


def latest_valid_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest `ppo_update_N.pt` that loads; an unreadable one is logged and skipped."""
    manager = CheckpointManager(directory, prefix=CHECKPOINT_PREFIX)
    for path in reversed(manager.list()):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if state.get("kind") == CHECKPOINT_KIND:
            return path, state
        log.warning("skipping %s: not a rover checkpoint", path)
    return None


def load_rover_net(path: Path, device: str = "cpu") -> tuple[RgbdActorCritic, dict[str, Any]]:
    """The policy network of a rover checkpoint, and the checkpoint's metadata."""
    state = load_checkpoint(path, map_location=device)
    if state.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(
            f"checkpoint {path} is not a rover checkpoint (ppo_update_N.pt from tether rover-server)."
        )
    net = RgbdActorCritic()
    net.load_state_dict(state["learner"]["net"])
    return net.eval(), state


class RoverServer:
    """See the module docstring. `start()` runs everything in background threads (tests, the
    service); `run()` runs the trainer in the calling thread until `stop()` or Ctrl-C (the CLI)."""

    def __init__(self, config: RoverServerConfig, bus: MetricsBus | None = None) -> None:
        from tether.algos.ppo import PPO
        from tether.algos.ppo import Config as PPOConfig

        config.validate()
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.device = resolve_device(config.device)
        self.amp_dtype = resolve_amp(config.amp, self.device)
        self.limits = CodecLimits(max_height=config.max_frame_side, max_width=config.max_frame_side)
        self.observation_space = rgbd_observation_space(config.image_size)
        ppo_config = PPOConfig(
            learning_rate=config.learning_rate,
            num_epochs=config.epochs,
            batch_size=config.minibatch_size,
            rollout_steps=config.update_interval,
            discount_factor=config.gamma,
            lambda_gae=config.gae_lambda,
            clip_range=config.clip_range,
            ent_coef=config.ent_coef,
            vf_coef=config.vf_coef,
            max_grad_norm=config.max_grad_norm,
            normalize_obs=False,
            log_std_init=config.log_std_init,
        )
        torch.manual_seed(config.seed)
        self.net = RgbdActorCritic(log_std_init=config.log_std_init)
        self.learner = PPO(
            ppo_config, self.observation_space, ACTION_SPACE, self.device, config.seed, actor_critic=self.net
        )
        self.behaviour = BehaviourModel(
            self.device,
            config.behaviour_lr,
            config.behaviour_steps,
            config.behaviour_min_std,
            config.log_std_init,
        )
        log.info(
            "rover policy: RgbdActorCritic with %d parameters, input %dx%d, device %s, amp %s",
            parameter_count(self.net),
            *config.image_size,
            self.device,
            self.amp_dtype or "off",
        )
        self.checkpoints = CheckpointManager(
            config.checkpoint_dir, keep=config.keep_checkpoints, prefix=CHECKPOINT_PREFIX
        )

        self.bus = bus or MetricsBus()
        self._sinks: list[Any] = []
        if config.tensorboard_dir is not None:
            tb = TensorBoardSink(Path(config.tensorboard_dir))
            jsonl = JsonlSink(Path(config.tensorboard_dir) / "metrics.jsonl")
            self._sinks = [tb, jsonl]
            for sink in self._sinks:
                self.bus.add_sink(sink)

        # Counters (written by one thread each; read anywhere).
        self._lock = threading.Lock()
        self.received = 0
        self.decoded = 0
        self.observed = 0
        self.teleop_samples = 0
        self.rejected: dict[str, int] = defaultdict(int)
        self.dropped: dict[str, int] = defaultdict(int)
        self.episodes = 0
        self.published = 0
        self.resumed_from: Path | None = None
        self._episode_returns: list[float] = []
        self._chains: dict[str, _Chain] = {}
        self._bc_done = False
        self._last_saved_update = -1

        self._stop = threading.Event()
        self._updated = threading.Condition()
        # One entry per decode task (a batch), sized so that at most about `queue_size` messages wait.
        self._pending: queue.Queue[Future[list[_Decoded | RoverCodecError]]] = queue.Queue(
            maxsize=max(1, config.queue_size // config.decode_batch)
        )
        self._publish_q: queue.Queue[tuple[bytes, bytes]] = queue.Queue(maxsize=4)
        self._pool: ThreadPoolExecutor | None = None
        self._threads: list[threading.Thread] = []
        self._ctx = zmq.Context()
        self._pull: zmq.Socket[Any] | None = None
        self._pub: zmq.Socket[Any] | None = None
        self.endpoint = ""
        self.pub_endpoint = ""
        self._trainer_thread: threading.Thread | None = None
        self._error: BaseException | None = None

        if config.resume:
            self._resume()

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def updates(self) -> int:
        return int(self.learner.updates)

    def _bind(self) -> None:
        cfg = self.config
        if cfg.bind not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "listening on %s: the rover sockets have no authentication; use a trusted network", cfg.bind
            )
        pull = self._ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, cfg.rcvhwm)
        pull.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)  # libzmq drops bigger ones unread
        pull.setsockopt(zmq.LINGER, 0)
        try:
            pull.bind(f"tcp://{cfg.bind}:{cfg.port or '*'}")
        except zmq.ZMQError as exc:
            pull.close()
            raise RoverServerError(
                f"cannot listen on {cfg.bind}:{cfg.port} ({exc}); "
                "pick another --port or stop the other server."
            ) from None
        self._pull = pull
        self.endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
        if cfg.pub_port == -1:
            return
        pub = self._ctx.socket(zmq.XPUB)
        pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscription, to re-send the latest model
        pub.setsockopt(zmq.SNDHWM, 8)
        pub.setsockopt(zmq.LINGER, 0)
        pub_port = cfg.pub_port if cfg.pub_port is not None else (cfg.port + 1 if cfg.port else 0)
        try:
            pub.bind(f"tcp://{cfg.bind}:{pub_port or '*'}")
        except zmq.ZMQError as exc:
            pub.close()
            pull.close()
            raise RoverServerError(
                f"cannot publish models on {cfg.bind}:{pub_port} ({exc}); pass another --pub-port."
            ) from None
        self._pub = pub
        self.pub_endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)

    def _start_io(self) -> None:
        if self.config.tune_allocator and not tune_allocator():
            log.debug("allocator tuning skipped: not glibc")
        self._bind()
        self._pool = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="rover-decode")
        self._threads = [threading.Thread(target=self._receive_loop, name="rover-receive", daemon=True)]
        if self._pub is not None:
            self._threads.append(
                threading.Thread(target=self._publish_loop, name="rover-publish", daemon=True)
            )
        for t in self._threads:
            t.start()
        log.info("rover server listening on %s, models on %s", self.endpoint, self.pub_endpoint or "(off)")
        self.bus.emit(
            TRAINING_STATUS, {"status": "started", "endpoint": self.endpoint, "updates": self.updates}
        )
        self._queue_publish()  # rovers get the current policy (fresh or resumed) straight away

    def start(self) -> None:
        """Run receiver, decoders, publisher and trainer in background threads."""
        self._start_io()
        self._trainer_thread = threading.Thread(
            target=self._train_loop_guarded, name="rover-trainer", daemon=True
        )
        self._trainer_thread.start()

    def run(self) -> None:
        """Run until `stop()`, SIGINT or SIGTERM; then shut down cleanly. The first signal lets a
        running update finish and saves a checkpoint; a second one aborts at once."""
        previous = self._install_signal_handlers()
        try:
            self._start_io()
            self._train_loop()
        except KeyboardInterrupt:
            log.warning("aborted; the last checkpoint written is kept")
            self._last_saved_update = self.updates  # a half-done update must not be saved
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._shutdown()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, _frame: Any) -> None:
            if self._stop.is_set():
                raise KeyboardInterrupt
            log.info("%s: finishing the current step, saving and stopping", signal.Signals(signum).name)
            self._stop.set()

        previous: dict[int, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _train_loop_guarded(self) -> None:
        try:
            self._train_loop()
        except BaseException as exc:  # surfaced by stop()/wait_for_updates()
            self._error = exc
            log.exception("rover trainer failed")
            self._stop.set()
        finally:
            self._shutdown()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop all threads; a checkpoint of any unsaved update is written first."""
        self._stop.set()
        if self._trainer_thread is not None:
            self._trainer_thread.join(timeout)
            self._trainer_thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("rover trainer failed") from error

    def _shutdown(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10.0)
        self._threads = []
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self.updates > self._last_saved_update and self.updates > 0:
            self.save_checkpoint()
        for sock in (self._pull, self._pub):
            if sock is not None:
                sock.close(linger=0)
        self._pull = self._pub = None
        self._ctx.term()
        self.bus.emit(TRAINING_STATUS, {"status": "stopped", "updates": self.updates})
        for sink in self._sinks:
            self.bus.remove_sink(sink)
            with contextlib.suppress(Exception):
                sink.close()
        self._sinks = []

    def wait_for_updates(self, n: int, timeout: float) -> bool:
        """Block until `n` PPO updates have run (True) or `timeout` passes / the trainer failed."""
        deadline = time.monotonic() + timeout
        with self._updated:
            while self.updates < n and not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._updated.wait(min(remaining, 0.5))
        return self.updates >= n

    def stats(self) -> dict[str, Any]:
        """Status counters: received, decoded, rejected by reason, dropped by reason, ..."""
        with self._lock:
            return {
                "received": self.received,
                "decoded": self.decoded,
                "rejected": dict(self.rejected),
                "dropped": dict(self.dropped),
                "observed": self.observed,
                "teleop_samples": self.teleop_samples,
                "queued": self._pending.qsize(),
                "updates": self.updates,
                "episodes": self.episodes,
                "published": self.published,
                "sources": len(self._chains),
            }

    # --- receiving and decoding -------------------------------------------------------------
    def _accept(self, sock: zmq.Socket[Any], frame: zmq.Frame) -> bool:
        """Count a received frame; False (and rejected) when it starts a multi-frame message."""
        with self._lock:
            self.received += 1
        if frame.more:  # the wire format is one frame per sample
            while sock.getsockopt(zmq.RCVMORE):
                sock.recv(copy=False)
            self._count_reject("multipart", "a multi-frame message")
            return False
        return True

    def _receive_loop(self) -> None:
        assert self._pull is not None and self._pool is not None
        sock, pool = self._pull, self._pool
        batch_max = self.config.decode_batch
        while not self._stop.is_set():
            try:
                if not sock.poll(100, zmq.POLLIN):
                    continue
                frame = sock.recv(copy=False)
                batch = [frame] if self._accept(sock, frame) else []
                # Take what is already queued, never waiting for more: batching adds no latency.
                while len(batch) < batch_max:
                    try:
                        frame = sock.recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if self._accept(sock, frame):
                        batch.append(frame)
            except zmq.ZMQError:
                if self._stop.is_set():
                    break
                raise
            if not batch:
                continue
            future = pool.submit(self._decode_batch, batch)
            while not self._stop.is_set():
                try:
                    self._pending.put(future, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def _decode_batch(self, frames: list[zmq.Frame]) -> list[_Decoded | RoverCodecError]:
        return [self._decode(frame) for frame in frames]

    def _decode(self, frame: zmq.Frame) -> _Decoded | RoverCodecError:
        cfg = self.config
        try:
            sample, rgb, depth = decode_for_network(
                frame.buffer, cfg.image_size, cfg.max_depth, self.limits, jpeg_fast=cfg.jpeg_fast_decode
            )
        except RoverCodecError as exc:
            return exc
        except Exception as exc:  # a decoder bug must not take the server down
            log.exception("unexpected error decoding a rover message")
            return RoverCodecError("internal", exc.__class__.__name__)
        return _Decoded(
            obs={"rgb": rgb, "depth": depth, "proprio": sample.proprio},
            action=sample.action,
            reward=sample.reward,
            done=sample.done,
            truncated=sample.truncated,
            episode_step=sample.episode_step,
            log_prob=sample.log_prob,
            rover_id=sample.rover_id,
        )

    def _count_reject(self, reason: str, detail: str) -> None:
        with self._lock:
            self.rejected[reason] += 1
            n = self.rejected[reason]
        if n <= 5 or n % 1000 == 0:
            log.warning("rejected rover message (%s, %d so far): %s", reason, n, detail)

    def _count_drop(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.dropped[reason] += n

    # --- the trainer thread -----------------------------------------------------------------
    def _train_loop(self) -> None:
        last_status = last_flush = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_flush > 1.0:  # rovers that went quiet while others keep streaming
                last_flush = now
                self._flush_idle()
            if now - last_status > 10.0:
                last_status = now
                log.info("rover server: %s", self.stats())
            try:
                future = self._pending.get(timeout=0.1)
            except queue.Empty:
                self._flush_idle()
                continue
            for result in future.result():
                if isinstance(result, RoverCodecError):
                    self._count_reject(result.reason, result.detail)
                    continue
                with self._lock:
                    self.decoded += 1
                for segment in self._chain(result):
                    self._observe_segment(segment)

    def _chain(self, d: _Decoded) -> list[list[_Row]]:
        """Pair each sample with its successor; return the segments ready for PPO."""
        chain = self._chains.get(d.rover_id)
        if chain is None:
            if len(self._chains) >= self.config.max_sources:
                self._count_drop("too_many_sources")
                return []
            chain = self._chains[d.rover_id] = _Chain()
        chain.last_seen = time.monotonic()
        out: list[list[_Row]] = []
        if d.episode_step == 0:  # a new episode: its return starts here, whatever came before
            chain.episode_return, chain.episode_intact = 0.0, True
        p = chain.pending
        if p is not None:
            chain.pending = None
            if d.episode_step == p.episode_step + 1:
                chain.rows.append(_Row(p, d.obs, terminated=False, truncated=False))
            else:
                # The successor of `p` never came: drop `p`; the rows before it end here (their
                # next_obs are known), and this episode's return is no longer complete.
                self._count_drop("gap")
                chain.episode_intact = False
                if chain.rows:
                    out.append(chain.rows)
                    chain.rows = []
        if d.done:
            chain.rows.append(_Row(d, d.obs, terminated=not d.truncated, truncated=d.truncated))
            out.append(chain.rows)
            chain.rows = []
            if chain.episode_intact:
                self._episode_returns.append(chain.episode_return + d.reward)
                with self._lock:
                    self.episodes += 1
            chain.episode_return, chain.episode_intact = 0.0, True
        else:
            chain.episode_return += d.reward
            chain.pending = d
            if len(chain.rows) >= self.config.segment_length:
                out.append(chain.rows)
                chain.rows = []
        return out

    def _flush_idle(self) -> None:
        now = time.monotonic()
        for chain in self._chains.values():
            if chain.rows and now - chain.last_seen > self.config.idle_flush_s:
                rows, chain.rows = chain.rows, []
                self._observe_segment(rows)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _observe_segment(self, rows: list[_Row]) -> None:
        """Feed one contiguous segment to PPO with `value` (and, for teleop rows, `logp`)."""
        obs = _stack(rows)
        actions = np.stack([r.sample.action for r in rows]).astype(np.float32)
        logp = np.array(
            [r.sample.log_prob if r.sample.log_prob is not None else np.nan for r in rows], np.float32
        )
        teleop = np.isnan(logp)
        if teleop.any():
            idx = np.flatnonzero(teleop)
            obs_t = _to_device({k: v[idx] for k, v in obs.items()}, self.device)
            with self._autocast():
                logp[idx] = self.behaviour.fit_and_score(
                    obs_t, torch.as_tensor(actions[idx], device=self.device)
                )
            with self._lock:
                self.teleop_samples += len(idx)
        start = 0
        while start < len(rows):
            # Values from the current network; recomputed after an update inside the segment.
            with torch.no_grad(), self._autocast():
                values = self.net.value(_to_device({k: v[start:] for k, v in obs.items()}, self.device))
            values_np = values.float().cpu().numpy()
            for j in range(start, len(rows)):
                row = rows[j]
                last = j == len(rows) - 1
                truncated = row.truncated or (last and not row.terminated)
                self.learner.observe(
                    Transitions(
                        obs={k: v[j : j + 1] for k, v in obs.items()},
                        action=actions[j : j + 1],
                        reward=np.array([row.sample.reward], np.float32),
                        next_obs={k: v[None] for k, v in row.next_obs.items()},
                        terminated=np.array([row.terminated]),
                        truncated=np.array([truncated]),
                        extras={"logp": logp[j : j + 1], "value": values_np[j - start : j - start + 1]},
                    )
                )
                with self._lock:
                    self.observed += 1
                start = j + 1
                if self.learner.ready():
                    self._update()
                    break

    def _update(self) -> None:
        cfg = self.config
        if cfg.bc_warm_start and not self._bc_done and self.updates == 0 and self.behaviour.samples > 0:
            self._warm_start_from_behaviour()
        t0 = time.perf_counter()
        with self._autocast():
            metrics = self.learner.update()
        update_s = time.perf_counter() - t0
        self._bc_done = True
        returns, self._episode_returns = self._episode_returns, []
        stats = self.stats()
        row: dict[str, Any] = {
            "step": self.observed,
            "update": self.updates,
            "episodes": self.episodes,
            "train/policy_loss": metrics.get("policy_loss"),
            "train/value_loss": metrics.get("value_loss"),
            "train/entropy": metrics.get("entropy"),
            "train/approx_kl": metrics.get("approx_kl"),
            "train/clip_fraction": metrics.get("clip_fraction"),
            "train/explained_variance": metrics.get("explained_variance"),
            "train/action_std": metrics.get("action_std"),
            "perf/update_s": update_s,
            "ingest/received": stats["received"],
            "ingest/decoded": stats["decoded"],
            "ingest/rejected": sum(stats["rejected"].values()),
            "ingest/dropped": sum(stats["dropped"].values()),
            "ingest/teleop_samples": stats["teleop_samples"],
            "episode_rewards": returns,
        }
        if returns:
            row["train/episode_reward"] = float(np.mean(returns))
        self.bus.emit(METRICS_UPDATE, row)
        log.info(
            "update %d: %.1fs, policy_loss %.4f, value_loss %.4f, entropy %.3f, episodes %d%s",
            self.updates,
            update_s,
            metrics.get("policy_loss", math.nan),
            metrics.get("value_loss", math.nan),
            metrics.get("entropy", math.nan),
            len(returns),
            f", mean return {np.mean(returns):.2f}" if returns else "",
        )
        if self.updates % cfg.checkpoint_interval == 0:
            self.save_checkpoint()
        if cfg.publish_interval and self.updates % cfg.publish_interval == 0:
            self._queue_publish()
        with self._updated:
            self._updated.notify_all()

    def _warm_start_from_behaviour(self) -> None:
        """Behaviour-cloning warm start: before the first update, the policy (encoder, policy head,
        log-std) becomes the fitted teleop policy, so PPO starts from the operator's driving and
        the ratios on teleop data start near 1. The value head keeps its own initialisation."""
        source = self.behaviour.net.state_dict()
        target = self.net.state_dict()
        for name, tensor in source.items():
            if not name.startswith("value_head"):
                target[name] = tensor.clone()
        floor = math.log(self.config.behaviour_min_std)
        target["log_std"] = target["log_std"].clamp(min=floor)
        self.net.load_state_dict(target)
        log.info(
            "policy warm-started from the behaviour model fitted on %d teleop samples", self.behaviour.samples
        )

    # --- checkpoints ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "format": "tether-checkpoint",
            "version": 1,
            "kind": CHECKPOINT_KIND,
            "algorithm": "ppo",
            "config": cfg.to_dict(),
            "spaces": {
                "observation": {
                    "type": "Dict",
                    "rgb": [3, cfg.image_size[1], cfg.image_size[0]],
                    "depth": [1, cfg.image_size[1], cfg.image_size[0]],
                    "proprio": [6],
                },
                "action": {"type": "Box", "low": [-1.0, -1.0], "high": [1.0, 1.0], "shape": [2]},
            },
            "rover": {"image_size": list(cfg.image_size), "max_depth": cfg.max_depth},
            "learner": self.learner.state_dict(),
            "behaviour": self.behaviour.state_dict(),
            "trainer": {
                "updates": self.updates,
                "observed": self.observed,
                "episodes": self.episodes,
                "teleop_samples": self.teleop_samples,
                "bc_done": self._bc_done,
                "saved_at": time.time(),
            },
            "rng": rng_state(),
        }

    def save_checkpoint(self) -> Path:
        """Write `ppo_update_<updates>.pt` atomically (the trainer thread, or after it stopped)."""
        path = self.checkpoints.save(self.updates, self.checkpoint_state())
        self._last_saved_update = self.updates
        log.info("checkpoint %s", path)
        return path

    def _resume(self) -> None:
        found = latest_valid_checkpoint(self.config.checkpoint_dir)
        if found is None:
            return
        path, state = found
        saved = tuple(state.get("rover", {}).get("image_size", ()))
        if saved != tuple(self.config.image_size):
            raise RoverServerError(
                f"{path} was trained at image size {saved[0]}x{saved[1]}; pass --image-size "
                f"{saved[0]}x{saved[1]} or use a fresh --checkpoint-dir."
            )
        self.learner.load_state_dict(state["learner"])
        self.behaviour.load_state_dict(state["behaviour"])
        counters = state["trainer"]
        self.observed = int(counters["observed"])
        self.episodes = int(counters["episodes"])
        self.teleop_samples = int(counters["teleop_samples"])
        self._bc_done = bool(counters["bc_done"])
        self._last_saved_update = self.updates
        set_rng_state(state["rng"])
        self.resumed_from = path
        log.info("resumed from %s (update %d)", path, self.updates)

    # --- publishing -------------------------------------------------------------------------
    def model_metadata(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "update": self.updates,
            "format": "onnx",
            "image_size": list(cfg.image_size),
            "max_depth": cfg.max_depth,
            "log_std": [float(x) for x in self.net.log_std.detach().cpu()],
            "inputs": {
                "rgb": "uint8 (B,3,H,W)",
                "depth": "float32 (B,1,H,W) in [0,1]",
                "proprio": "float32 (B,6)",
            },
            "output": "action float32 (B,2) in [-1,1]: linear_cmd, angular_cmd",
        }

    def _queue_publish(self) -> None:
        if self._pub is None:
            return
        meta = self.model_metadata()
        blob = export_rgbd_onnx(self.net, self.config.image_size, meta)
        meta.update(size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), created=time.time())
        item = (json.dumps(meta).encode(), blob)
        while True:  # keep only the newest models if the publisher lags
            try:
                self._publish_q.put_nowait(item)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._publish_q.get_nowait()

    def _publish_loop(self) -> None:
        assert self._pub is not None
        sock = self._pub
        latest: tuple[bytes, bytes] | None = None
        while not self._stop.is_set():
            try:
                item = self._publish_q.get_nowait()
            except queue.Empty:
                item = None
            if item is not None:
                latest = item
                self._send_model(sock, latest)
            if sock.poll(50, zmq.POLLIN):
                event = sock.recv()
                # A subscription is b"\x01" + prefix; answer subscribers of `model` with the latest.
                if event[:1] == b"\x01" and MODEL_TOPIC.startswith(event[1:]) and latest is not None:
                    self._send_model(sock, latest)

    def _send_model(self, sock: zmq.Socket[Any], item: tuple[bytes, bytes]) -> None:
        try:
            sock.send_multipart([MODEL_TOPIC, item[0], item[1]], flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        with self._lock:
            self.published += 1


@contextlib.contextmanager
def running_server(config: RoverServerConfig, bus: MetricsBus | None = None) -> Iterator[RoverServer]:
    """A started server that is stopped (and checkpointed) on exit."""
    server = RoverServer(config, bus)
    server.start()
    try:
        yield server
    finally:
        server.stop()


__all__ = [
    "BehaviourModel",
    "RoverServer",
    "RoverServerConfig",
    "RoverServerError",
    "latest_valid_checkpoint",
    "load_rover_net",
    "running_server",
    "tune_allocator",
]
