"""The simulated rover: the reward as the rover design states it, rendering, episode ends."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tether.ingest.rover_sim import RoverWorld, ScriptedDriver, WorldConfig, evaluate_policy, rover_reward


@pytest.mark.parametrize(
    ("lin", "ang", "dist", "safety", "expected"),
    [
        (0.5, 0.0, 3.0, 0.4, 2.0 * 0.5 - 0.01),
        (0.2, -0.8, 3.0, 0.4, 0.4 - 0.4 - 0.01),
        (0.3, 0.5, 0.39, 0.4, 0.6 - 0.25 - 5.0 - 0.01),
        (0.3, 0.5, 0.4, 0.4, 0.6 - 0.25 - 0.01),  # at the safety distance: no penalty (strictly under)
        (-0.5, 1.0, 0.0, 0.25, -1.0 - 0.5 - 5.0 - 0.01),
    ],
)
def test_reward_is_the_rover_formula(
    lin: float, ang: float, dist: float, safety: float, expected: float
) -> None:
    assert rover_reward(lin, ang, dist, safety) == pytest.approx(expected)


def test_frames_have_the_camera_layout() -> None:
    world = RoverWorld(WorldConfig(image_size=(424, 240)), seed=0)
    frame = world.reset()
    assert frame.rgb.shape == (240, 424, 3) and frame.rgb.dtype == np.uint8
    assert frame.depth.shape == (240, 424) and frame.depth.dtype == np.float32
    assert frame.proprio.shape == (6,) and frame.proprio.dtype == np.float32
    # The sky (top rows) has no depth reading; the floor just below the image centre is far, the
    # bottom rows are close; nothing is negative or beyond the sensor's range.
    assert (frame.depth[0] == 0).all()
    assert frame.depth[-1].mean() < frame.depth[130][frame.depth[130] > 0].mean()
    assert frame.depth.min() >= 0 and frame.depth.max() <= world.config.max_range
    assert frame.proprio[4] == pytest.approx(9.81, abs=0.5)  # at rest: gravity only
    assert frame.rgb.std() > 10  # not a blank image


def test_driving_at_a_wall_brings_it_closer_then_ends_the_episode() -> None:
    config = WorldConfig(image_size=(64, 36), num_obstacles=0, noise=0.0)
    world = RoverWorld(config, seed=1)
    world.reset()
    world.pose = np.array([4.0, 4.0, 0.0])  # facing the x = 8 wall, 4 m away
    start = world.observe()
    assert start.proprio[5] == pytest.approx(4.0, abs=0.01)
    centre_before = start.depth[18:, 32].max()
    rewards, terminated = [], False
    for _ in range(200):
        frame, reward, terminated, truncated = world.step(np.array([1.0, 0.0]))
        rewards.append(reward)
        if terminated or truncated:
            break
    assert terminated and not truncated  # hit the wall: the task ended the episode
    assert frame.proprio[5] < config.safety_distance
    assert rewards[0] == pytest.approx(2.0 * 0.5 - 0.01)  # full speed ahead, nothing close
    assert rewards[-1] == pytest.approx(2.0 * 0.5 - 5.0 - 0.01)  # the safety penalty before the hit
    assert frame.depth[:, 32].max() < centre_before


def test_time_limit_truncates() -> None:
    world = RoverWorld(WorldConfig(image_size=(32, 18), max_steps=5), seed=2)
    world.reset()
    ends = [world.step(np.zeros(2))[2:] for _ in range(5)]
    assert ends[:4] == [(False, False)] * 4 and ends[4] == (False, True)


def test_turning_rotates_the_heading_and_costs_reward() -> None:
    world = RoverWorld(WorldConfig(image_size=(32, 18), num_obstacles=0), seed=3)
    world.reset()
    heading = world.pose[2]
    _, reward, _, _ = world.step(np.array([0.0, 1.0]))
    turned = (world.pose[2] - heading + math.pi) % (2 * math.pi) - math.pi
    assert turned == pytest.approx(world.config.max_angular * world.config.dt)
    assert reward == pytest.approx(-0.5 * 1.0 - 0.01)


def test_evaluation_is_repeatable_and_separates_policies() -> None:
    config = WorldConfig(image_size=(32, 18), max_steps=100)
    still = evaluate_policy(lambda f: np.zeros(2), config, [1, 2])
    assert still == pytest.approx([-1.0, -1.0])  # 100 steps of the time cost
    a_driver, b_driver = ScriptedDriver(seed=0, noise=0.0), ScriptedDriver(seed=0, noise=0.0)
    a = evaluate_policy(lambda f: a_driver(f)[0], config, [1, 2])
    b = evaluate_policy(lambda f: b_driver(f)[0], config, [1, 2])
    assert a == b and np.mean(a) > 5.0  # the scripted driver earns something


def test_scripted_driver_has_no_log_prob_and_stays_in_range() -> None:
    world = RoverWorld(WorldConfig(image_size=(32, 18)), seed=4)
    driver = ScriptedDriver(seed=1)
    frame = world.reset()
    for _ in range(20):
        action, log_prob = driver(frame)
        assert log_prob is None and action.shape == (2,) and np.abs(action).max() <= 1.0
        frame, *_ = world.step(action)
