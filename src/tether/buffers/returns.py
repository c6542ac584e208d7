"""Return estimators as pure functions over (T, N) arrays."""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a (T, N) rollout.

    `next_values[t]` is V(s_{t+1}) of the true successor (the final observation at an episode end);
    it is cut where the episode *terminated*, and the recursion is cut wherever the episode ended
    (terminated or truncated), so truncated steps bootstrap from their final observation.
    Returns (advantages, returns), both (T, N).
    """
    steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    not_terminal = 1.0 - terminated.to(rewards.dtype)
    not_done = 1.0 - done.to(rewards.dtype)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(steps)):
        delta = rewards[t] + gamma * next_values[t] * not_terminal[t] - values[t]
        last = delta + gamma * lam * not_done[t] * last
        advantages[t] = last
    return advantages, advantages + values
