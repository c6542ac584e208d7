import numpy as np
import torch

from tether.buffers.returns import gae


def reference_gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Plain-Python GAE, one env at a time, written from the definition."""
    steps, n = len(rewards), len(rewards[0])
    adv = [[0.0] * n for _ in range(steps)]
    for i in range(n):
        running = 0.0
        for t in reversed(range(steps)):
            bootstrap = 0.0 if terminated[t][i] else next_values[t][i]
            delta = rewards[t][i] + gamma * bootstrap - values[t][i]
            ended = terminated[t][i] or truncated[t][i]
            running = delta + (0.0 if ended else gamma * lam * running)
            adv[t][i] = running
    return adv


def test_gae_matches_reference_with_termination_and_truncation():
    rng = np.random.default_rng(0)
    steps, n = 17, 5
    rewards = rng.normal(size=(steps, n))
    values = rng.normal(size=(steps, n))
    next_values = rng.normal(size=(steps, n))
    terminated = rng.random((steps, n)) < 0.1
    truncated = (rng.random((steps, n)) < 0.1) & ~terminated
    adv, ret = gae(
        torch.tensor(rewards),
        torch.tensor(values),
        torch.tensor(next_values),
        torch.tensor(terminated),
        torch.tensor(terminated | truncated),
        0.97,
        0.9,
    )
    expected = np.array(reference_gae(rewards, values, next_values, terminated, truncated, 0.97, 0.9))
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), expected + values, rtol=1e-12, atol=1e-12)


def test_truncated_step_bootstraps_from_final_value_terminated_does_not():
    rewards = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[0.0, 0.0]])
    next_values = torch.tensor([[10.0, 10.0]])
    terminated = torch.tensor([[False, True]])
    done = torch.tensor([[True, True]])  # env 0 truncated, env 1 terminated
    adv, _ = gae(rewards, values, next_values, terminated, done, 0.5, 1.0)
    assert adv[0, 0].item() == 1.0 + 0.5 * 10.0
    assert adv[0, 1].item() == 1.0
