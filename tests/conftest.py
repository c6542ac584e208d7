"""Shared test setup: small torch thread pools keep the 2-core CI machine responsive."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture
def cartpole_overrides() -> list[str]:
    """A tiny CartPole PPO job for tests that need a real, fast training run."""
    return [
        "environment.num_envs=4",
        "training.rollout_steps=32",
        "training.num_epochs=2",
        "training.batch_size=64",
        "schedule.total_steps=1024",
        "schedule.checkpoint_every=2",
        "torch_threads=1",
    ]
