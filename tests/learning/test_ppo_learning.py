"""PPO learns for real: CartPole-v1 to a mean return ≥ 475 within 100k steps. The run evaluates the
greedy policy every 10k steps and stops once 20 episodes all reach 500; the score asserted is a
separate evaluation on other episodes."""

import pytest

from tether.config import load_config
from tether.evaluate import evaluate
from tether.trainer import Trainer

pytestmark = [pytest.mark.learning, pytest.mark.slow]


def test_ppo_solves_cartpole_within_100k_steps(tmp_path, stop_early):
    config, _ = load_config("cartpole", ["schedule.total_steps=100000", *stop_early(10000, 500)])
    trainer = Trainer(config, tmp_path / "run")
    result = trainer.run()
    assert result.steps <= 100_000 + config.environment.num_envs
    score = evaluate(trainer.learner, config, episodes=20)
    assert score.mean_return >= 475, score
