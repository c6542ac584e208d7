"""Proximal Policy Optimisation (clipped surrogate, GAE), written top to bottom.

The learner never owns an env: `observe()` takes (N,)-row batches from any source. Batches that
carry `logp`/`value` from `act()` are used as is; a remote source without them gets values
computed at update time and is treated as on-policy (a source with another behaviour policy must
supply its own `logp`).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any, ClassVar, Literal

import gymnasium as gym
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tether.algos.base import ActOut, Transitions
from tether.algos.optim import adam, clip_grad_norm, flush_denormals
from tether.algos.passes import onednn_float32_products, onednn_products
from tether.buffers.returns import gae
from tether.buffers.rollout import RolloutBuffer, flatten_obs
from tether.nets import ActorCritic, AngleFeatures, MlpActorCritic, Obs, RunningNorm, angle_features


class Config(BaseModel):
    """The `training` section for PPO (defaults from the headless-training system)."""

    model_config = ConfigDict(extra="forbid")
    LIVE_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"learning_rate", "ent_coef", "vf_coef", "clip_range", "max_grad_norm", "target_kl"}
    )

    algorithm: Literal["ppo"] = "ppo"
    learning_rate: float = Field(3e-4, gt=0)
    num_epochs: int = Field(10, ge=1)
    batch_size: int = Field(512, ge=1, description="minibatch size")
    rollout_steps: int = Field(64, ge=1, description="steps per env between updates")
    discount_factor: float = Field(0.99, ge=0, le=1)
    lambda_gae: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    ent_coef: float = Field(0.0, ge=0)
    vf_coef: float = Field(0.5, ge=0)
    max_grad_norm: float = Field(0.5, gt=0)
    target_kl: float | None = Field(None, gt=0, description="stop the epochs early past this KL")
    normalize_advantages: bool = True
    normalize_obs: bool = True
    normalize_reward: bool = False
    anneal_lr: bool = False
    actor_fc_layers: list[int] = Field(default_factory=lambda: [256, 256])
    value_fc_layers: list[int] = Field(default_factory=lambda: [256, 256])
    activation: Literal["tanh", "relu", "elu", "gelu"] = "tanh"
    log_std_init: float = 0.0
    angle_obs: list[int] = Field(
        default_factory=list,
        description="observation indices that hold angles in radians; the policy sees their sine and cosine",
    )


class DeterministicPolicy(nn.Module):
    """Raw observation → deterministic action in the env's scale (what export and eval run)."""

    low: torch.Tensor | None
    high: torch.Tensor | None

    def __init__(
        self,
        net: ActorCritic,
        norm: RunningNorm | None,
        low: np.ndarray | None,
        high: np.ndarray | None,
        features: AngleFeatures | None = None,
    ):
        super().__init__()
        self.net, self.norm, self.features = net, norm, features
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32) if low is not None else None)
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32) if high is not None else None)

    def forward(self, obs: Obs) -> torch.Tensor:
        if self.features is not None and isinstance(obs, torch.Tensor):
            obs = self.features(obs)
        if self.norm is not None and isinstance(obs, torch.Tensor):
            obs = self.norm(obs)
        action = self.net(obs)
        if self.low is not None and self.high is not None:
            action = torch.maximum(torch.minimum(action, self.high), self.low)
        return action


