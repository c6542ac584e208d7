"""The job loop: collect → observe → update → log → checkpoint.

The trainer thread is the only owner of the learner and the env. Other threads (the service, a
signal handler) talk to it through `request_stop`, `request_save` and `update_config`, which
are picked up between steps.
"""

from __future__ import annotations

import inspect
import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tether import __version__
from tether.algos import Learner, Transitions, algorithm_module
from tether.checkpoint import (
    CheckpointManager,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tether.config import ConfigError, JobConfig, build_config, dump_config
from tether.envs import final_observations, make_vector_env
from tether.evaluate import evaluate
from tether.metrics import (
    CONFIG_UPDATED,
    METRICS_UPDATE,
    TRAINING_STATUS,
    JsonlSink,
    MetricsBus,
    TensorBoardSink,
)
from tether.spaces import space_to_dict

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "tether-checkpoint"
CHECKPOINT_VERSION = 1
MAX_EPISODES_PER_ROW = 500
# First episode seed of the evaluations during training; `evaluate` and `tether eval` start at 10,000.
EVAL_DURING_TRAINING_SEED = 20_000


@dataclass
class TrainResult:
    run_dir: Path
    status: str
    steps: int
    updates: int
    episodes: int
    checkpoint: Path | None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # The env step at which an evaluation during training reached `schedule.stop_at_return`.
    reached_target_at: int | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    return torch.device(name)


def configure_threads(config: JobConfig) -> None:
    # Small MLPs lose to thread overhead; two threads is the sweet spot measured on small machines.
    threads = config.torch_threads or min(2, os.cpu_count() or 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def build_learner(
    config: JobConfig, observation_space: Any, action_space: Any, device: torch.device
) -> Learner:
    """Build the configured learner, passing the optional keywords its `build` accepts."""
    module = algorithm_module(config.algorithm)
    optional = {"num_envs": config.environment.num_envs, "total_steps": config.schedule.total_steps}
    params = inspect.signature(module.build).parameters
    kwargs = {k: v for k, v in optional.items() if k in params}
    learner: Learner = module.build(
        config.training, observation_space, action_space, device, config.seed, **kwargs
    )
    return learner


class EpisodeTracker:
    """Per-env returns and lengths; finished episodes feed the metrics rows."""

    def __init__(self, num_envs: int) -> None:
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.recent_returns: deque[float] = deque(maxlen=100)
        self.recent_success: deque[float] = deque(maxlen=100)
        self.pending_returns: list[float] = []
        self.pending_lengths: list[int] = []
        self.episodes = 0

    def step(self, rewards: np.ndarray, done: np.ndarray, info: dict[str, Any]) -> None:
        self.returns += rewards
        self.lengths += 1
        if not done.any():
            return
        success = info.get("success")
        for i in np.flatnonzero(done):
            ret = float(self.returns[i])
            self.recent_returns.append(ret)
            self.pending_returns.append(ret)
            self.pending_lengths.append(int(self.lengths[i]))
            if success is not None:
                self.recent_success.append(float(bool(success[i])))
            self.returns[i] = 0.0
            self.lengths[i] = 0
            self.episodes += 1

    def take_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"episodes": self.episodes}
        if self.pending_returns:
            row["train/episode_reward"] = float(np.mean(self.pending_returns))
            row["train/episode_length"] = float(np.mean(self.pending_lengths))
        if self.recent_returns:
            row["train/episode_reward_ma100"] = float(np.mean(self.recent_returns))
        if self.recent_success:
            row["train/success_rate"] = float(np.mean(self.recent_success))
        row["episode_rewards"] = self.pending_returns[-MAX_EPISODES_PER_ROW:]
        self.pending_returns, self.pending_lengths = [], []
        return row

    def state(self) -> dict[str, Any]:
        return {
            "episodes": self.episodes,
            "recent_returns": list(self.recent_returns),
            "recent_success": list(self.recent_success),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.episodes = int(state["episodes"])
        self.recent_returns.extend(float(x) for x in state["recent_returns"])
        self.recent_success.extend(float(x) for x in state["recent_success"])


class Trainer:
    """Runs one job in the calling thread; controllable from other threads."""

    def __init__(self, config: JobConfig, run_dir: Path, bus: MetricsBus | None = None, resume: bool = False):
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_id = self.run_dir.name
        self.bus = bus or MetricsBus()
        self.resume = resume
        self.status = "created"
        self.steps = 0
        self.updates = 0
        self._stop = threading.Event()
        self._saves: queue.Queue[Future[Path]] = queue.Queue()
        self._changes: queue.Queue[dict[str, Any]] = queue.Queue()
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", keep=config.schedule.keep_checkpoints
        )
        self.learner: Learner | None = None
        self.tracker: EpisodeTracker | None = None
        self.reached_target_at: int | None = None
        self._spaces: dict[str, Any] = {}

    # --- control, from any thread ---------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def request_save(self, timeout: float = 30.0) -> Path:
        """Ask the trainer thread for a checkpoint now; returns its path once written."""
        if self.status != "running":
            raise ConfigError(f"the job is {self.status}, not running; start it before saving.")
        future: Future[Path] = Future()
        self._saves.put(future)
        return future.result(timeout=timeout)

    def update_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Validate live changes (`training.<key>` in the algorithm's LIVE_KEYS) and queue them."""
        live: frozenset[str] = getattr(type(self.config.training), "LIVE_KEYS", frozenset())
        allowed = ", ".join(f"training.{k}" for k in sorted(live)) or "none"
        if not isinstance(changes, dict) or not changes:
            raise ConfigError(f"send a JSON object of keys to change; live keys are: {allowed}.")
        updates: dict[str, Any] = {}
        for key, value in changes.items():
            section, _, name = str(key).partition(".")
            if section != "training" or name not in live:
                raise ConfigError(f"'{key}' cannot be changed while training; live keys are: {allowed}.")
            updates[name] = value
        data = self.config.to_dict()
        data["training"].update(updates)
        validated = build_config(data).training
        applied = {f"training.{k}": getattr(validated, k) for k in updates}
        self._changes.put({k: getattr(validated, k) for k in updates})
        return applied

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        sinks: list[JsonlSink | TensorBoardSink] = [
            JsonlSink(self.run_dir / "metrics.jsonl"),
            TensorBoardSink(self.run_dir / "tb"),
        ]
        for sink in sinks:
            self.bus.add_sink(sink)
        env = None
        checkpoint: Path | None = None
        last: dict[str, Any] = {}
        try:
            configure_threads(cfg)
            device = resolve_device(cfg.device)
            np.random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
            env = make_vector_env(cfg.environment, cfg.rewards)
            obs_space, act_space = env.single_observation_space, env.single_action_space
            self._spaces = {"observation": space_to_dict(obs_space), "action": space_to_dict(act_space)}
            self.learner = build_learner(cfg, obs_space, act_space, device)
            self.tracker = EpisodeTracker(env.num_envs)
            if self.resume:
                self._restore()
            self.status = "running"
            self._emit_status("started")
            last = self._loop(env)
            checkpoint = self.save(final=True)
            self._answer_pending_saves(checkpoint)
            status = "stopped" if self._stop.is_set() else "finished"
            self.status = status
            extra = {} if self.reached_target_at is None else {"reached_target_at": self.reached_target_at}
            self._emit_status(status, checkpoint=str(checkpoint), **extra)
            return TrainResult(
                self.run_dir,
                status,
                self.steps,
                self.updates,
                self.tracker.episodes,
                checkpoint,
                last,
                reached_target_at=self.reached_target_at,
            )
        except Exception as exc:
            self.status = "error"
            self._emit_status("error", error=str(exc))
            self._fail_pending_saves(exc)
            raise
        finally:
            if env is not None:
                env.close()
            for sink in sinks:
                self.bus.remove_sink(sink)
                sink.close()

    def _loop(self, env: Any) -> dict[str, Any]:
        cfg = self.config
        learner, tracker = self.learner, self.tracker
        assert learner is not None and tracker is not None
        obs, _ = env.reset(seed=cfg.seed + 7919 * self.updates)
        total = cfg.schedule.total_steps
        t_env = t_act = t_learn = 0.0
        row_start, row_steps = time.perf_counter(), self.steps
        last: dict[str, Any] = {}
        learn_metrics: dict[str, float] = {}
        every = cfg.schedule.eval_every
        next_eval = (self.steps // every + 1) * every if every else 0
        while self.steps < total and not self._stop.is_set() and self.reached_target_at is None:
            self._service_requests()
            t0 = time.perf_counter()
            out = learner.act(obs)
            t1 = time.perf_counter()
            next_obs, reward, terminated, truncated, info = env.step(out.action)
            t2 = time.perf_counter()
            done = np.logical_or(terminated, truncated)
            learner.observe(
                Transitions(
                    obs,
                    out.action,
                    reward,
                    final_observations(next_obs, info),
                    terminated,
                    truncated,
                    out.extras,
                )
            )
            tracker.step(reward, done, info)
            obs = next_obs
            self.steps += env.num_envs
            t3 = time.perf_counter()
            t_env += t2 - t1
            t_act += (t1 - t0) + (t3 - t2)
            if learner.ready():
                learn_metrics = learner.update()
                self.updates += 1
                t_learn += time.perf_counter() - t3
                evaluation: dict[str, float] = {}
                if every and self.steps >= next_eval:
                    t_eval = time.perf_counter()
                    evaluation = self._evaluate_during_training()
                    next_eval = (self.steps // every + 1) * every
                    row_start += time.perf_counter() - t_eval  # the row's steps/s leaves it out
                if self.updates % cfg.schedule.log_every == 0 or evaluation:
                    now = time.perf_counter()
                    elapsed = max(now - row_start, 1e-9)
                    last = self._row(learn_metrics, (self.steps - row_steps) / elapsed, t_env, t_act, t_learn)
                    last.update(evaluation)
                    self.bus.emit(METRICS_UPDATE, last)
                    t_env = t_act = t_learn = 0.0
                    row_start, row_steps = now, self.steps
                if self.updates % cfg.schedule.checkpoint_every == 0:
                    self.save()
        return last

    def _evaluate_during_training(self) -> dict[str, float]:
        """Greedy evaluation of the current policy as the metrics row's `eval/` keys; marks the
        target reached when `schedule.stop_at_return` is met. Its episodes are seeded apart from
        the final evaluation's, so reaching the target is not judged on the episodes that report
        the final score."""
        assert self.learner is not None
        schedule = self.config.schedule
        result = evaluate(
            self.learner, self.config, schedule.eval_every_episodes, seed=EVAL_DURING_TRAINING_SEED
        )
        if schedule.stop_at_return is not None and result.mean_return >= schedule.stop_at_return:
            self.reached_target_at = self.steps
            log.info(
                "mean return %.2f over %d episodes reached schedule.stop_at_return=%g at step %d; stopping",
                result.mean_return,
                result.episodes,
                schedule.stop_at_return,
                self.steps,
            )
        scores = result.to_dict()
        del scores["episodes"]  # a setting, not a score
        return {f"eval/{key}": value for key, value in scores.items() if value is not None}

    def _row(
        self, learn: dict[str, float], sps: float, t_env: float, t_act: float, t_learn: float
    ) -> dict[str, Any]:
        assert self.tracker is not None
        row: dict[str, Any] = {"step": self.steps, "update": self.updates}
        row.update(self.tracker.take_row())
        for key, value in learn.items():
            row[f"train/{key}"] = value
        row.update({"perf/sps": sps, "perf/env_s": t_env, "perf/act_s": t_act, "perf/learn_s": t_learn})
        return row

    def _service_requests(self) -> None:
        while not self._changes.empty():
            changes = self._changes.get_nowait()
            training = self.config.training.model_copy(update=changes)
            self.config.training = training
            self.learner.config = training  # type: ignore[union-attr]
            # Keep config.yaml current so `--resume` continues with the live changes.
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
            self.bus.emit(CONFIG_UPDATED, {f"training.{k}": v for k, v in changes.items()})
        while not self._saves.empty():
            future = self._saves.get_nowait()
            try:
                future.set_result(self.save())
            except Exception as exc:
                future.set_exception(exc)

    def _answer_pending_saves(self, path: Path) -> None:
        # A save asked for as the loop ended is answered by the final checkpoint.
        while not self._saves.empty():
            self._saves.get_nowait().set_result(path)

    def _fail_pending_saves(self, exc: BaseException) -> None:
        while not self._saves.empty():
            self._saves.get_nowait().set_exception(exc)

    def _emit_status(self, status: str, **extra: Any) -> None:
        data = {"status": status, "run_id": self.run_id, "run_dir": str(self.run_dir), "step": self.steps}
        data.update(extra)
        self.bus.emit(TRAINING_STATUS, data)

    # --- checkpoints ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        assert self.learner is not None and self.tracker is not None
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "tether_version": __version__,
            "algorithm": self.config.algorithm,
            "config": self.config.to_dict(),
            "spaces": self._spaces,
            "learner": self.learner.state_dict(),
            "trainer": {"steps": self.steps, "updates": self.updates, "episodes": self.tracker.state()},
            "metrics": {k: v for k, v in self.bus.latest.items() if isinstance(v, (int, float))},
            "rng": rng_state(),
        }

    def save(self, final: bool = False) -> Path:
        state = self.checkpoint_state()
        if final:
            return save_checkpoint(self.run_dir / "final.pt", state)
        return self.checkpoints.save(self.updates, state)

    def _restore(self) -> None:
        assert self.learner is not None and self.tracker is not None
        path = self.checkpoints.latest()
        final = self.run_dir / "final.pt"
        if final.exists() and (path is None or final.stat().st_mtime >= path.stat().st_mtime):
            path = final
        if path is None:
            raise ConfigError(
                f"--resume found no checkpoint in {self.run_dir}; train without --resume first."
            )
        state = load_checkpoint(path)
        if state.get("algorithm") != self.config.algorithm:
            raise ConfigError(
                f"checkpoint {path} was written by {state.get('algorithm')}, not {self.config.algorithm}."
            )
        self.learner.load_state_dict(state["learner"])
        trainer = state["trainer"]
        self.steps, self.updates = int(trainer["steps"]), int(trainer["updates"])
        self.tracker.load(trainer["episodes"])
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (update %d)", path, self.steps, self.updates)
