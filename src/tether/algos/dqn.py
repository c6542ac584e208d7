"""Deep Q-Network with the usual improvements, each a switch: Double DQN, a dueling head, n-step
returns, prioritized replay, hard or Polyak target updates, Huber loss and gradient clipping.

The learner never owns an env: `observe()` takes batches from anywhere (a vector env, MQTT
devices, the store) into the replay buffer, and `ready()` tells the caller when the configured
replay ratio calls for `update()` — `gradient_steps` steps per `train_freq` transitions observed
after `learning_starts`.

The update, for a sampled batch (s, a, G, s', terminated, discount = γ^k):

    a*     = argmax_a Q_online(s', a)          (Double DQN; plain DQN uses Q_target)
    y      = G + discount · (1 − terminated) · Q_target(s', a*)
    δ      = Q_online(s, a) − y
    loss   = mean(w · huber(δ))                (w: importance weights, 1 without prioritization)
    then clip gradients, Adam step, new priorities |δ|, and every `target_update_interval`
    gradient steps θ' ← τ·θ + (1 − τ)·θ' (τ = 1: a hard copy).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tether.algos.base import ActOut, Transitions
from tether.algos.offpolicy import ReplayLearner, linear_schedule
from tether.algos.optim import adam, adam_step, clip_grad_norm, flush_denormals
from tether.algos.passes import MlpPasses, Precision, Tape, matmul_dtype
from tether.buffers.replay import TensorSample
from tether.checkpoint import generator_state, set_generator_state
from tether.config import ConfigError
from tether.nets import ACTIVATIONS, mlp

TARGET_CHUNK_ROWS = 4096  # rows per target-network pass over a block (see DQN._distinct_rows)


class Config(BaseModel):
    """The `training` section for DQN. Step counts are in transitions observed unless noted."""

    model_config = ConfigDict(extra="forbid")
    LIVE_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "learning_rate",
            "epsilon_start",
            "epsilon_end",
            "epsilon_decay_steps",
            "train_freq",
            "gradient_steps",
            "target_update_interval",
            "tau",
            "max_grad_norm",
        }
    )

    algorithm: Literal["dqn"] = "dqn"
    learning_rate: float = Field(1e-4, gt=0.0)
    buffer_size: int = Field(100_000, ge=1, description="replay capacity in transitions")
    learning_starts: int = Field(1_000, ge=0, description="transitions collected before the first update")
    batch_size: int = Field(64, ge=1)
    discount_factor: float = Field(0.99, ge=0.0, le=1.0)
    train_freq: int = Field(4, ge=1, description="transitions observed per round of gradient steps")
    gradient_steps: int = Field(1, ge=1, description="gradient steps per round")
    target_update_interval: int = Field(1_000, ge=1, description="gradient steps between target updates")
    tau: float = Field(1.0, gt=0.0, le=1.0, description="Polyak factor of a target update (1 = hard copy)")
    epsilon_start: float = Field(1.0, ge=0.0, le=1.0)
    epsilon_end: float = Field(0.05, ge=0.0, le=1.0)
    epsilon_decay_steps: int = Field(10_000, ge=0, description="transitions over which ε falls linearly")
    double_q: bool = True
    dueling: bool = False
    n_step: int = Field(1, ge=1, le=100)
    prioritized: bool = False
    per_alpha: float = Field(0.6, ge=0.0)
    per_beta_start: float = Field(0.4, ge=0.0, le=1.0)
    per_beta_steps: int | None = Field(
        None, ge=1, description="transitions to anneal β to 1 (default: total_steps)"
    )
    per_eps: float = Field(1e-6, gt=0.0)
    loss: Literal["huber", "mse"] = "huber"
    anneal_lr: bool = Field(False, description="decay the learning rate linearly to 0 over total_steps")
    max_grad_norm: float | None = Field(10.0, gt=0.0)
    net_arch: list[int] = Field(default_factory=lambda: [64, 64])
    activation: str = "relu"
    precision: Precision = Field(
        "float32",
        description="dtype of the hidden-to-hidden matrix products: float32, bfloat16, or auto "
        "(bfloat16 on CPUs that multiply it natively, float32 elsewhere)",
    )
    save_replay: bool = Field(True, description="include the replay buffer in checkpoints")


class ObsEncoder(nn.Module):
    """Raw observations → float features: Box flattened, Discrete one-hot."""

    def __init__(self, space: gym.Space) -> None:
        super().__init__()
        self.discrete = isinstance(space, gym.spaces.Discrete)
        self.n = int(space.n) if isinstance(space, gym.spaces.Discrete) else 0
        self.start = int(space.start) if isinstance(space, gym.spaces.Discrete) else 0
        self.dim = self.n if self.discrete else int(np.prod(space.shape or ()))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return F.one_hot((obs.reshape(-1).long() - self.start).clamp(0, self.n - 1), self.n).float()
        return obs.reshape(obs.shape[0], -1).float()


class QNetwork(nn.Module):
    """Q-values (B, n_actions) for raw observations; dueling: Q = V + A − mean(A)."""

    def __init__(
        self, space: gym.Space, n_actions: int, hidden: list[int], activation: str, dueling: bool
    ) -> None:
        super().__init__()
        self.encoder = ObsEncoder(space)
        self.dueling = dueling
        if not dueling:
            self.q = mlp(self.encoder.dim, hidden, n_actions, activation)
            return
        if not hidden:
            raise ConfigError("a dueling head needs at least one hidden layer in training.net_arch.")
        self.trunk = nn.Sequential(
            mlp(self.encoder.dim, hidden[:-1], hidden[-1], activation), ACTIVATIONS[activation]()
        )
        self.value = mlp(hidden[-1], [], 1, activation)
        self.advantage = mlp(hidden[-1], [], n_actions, activation)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.encoder(obs)
        if not self.dueling:
            return self.q(x)
        h = self.trunk(x)
        adv = self.advantage(h)
        return self.value(h) + adv - adv.mean(dim=1, keepdim=True)


class DQN(ReplayLearner):
    """The DQN learner (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        observation_space: gym.Space,
        action_space: gym.Space,
        device: str | torch.device = "cpu",
        seed: int = 0,
        total_steps: int | None = None,
    ) -> None:
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ConfigError(
                "training.algorithm dqn needs Discrete actions; use sac for continuous actions."
            )
        if not isinstance(observation_space, gym.spaces.Box | gym.spaces.Discrete):
            raise ConfigError("training.algorithm dqn needs Box or Discrete observations.")
        self.config = config
        self.observation_space, self.action_space = observation_space, action_space
        self.device = torch.device(device)
        self.n_actions = int(action_space.n)
        self.rng = np.random.default_rng(seed)
        c = config
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            self.q = QNetwork(observation_space, self.n_actions, c.net_arch, c.activation, c.dueling)
        self.q.to(self.device)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self._params: list[torch.Tensor] = list(self.q.parameters())
        self.optimizer = adam(self._params, c.learning_rate, self.device)
        # Hand-written passes for a plain MLP (see tether.algos.passes); a dueling head or another
        # activation goes through autograd.
        manual = not c.dueling and MlpPasses.supports(self.q.q)
        dtype = matmul_dtype(c.precision, self.device)
        self._passes = MlpPasses(self.q.q, dtype) if manual else None
        self._target_passes = MlpPasses(self.q_target.q, dtype) if manual else None
        # Acting on a Box observation on the CPU runs the network in numpy (see forward_numpy).
        numpy_acting = self.device.type == "cpu" and not self.q.encoder.discrete
        self._numpy_acting = self._passes if numpy_acting else None
        # The gradients the clip sees: one flat tensor behind every .grad with the manual passes.
        self._grads = self._passes.allocate_grads() if self._passes is not None else None
        self._init_replay("dqn", observation_space, action_space, seed, total_steps, priority_eps=c.per_eps)

    # ------------------------------------------------------------------------ acting
    @property
    def epsilon(self) -> float:
        c = self.config
        return linear_schedule(c.epsilon_start, c.epsilon_end, c.epsilon_decay_steps, self.steps)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), device=self.device)

    def act(self, obs: np.ndarray, explore: bool = True) -> ActOut:
        obs = np.asarray(obs)
        n = obs.shape[0]
        random = np.asarray(self.rng.random(n) < self.epsilon) if explore else np.zeros(n, bool)
        if random.all():  # skip the network entirely while exploring at ε = 1
            return ActOut(self.rng.integers(0, self.n_actions, (n,)))
        if self._numpy_acting is not None:
            actions = self._numpy_acting.forward_numpy(obs.reshape(n, -1)).argmax(1)
        else:
            with torch.no_grad():
                actions = self._q_values(self._tensor(obs)).argmax(1).cpu().numpy()
        if random.any():
            actions[random] = self.rng.integers(0, self.n_actions, int(random.sum()))
        return ActOut(actions)

    def observe(self, batch: Transitions) -> None:
        self._count(batch)

    # ------------------------------------------------------------------------ learning
    def update(self) -> dict[str, float]:
        c = self.config
        steps = self._take_rounds() * c.gradient_steps
        for group in self.optimizer.param_groups:  # live changes take effect here
            group["lr"] = self.learning_rate
        # Per step: δ, Q(s, a) and the importance weights, for the round's loss and Q metrics.
        tds: list[torch.Tensor] = []
        qs: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []
        with flush_denormals():
            while len(tds) < steps:
                # Q_target is fixed until the next target update, so the targets of every step up to
                # it are computed in one pass. A prioritized batch must see the priorities the last
                # step wrote, so it is drawn (and its targets computed) one step at a time.
                span = min(
                    steps - len(tds), c.target_update_interval - self.grad_steps % c.target_update_interval
                )
                span = 1 if c.prioritized else span
                block = self.buffer.sample_block(c.batch_size, span, self.device)
                actions = block.action.long().unsqueeze(1)
                with torch.no_grad():
                    next_q_target = self._distinct_rows(
                        lambda x: self._q_values(x, target=True), block.next_obs, block.indices
                    )
                    if not c.double_q:
                        targets = block.reward + block.discount * block.not_done * next_q_target.max(1).values
                for i, b in enumerate(block.split(c.batch_size)):
                    rows = slice(i * c.batch_size, (i + 1) * c.batch_size)
                    if c.double_q:
                        with torch.no_grad():
                            best = self._q_values(b.next_obs).argmax(1, keepdim=True)
                            next_q = next_q_target[rows].gather(1, best).squeeze(1)
                            target = b.reward + b.discount * b.not_done * next_q
                    else:
                        target = targets[rows]
                    td, q = self._gradient_step(b, actions[rows], target)
                    tds.append(td)
                    qs.append(q)
                    weights.append(b.weights)

        metrics = {
            "epsilon": self.epsilon,
            "learning_rate": self.learning_rate,
            "grad_steps": float(self.grad_steps),
            "buffer_size": float(len(self.buffer)),
        }
        if tds:
            metrics["loss"] = float(self._loss(torch.cat(tds), torch.cat(weights)))
            metrics["q_mean"] = float(torch.cat(qs).mean())
        if c.prioritized:
            metrics["per_beta"] = self.buffer.beta
        return metrics

    def _loss(self, td: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """mean(w · huber(δ)) or mean(w · δ²); w = 1 without prioritization."""
        per_sample = (
            F.huber_loss(td, torch.zeros_like(td), reduction="none")
            if self.config.loss == "huber"
            else td.pow(2)
        )
        return (weights * per_sample).mean() if self.config.prioritized else per_sample.mean()

    def _q_values(self, obs: torch.Tensor, target: bool = False) -> torch.Tensor:
        """Q(obs, ·) of the online or target network (no gradient), by the hand-written pass
        when there is one."""
        net, passes = (self.q_target, self._target_passes) if target else (self.q, self._passes)
        return net(obs) if passes is None else passes.forward(net.encoder(obs))

    def _gradient_step(
        self, b: TensorSample, action: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One Adam step on the TD loss towards `target` for actions (B, 1); returns the
        (detached) δ and Q(s, a)."""
        c = self.config
        if self._passes is None:
            q = self.q(b.obs).gather(1, action).squeeze(1)
            td = q - target
            self.optimizer.zero_grad(set_to_none=True)
            self._loss(td, b.weights).backward()
        else:
            with torch.no_grad():
                tape = Tape()
                q_all = self._passes.forward(self.q.encoder(b.obs), tape)
                q = q_all.gather(1, action).squeeze(1)
                td = q - target
                # d loss / d Q(s, a): huber' = clip(δ, ±1), mse' = 2δ, each weighted, over the batch
                grad = td.clamp(-1.0, 1.0) if c.loss == "huber" else 2.0 * td
                if c.prioritized:
                    grad = grad * b.weights
                grad_q = torch.zeros_like(q_all).scatter_(1, action, grad.div_(len(q)).unsqueeze(1))
                self._passes.backward(tape, grad_q)
        if c.max_grad_norm is not None:
            clip_grad_norm(self._params, c.max_grad_norm, self._grads)
        adam_step(self.optimizer)
        td, q = td.detach(), q.detach()
        if c.prioritized:
            self.buffer.update_priorities(b.indices, td.abs().cpu().numpy())

        self.grad_steps += 1
        if self.grad_steps % c.target_update_interval == 0:
            self._update_target(c.tau)
        return td, q

    @staticmethod
    def _distinct_rows(
        net: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor, indices: np.ndarray
    ) -> torch.Tensor:
        """net(obs) evaluated once per distinct buffer row: a block of many batches drawn with
        replacement repeats rows often (every row, several times, while the buffer is small). The
        rows go through in chunks whose activations stay in the CPU's cache (a third faster than
        one pass over tens of thousands of rows)."""
        if len(indices) <= 1:
            return net(obs)
        _, first, inverse = np.unique(indices, return_index=True, return_inverse=True)
        distinct = obs[torch.from_numpy(first)]
        return torch.cat([net(chunk) for chunk in distinct.split(TARGET_CHUNK_ROWS)])[
            torch.from_numpy(inverse)
        ]

    @torch.no_grad()
    def _update_target(self, tau: float) -> None:
        if tau >= 1.0:
            self.q_target.load_state_dict(self.q.state_dict())
            return
        online: list[torch.Tensor] = list(self.q.parameters())
        target: list[torch.Tensor] = list(self.q_target.parameters())
        torch._foreach_lerp_(target, online, tau)

    # ------------------------------------------------------------------------ export / state
    def policy(self) -> nn.Module:
        """Q-values (B, n_actions) for raw observations, on the CPU, in eval mode."""
        return copy.deepcopy(self.q).cpu().eval().requires_grad_(False)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "q": self.q.state_dict(),
            "q_target": self.q_target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": generator_state(self.rng),
            **self._counter_state(),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q.load_state_dict(state["q"])
        self.q_target.load_state_dict(state["q_target"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "rng" in state:
            set_generator_state(self.rng, state["rng"])
        self._load_counter_state(state)


def build(
    config: Config,
    observation_space: gym.Space,
    action_space: gym.Space,
    device: str | torch.device = "cpu",
    seed: int = 0,
    total_steps: int | None = None,
) -> DQN:
    return DQN(config, observation_space, action_space, device, seed, total_steps=total_steps)
