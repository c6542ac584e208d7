"""Soft Actor-Critic for continuous (Box) actions: twin critics with Polyak-averaged targets, a
tanh-squashed Gaussian actor with the exact log-probability of the squashed action, and automatic
entropy tuning.

The actor works in the squashed space [-1, 1]^d; actions are scaled affinely to the env's bounds
on the way out, and actions coming back in `observe()` (from this learner or from any remote
source) are mapped back to [-1, 1] before the critics see them.

One gradient step, for a sampled batch (s, a, G, s', terminated, discount = γ^k):

    ã, log π(ã|s)   ~ actor(s)                          (reparameterised, u ~ N(μ, σ), ã = tanh u,
                                                          log π = log N(u) − Σ log(1 − tanh² u))
    α-loss          = −log α · (log π(ã|s) + H_target)    (auto entropy; H_target = −dim(A))
    y               = G + discount · (1 − terminated) · (min_i Q'_i(s', ã') − α · log π(ã'|s'))
    critic-loss     = ½ Σ_i mean((Q_i(s, a) − y)²)
    actor-loss      = mean(α · log π(ã|s) − min_i Q_i(s, ã))
    targets         θ' ← τ·θ + (1 − τ)·θ'
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Literal, cast

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tether.algos.base import ActOut, Transitions
from tether.algos.offpolicy import ReplayLearner
from tether.algos.optim import adam, adam_step, clip_grad_norm, flush_denormals
from tether.algos.passes import MlpPasses, Precision, Tape, matmul_dtype
from tether.buffers.replay import TensorSample
from tether.checkpoint import generator_state, set_generator_state
from tether.config import ConfigError
from tether.nets import ACTIVATIONS, RunningNorm, angle_features, mlp

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class Config(BaseModel):
    """The `training` section for SAC. Step counts are in transitions observed unless noted."""

    model_config = ConfigDict(extra="forbid")
    LIVE_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"learning_rate", "tau", "train_freq", "gradient_steps", "ent_coef", "max_grad_norm"}
    )

    algorithm: Literal["sac"] = "sac"
    learning_rate: float = Field(3e-4, gt=0.0, description="for the actor, the critics and α")
    buffer_size: int = Field(1_000_000, ge=1, description="replay capacity in transitions")
    learning_starts: int = Field(
        100, ge=0, description="transitions of uniform random actions before learning"
    )
    batch_size: int = Field(256, ge=1)
    discount_factor: float = Field(0.99, ge=0.0, le=1.0)
    tau: float = Field(0.005, gt=0.0, le=1.0)
    train_freq: int = Field(1, ge=1, description="transitions observed per round of gradient steps")
    gradient_steps: int = Field(1, ge=1, description="gradient steps per round")
    target_update_interval: int = Field(1, ge=1, description="gradient steps between target updates")
    ent_coef: float | Literal["auto"] = Field("auto", description="α, or 'auto' to tune it")
    ent_coef_init: float = Field(1.0, gt=0.0, description="starting α when ent_coef is 'auto'")
    target_entropy: float | Literal["auto"] = Field("auto", description="'auto' = −dim(action)")
    actor_fc_layers: list[int] = Field(default_factory=lambda: [256, 256])
    critic_fc_layers: list[int] = Field(default_factory=lambda: [256, 256])
    activation: str = "relu"
    n_step: int = Field(1, ge=1, le=100)
    prioritized: bool = False
    per_alpha: float = Field(0.6, ge=0.0)
    per_beta_start: float = Field(0.4, ge=0.0, le=1.0)
    per_beta_steps: int | None = Field(
        None, ge=1, description="transitions to anneal β to 1 (default: total_steps)"
    )
    max_grad_norm: float | None = Field(None, gt=0.0)
    anneal_lr: bool = Field(False, description="decay the learning rate linearly to 0 over total_steps")
    normalize_obs: bool = Field(False, description="running mean/std normalisation of observations")
    angle_obs: list[int] = Field(
        default_factory=list,
        description="observation indices that hold angles in radians; the networks see their sine and cosine",
    )
    precision: Precision = Field(
        "float32",
        description="dtype of the hidden-to-hidden matrix products: float32, bfloat16, or auto "
        "(bfloat16 on CPUs that multiply it natively, float32 elsewhere)",
    )
    save_replay: bool = Field(True, description="include the replay buffer in checkpoints")


# ---------------------------------------------------------------------------------- networks
class EnsembleLinear(nn.Module):
    """E independent linear layers applied as one batched matmul: (E, B, in) → (E, B, out)."""

    def __init__(self, members: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TwinQ(nn.Module):
    """Two Q-networks Q_i(s, a) evaluated together; returns (2, B)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], activation: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        last = obs_dim + act_dim
        for width in hidden:
            layers += [EnsembleLinear(2, last, width), ACTIVATIONS[activation]()]
            last = width
        layers.append(EnsembleLinear(2, last, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(self.inputs(obs, action)).squeeze(-1)

    @staticmethod
    def inputs(obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The ensemble's input: [s, a] for each of the two members, (2, B, obs + act)."""
        x = torch.cat([obs, action], dim=1)
        return x.expand(2, *x.shape)


class Actor(nn.Module):
    """Gaussian policy head over the unsquashed action u; ã = tanh(u) ∈ [-1, 1]^d."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], activation: str) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, 2 * act_dim, activation)
        self.act_dim = act_dim

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.net(obs))

    def head(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's output as (mean, log σ clamped to its range)."""
        mean, log_std = out.split(self.act_dim, dim=1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self(obs)
        return squashed_sample(mean, log_std)


def squashed_sample(mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised ã = tanh(u), u ~ N(mean, exp(log_std)), and log π(ã) summed over dims.

    The change of variables gives log π(ã) = log N(u) − Σ log(1 − tanh² u); the second term is
    computed as 2·(log 2 − u − softplus(−2u)), which is exact and stays finite for large |u|."""
    action, logp, _, _ = _squashed_parts(mean, log_std)
    return action, logp


def _squashed_parts(
    mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`squashed_sample` plus the std and the standard-normal noise its gradient needs (drawn
    here unless given)."""
    std = log_std.exp()
    if noise is None:  # over the shape, not randn_like: the same draws whatever the layout of `mean`
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
    u = mean + std * noise
    log_normal = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(1)
    log_det = (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(1)
    return torch.tanh(u), log_normal - log_det, std, noise


class SquashedPolicy(nn.Module):
    """Deterministic export: raw observation → (angle features, normalisation) → tanh(mean) scaled
    to the env's bounds."""

    action_center: torch.Tensor
    action_scale: torch.Tensor

    def __init__(
        self, actor: Actor, features: nn.Module, norm: nn.Module, low: torch.Tensor, high: torch.Tensor
    ) -> None:
        super().__init__()
        self.actor, self.features, self.norm = actor, features, norm
        self.register_buffer("action_center", (high + low) / 2)
        self.register_buffer("action_scale", (high - low) / 2)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        feats = self.features(obs.reshape(obs.shape[0], -1).float())
        mean, _ = self.actor(self.norm(feats))
        return self.action_center + self.action_scale * torch.tanh(mean)


# ---------------------------------------------------------------------------------- learner
class SAC(ReplayLearner):
    """The SAC learner (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        observation_space: gym.Space,
        action_space: gym.Space,
        device: str | torch.device = "cpu",
        seed: int = 0,
        total_steps: int | None = None,
    ) -> None:
        if (
            not isinstance(action_space, gym.spaces.Box)
            or not np.all(np.isfinite(action_space.low))
            or not np.all(np.isfinite(action_space.high))
        ):
            raise ConfigError(
                "training.algorithm sac needs bounded Box actions; use dqn or ppo for this env."
            )
        if not isinstance(observation_space, gym.spaces.Box):
            raise ConfigError("training.algorithm sac needs Box observations.")
        self.config = c = config
        self.observation_space, self.action_space = observation_space, action_space
        self.device = torch.device(device)
        self.obs_dim = int(np.prod(observation_space.shape))
        # Raw observation → what the normaliser and the networks see (angles as sine and cosine).
        self.features: nn.Module = nn.Identity()
        self.net_obs_dim = self.obs_dim
        if c.angle_obs:
            angles = angle_features(observation_space, c.angle_obs)
            self.features, self.net_obs_dim = angles.to(self.device), angles.out_dim
        self.act_dim = int(np.prod(action_space.shape))
        self.act_shape = tuple(action_space.shape)
        low = torch.as_tensor(action_space.low, dtype=torch.float32).reshape(-1)
        high = torch.as_tensor(action_space.high, dtype=torch.float32).reshape(-1)
        self.center, self.half = ((high + low) / 2).to(self.device), ((high - low) / 2).to(self.device)
        self.rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            dims = (self.net_obs_dim, self.act_dim)
            self.actor = Actor(*dims, c.actor_fc_layers, c.activation).to(self.device)
            self.critic = TwinQ(*dims, c.critic_fc_layers, c.activation).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self._actor_params: list[torch.Tensor] = list(self.actor.parameters())
        self._critic_params: list[torch.Tensor] = list(self.critic.parameters())
        self._target_params: list[torch.Tensor] = list(self.critic_target.parameters())
        self.norm: nn.Module = (
            RunningNorm((self.net_obs_dim,)).to(self.device) if c.normalize_obs else nn.Identity()
        )
        self.log_alpha = torch.tensor(math.log(c.ent_coef_init), device=self.device, requires_grad=True)
        self.target_entropy = -float(self.act_dim) if c.target_entropy == "auto" else float(c.target_entropy)
        self.actor_opt = adam(self.actor.parameters(), c.learning_rate, self.device)
        self.critic_opt = adam(self.critic.parameters(), c.learning_rate, self.device)
        self.alpha_opt = adam([self.log_alpha], c.learning_rate, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # Hand-written passes (see tether.algos.passes) unless an activation needs autograd.
        nets = (self.actor.net, self.critic.net, self.critic_target.net)
        dtype = matmul_dtype(c.precision, self.device)
        self._passes = [MlpPasses(n, dtype) for n in nets] if all(map(MlpPasses.supports, nets)) else None
        # The gradients the clips see: one flat tensor per network with the manual passes.
        self._actor_grads = self._passes[0].allocate_grads() if self._passes is not None else None
        self._critic_grads = self._passes[1].allocate_grads() if self._passes is not None else None
        if self._passes is not None:
            self.log_alpha.grad = torch.zeros_like(self.log_alpha)
        # Acting on raw observations on the CPU runs the actor in numpy (see forward_numpy).
        raw_cpu = self.device.type == "cpu" and not (c.normalize_obs or c.angle_obs)
        self._numpy_acting = self._passes[0] if self._passes is not None and raw_cpu else None
        self._init_replay("sac", observation_space, action_space, seed, total_steps)

    # ------------------------------------------------------------------------ acting
    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), device=self.device)

    def _obs(self, obs: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = obs if isinstance(obs, torch.Tensor) else self._tensor(obs)
        return self.norm(self.features(t.reshape(t.shape[0], -1).float()))

    def act(self, obs: np.ndarray, explore: bool = True) -> ActOut:
        obs = np.asarray(obs)
        n = obs.shape[0]
        if explore and self.steps < self.config.learning_starts:  # uniform warm-up, as in the paper
            squashed = self.rng.uniform(-1.0, 1.0, (n, self.act_dim)).astype(np.float32)
            uniform = self.center.cpu().numpy() + self.half.cpu().numpy() * squashed
            return ActOut(uniform.reshape(n, *self.act_shape))
        if self._numpy_acting is not None:
            return ActOut(self._act_numpy(self._numpy_acting, obs, explore).reshape(n, *self.act_shape))
        with torch.no_grad():
            x = self._obs(obs)
            out = self.actor.net(x) if self._passes is None else self._passes[0].forward(x)
            mean, log_std = self.actor.head(out)
            if explore:
                u = mean + log_std.exp() * torch.randn(
                    mean.shape, generator=self.generator, device=self.device
                )
            else:
                u = mean
            action = self.center + self.half * torch.tanh(u)
        return ActOut(action.cpu().numpy().reshape(n, *self.act_shape))

    def _act_numpy(self, actor: MlpPasses, obs: np.ndarray, explore: bool) -> np.ndarray:
        """`act`'s policy step in numpy, with the same noise draws as the torch path."""
        out = actor.forward_numpy(obs.reshape(obs.shape[0], -1))
        u = out[:, : self.act_dim]
        if explore:
            std = np.exp(np.clip(out[:, self.act_dim :], LOG_STD_MIN, LOG_STD_MAX))
            u = u + std * torch.randn(u.shape, generator=self.generator).numpy()
        return self.center.numpy() + self.half.numpy() * np.tanh(u)

    def observe(self, batch: Transitions) -> None:
        self._count(batch)
        if self.config.normalize_obs:
            with torch.no_grad():
                raw = torch.as_tensor(np.asarray(batch.obs), dtype=torch.float32, device=self.device)
                feats = self.features(raw.reshape(len(batch), -1))
            cast(RunningNorm, self.norm).update(feats.cpu().numpy())

    # ------------------------------------------------------------------------ learning
    def update(self) -> dict[str, float]:
        c = self.config
        rounds = self._take_rounds()
        for opt in (self.actor_opt, self.critic_opt, self.alpha_opt):
            for group in opt.param_groups:
                group["lr"] = self.learning_rate
        auto = c.ent_coef == "auto"
        # The actor's backward pass also gives α its gradient (the two losses share no parameters).
        actor_params = self._actor_params + ([self.log_alpha] if auto else [])
        stats: list[torch.Tensor] = []
        with flush_denormals():
            for b in self.buffer.sample_tensors(c.batch_size, rounds * c.gradient_steps, self.device):
                stats.append(self._gradient_step(b, auto, actor_params))

        metrics = {
            "grad_steps": float(self.grad_steps),
            "buffer_size": float(len(self.buffer)),
            "learning_rate": self.learning_rate,
        }
        if stats:
            critic_l, actor_l, alpha_v, q_mean, entropy = torch.stack(stats).mean(0).tolist()
            metrics.update(
                {
                    "critic_loss": critic_l,
                    "actor_loss": actor_l,
                    "ent_coef": alpha_v,
                    "q_mean": q_mean,
                    "entropy": entropy,
                }
            )
        return metrics

    def _gradient_step(self, b: TensorSample, auto: bool, actor_params: list[torch.Tensor]) -> torch.Tensor:
        """One SAC step (the module docstring's update); returns its statistics for the metrics."""
        c = self.config
        if self._passes is None:
            stats = self._autograd_step(b, auto, actor_params)
        else:
            with torch.no_grad():
                stats = self._manual_step(b, auto)
        self.grad_steps += 1
        if self.grad_steps % c.target_update_interval == 0:
            with torch.no_grad():
                torch._foreach_lerp_(self._target_params, self._critic_params, c.tau)
        return stats

    def _step_inputs(
        self, b: TensorSample, auto: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """s and s' as the networks take them, a in [-1, 1], and this step's α."""
        obs, next_obs = self._obs(b.obs), self._obs(b.next_obs)
        action = (b.action.reshape(-1, self.act_dim) - self.center) / self.half  # env scale → [-1, 1]
        # This step's losses use the pre-step α; α's own gradient is taken with the actor's.
        ent_coef = self.config.ent_coef
        alpha = self.log_alpha.detach().exp() if auto else torch.tensor(float(ent_coef), device=self.device)
        return obs, next_obs, action, alpha

    def _autograd_step(self, b: TensorSample, auto: bool, actor_params: list[torch.Tensor]) -> torch.Tensor:
        """The step through autograd (any activation)."""
        obs, next_obs, action, alpha = self._step_inputs(b, auto)
        pi_action, logp = self.actor.sample(obs)
        # Critics: soft Bellman target from the target critics and a fresh next action.
        with torch.no_grad():
            next_action, next_logp = self.actor.sample(next_obs)
            next_q = self.critic_target(next_obs, next_action).min(0).values - alpha * next_logp
            target = b.reward + b.discount * b.not_done * next_q
        q = self.critic(obs, action)
        td = q - target
        critic_loss = self._critic_loss(td, b)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self._critic_update(td, b)

        # Actor (maximise min-Q plus entropy) through the just-updated critics, and α. `inputs`
        # keeps the critics' weights out of this backward pass; the two losses share no parameters.
        actor_loss = (alpha * logp - self.critic(obs, pi_action).min(0).values).mean()
        loss = actor_loss
        if auto:
            loss = loss - (self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        self.alpha_opt.zero_grad(set_to_none=True)
        loss.backward(inputs=actor_params)
        self._actor_update(auto)
        return torch.stack(
            [critic_loss.detach(), actor_loss.detach(), alpha, q.detach().mean(), -logp.detach().mean()]
        )

    def _manual_step(self, b: TensorSample, auto: bool) -> torch.Tensor:
        """The same step by the hand-written passes. Beyond the networks' own backward passes:
        with ã = tanh u, u = μ + σ·ε and log π = Σ(−ε²/2 − log σ − log √(2π)) − Σ log(1 − ã²),
        d log π / du = 2ã and d log π / d log σ = −1 (ε held fixed), so for the actor loss
        L = mean_b(α·log π − min_i Q_i(s, ã)) over a batch of B:
            dL/du      = dL/dã · (1 − ã²) + (α/B) · 2ã,   dL/dã from the critics' input gradient
            dL/dμ      = dL/du
            dL/dlog σ  = dL/du · σ·ε − α/B              (zero where log σ was clamped)"""
        actor, critic, critic_target = cast(list[MlpPasses], self._passes)
        obs, next_obs, action, alpha = self._step_inputs(b, auto)
        batch, d = obs.shape[0], self.act_dim
        # The actor's passes over s and s' share one forward pass and one sampling (with the
        # draws autograd's step makes, s' after s); only s is back-propagated.
        both_tape = Tape()
        raw_mean, raw_log_std = actor.forward(torch.cat([obs, next_obs]), both_tape).split(d, dim=1)
        actor_tape = both_tape.first_rows(batch)
        draws = torch.cat(
            [torch.randn(batch, d, device=obs.device), torch.randn(batch, d, device=obs.device)]
        )
        both = _squashed_parts(raw_mean, raw_log_std.clamp(LOG_STD_MIN, LOG_STD_MAX), draws)
        pi_action, logp, std, noise = (x[:batch] for x in both)
        next_action, next_logp = both[0][batch:], both[1][batch:]
        raw_log_std = raw_log_std[:batch]
        next_q = critic_target.forward(TwinQ.inputs(next_obs, next_action)).squeeze(-1)
        target = b.reward + b.discount * b.not_done * (next_q.min(0).values - alpha * next_logp)

        critic_tape = Tape()
        q = critic.forward(TwinQ.inputs(obs, action), critic_tape).squeeze(-1)
        td = q - target
        critic_loss = self._critic_loss(td, b)
        grad_q = td * b.weights if self.config.prioritized else td.clone()  # d critic_loss / dQ_i
        critic.backward(critic_tape, grad_q.div_(batch).unsqueeze(-1))
        self._critic_update(td, b)

        q_tape = Tape()
        q_pi = critic.forward(TwinQ.inputs(obs, pi_action), q_tape).squeeze(-1)
        q_min, lower = q_pi.min(0)
        actor_loss = (alpha * logp - q_min).mean()
        grad_q_pi = torch.zeros_like(q_pi).scatter_(0, lower.unsqueeze(0), -1.0 / batch)
        grad_input = critic.backward(q_tape, grad_q_pi.unsqueeze(-1), weights=False, inputs=True)
        grad_input = cast(torch.Tensor, grad_input)  # a tensor whenever inputs=True
        grad_pi = grad_input[..., self.net_obs_dim :].sum(0)
        grad_u = grad_pi.mul_(1.0 - pi_action * pi_action).add_((2.0 / batch) * alpha * pi_action)
        inside = (raw_log_std >= LOG_STD_MIN) & (raw_log_std <= LOG_STD_MAX)
        grad_log_std = (grad_u * std * noise - alpha / batch) * inside
        actor.backward(actor_tape, torch.cat([grad_u, grad_log_std], dim=1))
        if auto:
            cast(torch.Tensor, self.log_alpha.grad).copy_(-(logp + self.target_entropy).mean())
        self._actor_update(auto)
        return torch.stack([critic_loss, actor_loss, alpha, q.mean(), -logp.mean()])

    def _critic_loss(self, td: torch.Tensor, b: TensorSample) -> torch.Tensor:
        """½ Σ_i mean_b(w · δ_i²)."""
        squared = b.weights * td.pow(2) if self.config.prioritized else td.pow(2)
        return 0.5 * squared.mean(1).sum()

    def _critic_update(self, td: torch.Tensor, b: TensorSample) -> None:
        """Clip, step the critics' Adam and refresh the sampled rows' priorities."""
        c = self.config
        if c.max_grad_norm is not None:
            clip_grad_norm(self._critic_params, c.max_grad_norm, self._critic_grads)
        adam_step(self.critic_opt)
        if c.prioritized:
            self.buffer.update_priorities(b.indices, td.detach().abs().mean(0).cpu().numpy())

    def _actor_update(self, auto: bool) -> None:
        if self.config.max_grad_norm is not None:
            clip_grad_norm(self._actor_params, self.config.max_grad_norm, self._actor_grads)
        adam_step(self.actor_opt)
        if auto:
            adam_step(self.alpha_opt)

    # ------------------------------------------------------------------------ export / state
    def policy(self) -> nn.Module:
        """tanh(mean) scaled to the action bounds, for raw observations (features and
        normalisation inside)."""
        return (
            SquashedPolicy(
                copy.deepcopy(self.actor).cpu(),
                copy.deepcopy(self.features).cpu(),
                copy.deepcopy(self.norm).cpu(),
                self.center.cpu() - self.half.cpu(),
                self.center.cpu() + self.half.cpu(),
            )
            .eval()
            .requires_grad_(False)
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "norm": self.norm.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "rng": generator_state(self.rng),
            "torch_rng": self.generator.get_state(),
            **self._counter_state(),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.norm.load_state_dict(state.get("norm", {}))
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        for name in ("actor_opt", "critic_opt", "alpha_opt"):
            if name in state:
                getattr(self, name).load_state_dict(state[name])
        if "rng" in state:
            set_generator_state(self.rng, state["rng"])
        if "torch_rng" in state:
            self.generator.set_state(state["torch_rng"])
        self._load_counter_state(state)


def build(
    config: Config,
    observation_space: gym.Space,
    action_space: gym.Space,
    device: str | torch.device = "cpu",
    seed: int = 0,
    total_steps: int | None = None,
) -> SAC:
    return SAC(config, observation_space, action_space, device, seed, total_steps=total_steps)