class PPO:
    def __init__(
        self,
        config: Config,
        observation_space: gym.Space[Any],
        action_space: gym.Space[Any],
        device: str | torch.device = "cpu",
        seed: int = 0,
        actor_critic: ActorCritic | None = None,
        num_envs: int = 1,
        total_steps: int | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.observation_space, self.action_space = observation_space, action_space
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        torch.manual_seed(seed)
        flat_obs = isinstance(observation_space, gym.spaces.Box)
        self.features: AngleFeatures | None = None
        net_obs_shape: tuple[int, ...] = observation_space.shape or ()  # None for a Dict space
        if config.angle_obs:
            self.features = angle_features(observation_space, config.angle_obs).to(self.device)
            net_obs_shape = (self.features.out_dim,)
        if actor_critic is None:
            if not flat_obs:
                raise TypeError("the default MLP policy needs a Box observation space; pass actor_critic")
            obs_dim = int(np.prod(net_obs_shape))
            actor_critic = MlpActorCritic(
                obs_dim,
                action_space,
                config.actor_fc_layers,
                config.value_fc_layers,
                config.activation,
                config.log_std_init,
            )
        self.net = actor_critic.to(self.device)
        self.obs_norm = (
            RunningNorm(net_obs_shape).to(self.device) if flat_obs and config.normalize_obs else None
        )
        self.ret_norm = RunningNorm(()).to(self.device) if config.normalize_reward else None
        self._returns = np.zeros(num_envs)
        self.optimizer = adam(self.net.parameters(), config.learning_rate, self.device, eps=1e-5)
        self.buffer = RolloutBuffer(
            config.rollout_steps, num_envs, observation_space, action_space, self.device
        )
        self.num_envs = num_envs
        self.total_steps = total_steps
        self.steps_seen = 0
        self.updates = 0

    # --- acting -----------------------------------------------------------------------------
    def _prep(self, obs: Any) -> Obs:
        if isinstance(obs, dict):
            return {k: torch.as_tensor(np.asarray(v), device=self.device) for k, v in obs.items()}
        return self._preprocess(torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device))

    def _env_action(self, raw: torch.Tensor) -> np.ndarray:
        if self.discrete:
            return raw.cpu().numpy()
        low, high = self.action_space.low, self.action_space.high  # type: ignore[attr-defined]
        return np.clip(raw.cpu().numpy(), low, high)

    @torch.no_grad()
    def act(self, obs: Any, explore: bool = True) -> ActOut:
        x = self._prep(obs)
        if not explore:
            return ActOut(self._env_action(self.net(x)))
        dist = self.net.distribution(x)
        raw = dist.sample()
        extras = {
            "raw_action": raw.cpu().numpy(),
            "logp": dist.log_prob(raw).cpu().numpy(),
            "value": self.net.value(x).cpu().numpy(),
        }
        return ActOut(self._env_action(raw), extras)

    # --- collecting -------------------------------------------------------------------------
    def observe(self, batch: Transitions) -> None:
        rewards = np.asarray(batch.reward, dtype=np.float64)
        if self.ret_norm is not None:
            self._returns = self._returns * self.config.discount_factor + rewards
            self.ret_norm.update(self._returns)
            rewards = rewards / np.sqrt(self.ret_norm.var.item() + 1e-8)
            self._returns[np.asarray(batch.done)] = 0.0
        action = batch.extras.get("raw_action", batch.action)
        self.buffer.add(
            batch.obs,
            action,
            rewards,
            batch.terminated,
            batch.truncated,
            batch.next_obs,
            batch.extras.get("logp"),
            batch.extras.get("value"),
        )
        self.steps_seen += len(batch)

    def ready(self) -> bool:
        return self.buffer.full

    # --- learning ---------------------------------------------------------------------------
    @torch.no_grad()
    def _values_of(self, obs: Obs, chunk: int = 4096) -> torch.Tensor:
        n = next(iter(obs.values())).shape[0] if isinstance(obs, dict) else obs.shape[0]
        out = [
            self.net.value(self._preprocess(flatten_obs_slice(obs, i, i + chunk))) for i in range(0, n, chunk)
        ]
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def _featurize(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw flat observations → the features the normaliser sees (angles as sin/cos)."""
        obs = obs.float()
        return self.features(obs) if self.features is not None else obs

    def _preprocess(self, obs: Obs) -> Obs:
        """Raw flat observations → what the network takes (features, then normalisation)."""
        if not isinstance(obs, torch.Tensor):
            return obs
        feats = self._featurize(obs)
        return self.obs_norm(feats) if self.obs_norm is not None else feats

    def update(self) -> dict[str, float]:
        cfg, buf = self.config, self.buffer
        steps, n = buf.pos, buf.num_envs
        flat_obs = flatten_obs(_truncate(buf.obs, steps))
        with torch.no_grad():
            # Values and old log-probs for rows a remote source did not supply.
            if not buf.has_values:
                buf.values[:steps] = self._values_of(flat_obs).reshape(steps, n)
            if not buf.has_logp:
                buf.logp[:steps] = self._logp_of(
                    flat_obs, buf.actions[:steps].reshape(steps * n, *buf.actions.shape[2:])
                ).reshape(steps, n)
            values = buf.values[:steps]
            next_values = torch.zeros_like(values)
            next_values[:-1] = values[1:]
            next_values[-1] = self._values_of(_as_batch(buf.last_next_obs, self.device))
            for t, i, final in buf.truncated_finals:
                next_values[t, i] = self._values_of(_as_batch(_unsqueeze(final), self.device))[0]
            adv, returns = gae(
                buf.rewards[:steps],
                values,
                next_values,
                buf.terminated[:steps],
                buf.done[:steps],
                cfg.discount_factor,
                cfg.lambda_gae,
            )
        if cfg.anneal_lr and self.total_steps:
            frac = max(0.0, 1.0 - self.steps_seen / self.total_steps)
            lr = cfg.learning_rate * frac
        else:
            lr = cfg.learning_rate
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        feats = None if isinstance(flat_obs, dict) else self._featurize(flat_obs)
        b_obs = flat_obs if feats is None else (self.obs_norm(feats) if self.obs_norm is not None else feats)
        b_act = buf.actions[:steps].reshape(steps * n, *buf.actions.shape[2:])
        b_logp, b_adv = buf.logp[:steps].reshape(-1), adv.reshape(-1)
        b_ret, b_val = returns.reshape(-1), values.reshape(-1)
        total = steps * n
        mb = min(cfg.batch_size, total)
        stats: dict[str, list[float]] = {
            k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction")
        }
        params = list(self.net.parameters())
        # Float32 products in oneDNN where MKL runs only AVX2 kernels (tether.algos.passes):
        # an update of the Lunabotics preset took 0.33-0.39 s against 0.43-0.44 s on a Zen 5.
        products = onednn_products() if onednn_float32_products(self.device) else nullcontext()
        with flush_denormals(), products:
            for _epoch in range(cfg.num_epochs):
                perm = torch.randperm(total, generator=self.generator).to(self.device)
                kl_epoch = []
                for start in range(0, total - mb + 1, mb):
                    idx = perm[start : start + mb]
                    obs_mb = flatten_obs_index(b_obs, idx)
                    dist = self.net.distribution(obs_mb)
                    logp = dist.log_prob(b_act[idx])
                    entropy = dist.entropy().mean()
                    log_ratio = logp - b_logp[idx]
                    ratio = log_ratio.exp()
                    mb_adv = b_adv[idx]
                    if cfg.normalize_advantages and mb > 1:
                        mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                    # Clipped surrogate objective.
                    pg_loss = torch.max(
                        -mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range)
                    ).mean()
                    value_loss = 0.5 * (self.net.value(obs_mb) - b_ret[idx]).pow(2).mean()
                    loss = pg_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    clip_grad_norm(params, cfg.max_grad_norm)
                    self.optimizer.step()
                    with torch.no_grad():
                        approx_kl = ((ratio - 1) - log_ratio).mean().item()
                        stats["clip_fraction"].append(
                            ((ratio - 1).abs() > cfg.clip_range).float().mean().item()
                        )
                    stats["policy_loss"].append(pg_loss.item())
                    stats["value_loss"].append(value_loss.item())
                    stats["entropy"].append(entropy.item())
                    stats["approx_kl"].append(approx_kl)
                    kl_epoch.append(approx_kl)
                if cfg.target_kl is not None and kl_epoch and float(np.mean(kl_epoch)) > 1.5 * cfg.target_kl:
                    break

        if self.obs_norm is not None and feats is not None:
            # Statistics move between rollouts, never inside one, so stored log-probs stay valid.
            self.obs_norm.update(feats.cpu().numpy())
        buf.reset()
        self.updates += 1
        var_ret = b_ret.var().item()
        out = {k: float(np.mean(v)) if v else 0.0 for k, v in stats.items()}
        out["explained_variance"] = (
            float("nan") if var_ret == 0 else 1.0 - (b_ret - b_val).var().item() / var_ret
        )
        out["learning_rate"] = lr
        if not self.discrete:
            out["action_std"] = float(self.net.log_std.exp().mean().item())  # type: ignore[operator]
        return out

    @torch.no_grad()
    def _logp_of(self, obs: Obs, actions: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        n = actions.shape[0]
        parts = []
        for i in range(0, n, chunk):
            o = self._preprocess(flatten_obs_slice(obs, i, i + chunk))
            parts.append(self.net.distribution(o).log_prob(actions[i : i + chunk]))
        return torch.cat(parts)

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "obs_norm": self.obs_norm.state_dict() if self.obs_norm is not None else None,
            "ret_norm": self.ret_norm.state_dict() if self.ret_norm is not None else None,
            "returns": torch.as_tensor(self._returns),
            "generator": self.generator.get_state(),
            "steps_seen": self.steps_seen,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        # Deep copy: torch keeps the given moment tensors, which may belong to a live learner.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if self.obs_norm is not None and state.get("obs_norm") is not None:
            self.obs_norm.load_state_dict(state["obs_norm"])
        if self.ret_norm is not None and state.get("ret_norm") is not None:
            self.ret_norm.load_state_dict(state["ret_norm"])
        returns = state["returns"].numpy()
        if returns.shape == self._returns.shape:
            self._returns = returns
        self.generator.set_state(state["generator"])
        self.steps_seen = int(state["steps_seen"])
        self.updates = int(state["updates"])
        self.buffer.reset()

    def policy(self) -> nn.Module:
        low = high = None
        if isinstance(self.action_space, gym.spaces.Box):
            low, high = self.action_space.low, self.action_space.high
        return DeterministicPolicy(self.net, self.obs_norm, low, high, self.features).eval()


def _truncate(obs: Obs, steps: int) -> Obs:
    return {k: v[:steps] for k, v in obs.items()} if isinstance(obs, dict) else obs[:steps]


def flatten_obs_slice(obs: Obs, start: int, stop: int) -> Obs:
    return {k: v[start:stop] for k, v in obs.items()} if isinstance(obs, dict) else obs[start:stop]


def flatten_obs_index(obs: Obs, idx: torch.Tensor) -> Obs:
    return {k: v[idx] for k, v in obs.items()} if isinstance(obs, dict) else obs[idx]


def _unsqueeze(row: Any) -> Any:
    if isinstance(row, dict):
        return {k: np.asarray(v)[None] for k, v in row.items()}
    return np.asarray(row)[None]


def _as_batch(obs: Any, device: torch.device) -> Obs:
    if isinstance(obs, dict):
        return {k: torch.as_tensor(np.asarray(v), device=device) for k, v in obs.items()}
    return torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device)


def build(
    config: Config,
    observation_space: gym.Space[Any],
    action_space: gym.Space[Any],
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_envs: int = 1,
    total_steps: int | None = None,
) -> PPO:
    return PPO(
        config, observation_space, action_space, device, seed, num_envs=num_envs, total_steps=total_steps
    )
