"""PPO learns for real: CartPole-v1 to a mean return ≥ 475 within 100k steps."""

import pytest

from tether.config import load_config
from tether.evaluate import evaluate
from tether.trainer import Trainer

pytestmark = [pytest.mark.learning, pytest.mark.slow]


def test_ppo_solves_cartpole_within_100k_steps(tmp_path):
    config, _ = load_config("cartpole", ["schedule.total_steps=100000", "torch_threads=1"])
    trainer = Trainer(config, tmp_path / "run")
    result = trainer.run()
    assert result.steps <= 100_000 + config.environment.num_envs
    score = evaluate(trainer.learner, config, episodes=20)
    assert score.mean_return >= 475, score
