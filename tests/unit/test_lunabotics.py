"""The Lunabotics env: API, rules, rewards, collisions, determinism and solvability."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from tether.config import ConfigError, EnvironmentConfig
from tether.envs import (
    LUNABOTICS_ID,
    final_observations,
    make_single_env,
    make_vector_env,
    validate_environment,
)
from tether.envs.lunabotics import (
    EVENT_KEYS,
    OBS_DIM,
    OBS_NAMES,
    ZONE_BERM,
    ZONE_CONSTRUCTION,
    ZONE_EXCAVATION,
    ZONE_OBSTACLE,
    ZONE_OPEN,
    ZONE_START,
    LunaboticsConfig,
    LunaboticsCore,
    LunaboticsEnv,
    LunaboticsRewards,
    LunaboticsVectorEnv,
)

IDLE = np.array([0.0, 0.0, 0.0], np.float32)
FORWARD = np.array([1.0, 0.0, 0.0], np.float32)
DIG = np.array([0.0, 0.0, 1.0], np.float32)


def only(term: str, value: float = 1.0) -> LunaboticsRewards:
    """Rewards with every term zero except `term`."""
    zero = {name: 0.0 for name in LunaboticsRewards.model_fields}
    zero[term] = value
    return LunaboticsRewards(**zero)


def bare_env(rewards: LunaboticsRewards | None = None, **cfg: float) -> LunaboticsEnv:
    """A reset single env with every obstacle and orb removed, so tests place their own."""
    env = LunaboticsEnv(LunaboticsConfig(**cfg), rewards)
    env.reset(seed=0)
    clear(env.core)
    return env


def clear(core: LunaboticsCore, i: int = 0) -> None:
    core.clear_objects(i)


def put_obstacle(core: LunaboticsCore, x: float, y: float, r: float, j: int = 0, i: int = 0) -> None:
    core.put_obstacle(i, j, x, y, r)


def put_orb(core: LunaboticsCore, x: float, y: float, j: int = 0, i: int = 0) -> None:
    core.put_orb(i, j, x, y)


# --------------------------------------------------------------------------- configuration


def test_config_defaults_and_reward_defaults() -> None:
    cfg = LunaboticsConfig()
    assert (cfg.world_width, cfg.world_height, cfg.max_speed, cfg.num_rocks, cfg.num_orbs) == (
        6.8,
        5.0,
        2.0,
        7,
        15,
    )
    assert cfg.dt == pytest.approx(1 / 60) and cfg.frame_skip == 4
    assert LunaboticsRewards().model_dump() == {
        "time_step": -0.01,
        "reach_excavation_zone": 10.0,
        "collect_orb": 50.0,
        "reach_construction_zone_with_orb": 100.0,
        "deposit_orb": 200.0,
        "collision_obstacle": -10.0,
        "collision_wall": -5.0,
        "progress_toward_excavation": 1.0,
        "progress_toward_construction": 2.0,
    }


@pytest.mark.parametrize(
    "options",
    [{"max_sped": 2.0}, {"max_speed": 0}, {"max_speed": -1}, {"frame_skip": 0}, {"num_orbs": 65},
     {"rock_radius_min": 0.3, "rock_radius_max": 0.2}, {"sensor_fov": 7.0}, {"dt": "fast"}],
)  # fmt: skip
def test_bad_env_options_are_config_errors(options: dict[str, object]) -> None:
    env_cfg = EnvironmentConfig(id=LUNABOTICS_ID, **options)
    with pytest.raises(ConfigError):
        validate_environment(env_cfg, {})


def test_bad_reward_terms_are_config_errors() -> None:
    env_cfg = EnvironmentConfig(id=LUNABOTICS_ID)
    with pytest.raises(ConfigError, match="unknown reward term"):
        validate_environment(env_cfg, {"deposit": 1.0})
    with pytest.raises(ConfigError):
        validate_environment(env_cfg, {"deposit_orb": "lots"})


def test_factory_builds_both_views_with_options() -> None:
    env_cfg = EnvironmentConfig(id=LUNABOTICS_ID, num_envs=3, max_steps_per_episode=40, num_orbs=4)
    vec = make_vector_env(env_cfg, {"deposit_orb": 123.0})
    assert isinstance(vec, LunaboticsVectorEnv) and vec.num_envs == 3
    assert vec.config.max_steps_per_episode == 40 and vec.config.num_orbs == 4
    assert vec.rewards.deposit_orb == 123.0
    single = make_single_env(env_cfg, render_mode="rgb_array")
    assert isinstance(single, LunaboticsEnv) and single.render_mode == "rgb_array"
    assert gym.make(LUNABOTICS_ID).unwrapped.__class__ is LunaboticsEnv


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ConfigError):
        LunaboticsVectorEnv(0)
    with pytest.raises(ConfigError):
        LunaboticsEnv(render_mode="human")


# --------------------------------------------------------------------------- API


def test_check_env_passes() -> None:
    env = gym.make(LUNABOTICS_ID, render_mode="rgb_array")
    check_env(env.unwrapped)


def test_spaces_and_info_shapes() -> None:
    vec = LunaboticsVectorEnv(5)
    assert vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    assert vec.single_observation_space.shape == (OBS_DIM,) and len(OBS_NAMES) == OBS_DIM
    assert vec.observation_space.shape == (5, OBS_DIM) and vec.action_space.shape == (5, 3)
    assert np.all(np.isfinite(vec.single_observation_space.low))
    assert np.all(np.isfinite(vec.single_observation_space.high))
    obs, info = vec.reset(seed=1)
    assert obs.shape == (5, OBS_DIM) and obs.dtype == np.float32
    obs, rew, term, trunc, info = vec.step(vec.action_space.sample())
    assert rew.shape == (5,) and term.dtype == bool and trunc.dtype == bool
    for key in EVENT_KEYS:
        assert info[key].shape == (5,) and info[key].dtype == bool
    assert info["final_obs"].shape == (5, OBS_DIM) and info["final_obs"].dtype == np.float32
    assert info["_final_obs"].dtype == bool


def test_step_before_reset_and_bad_actions_raise() -> None:
    with pytest.raises(RuntimeError):
        LunaboticsVectorEnv(2).step(np.zeros((2, 3)))
    with pytest.raises(RuntimeError):
        LunaboticsEnv().step(IDLE)
    vec = LunaboticsVectorEnv(2)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        vec.step(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        vec.step(np.array([[0.0, np.nan, 0.0], [0.0, 0.0, 0.0]]))


def test_actions_are_clipped_to_bounds() -> None:
    a, b = bare_env(), bare_env()
    a.core.place_rover(0, 1.0, 2.5, 0.0)
    b.core.place_rover(0, 1.0, 2.5, 0.0)
    for _ in range(5):
        oa = a.step(np.array([7.0, -9.0, 3.0]))[0]
        ob = b.step(np.array([1.0, -1.0, 1.0]))[0]
        assert np.array_equal(oa, ob)


def test_observation_stays_in_space_under_random_driving() -> None:
    vec = LunaboticsVectorEnv(64, LunaboticsConfig(max_steps_per_episode=60))
    space = vec.single_observation_space
    obs, _ = vec.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(100):
        action = rng.uniform(-1.5, 1.5, size=(64, 3))
        action[:, 0] = np.sign(action[:, 0])  # full speed into things
        obs, _, _, _, info = vec.step(action)
        assert np.all((obs >= space.low) & (obs <= space.high))
        finals = info["final_obs"][info["_final_obs"]]
        assert np.all((finals >= space.low) & (finals <= space.high))


# --------------------------------------------------------------------------- layout and zones


def test_layout_invariants() -> None:
    vec = LunaboticsVectorEnv(400)
    vec.reset(seed=11)
    core, cfg = vec.core, vec.config
    assert np.all(core.zone == ZONE_START)
    assert np.all(np.abs(core.theta) <= cfg.start_heading_range + 1e-9)
    placed = core.obs_r > 0
    assert placed.sum(axis=0).mean() > 6.5  # nearly always all 7
    zx0, zy0, zx1, zy1 = core.zones[ZONE_OBSTACLE]
    r = core.obs_r
    assert np.all(((core.obs_x - r >= zx0 - 1e-5) & (core.obs_x + r <= zx1 + 1e-5))[placed])
    assert np.all(((core.obs_y - r >= zy0 - 1e-5) & (core.obs_y + r <= zy1 + 1e-5))[placed])
    # Obstacles near the top wall sit against it: no slot narrower than the gap.
    top_gap = cfg.world_height - (core.obs_y + r)
    assert np.all(((top_gap < 1e-5) | (top_gap >= cfg.obstacle_gap - 1e-5))[placed])
    for i in range(core.k):
        for j in range(i):
            both = placed[i] & placed[j]
            gap = np.hypot(core.obs_x[i] - core.obs_x[j], core.obs_y[i] - core.obs_y[j]) - r[i] - r[j]
            assert np.all(gap[both] >= cfg.obstacle_gap - 1e-5)  # float32 storage
    ex0, _, ex1, _ = core.zones[ZONE_EXCAVATION]
    assert np.all((core.orb_x > ex0) & (core.orb_x < ex1)) and core.orb_on_ground.all()


@pytest.mark.parametrize(
    ("x", "y", "zone"),
    [(1.0, 1.0, ZONE_START), (1.5, 3.2, ZONE_CONSTRUCTION), (0.5, 4.0, ZONE_BERM), (3.5, 2.5, ZONE_OBSTACLE),
     (6.0, 2.5, ZONE_EXCAVATION), (1.0, 2.5, ZONE_OPEN), (2.1, 1.0, ZONE_OPEN), (3.5, 1.0, ZONE_OPEN)],
)  # fmt: skip
def test_zone_detection(x: float, y: float, zone: int) -> None:
    env = bare_env()
    env.core.place_rover(0, x, y)
    obs, *_ = env.step(IDLE)
    assert obs[6] == zone
    assert env.step(IDLE)[4]["success"] is False


# --------------------------------------------------------------------------- sensor through the env


def test_env_sensor_reports_obstacles_and_orbs_relative_to_the_rover() -> None:
    env = bare_env()
    core = env.core
    core.place_rover(0, 5.5, 2.5, math.pi / 2)  # facing +y
    put_obstacle(core, 5.5, 4.0, 0.3, j=0)  # straight ahead, edge 1.2 m away
    put_obstacle(core, 5.5, 1.0, 0.3, j=1)  # behind: not seen
    put_orb(core, 5.0, 3.0, j=0)  # ahead-left
    put_orb(core, 6.0, 3.0, j=1)  # ahead-right, same distance
    put_orb(core, 5.5, 2.7, j=2)  # nearest, straight ahead
    obs, *_ = env.step(IDLE)
    assert obs[8] == pytest.approx(1.2, abs=1e-5) and obs[9] == pytest.approx(0.0, abs=1e-6)
    assert obs[10] == -1.0 and obs[11] == 0.0
    orb_d, orb_a = obs[18:28:2], obs[19:28:2]
    assert orb_d[:3].tolist() == pytest.approx([0.2, math.hypot(0.5, 0.5), math.hypot(0.5, 0.5)], abs=1e-5)
    assert orb_a[0] == pytest.approx(0.0, abs=1e-6)
    assert sorted(orb_a[1:3].tolist()) == pytest.approx([-math.pi / 4, math.pi / 4], abs=1e-5)
    assert orb_d[3] == -1.0


# --------------------------------------------------------------------------- rewards


def test_time_step_reward_when_nothing_happens() -> None:
    env = bare_env(only("time_step", -0.25))
    env.core.place_rover(0, 1.0, 2.5)
    _, reward, term, trunc, info = env.step(IDLE)
    assert reward == pytest.approx(-0.25) and not term and not trunc
    assert not any(info[k] for k in EVENT_KEYS)


def test_progress_toward_excavation_is_the_decrease_in_distance() -> None:
    env = bare_env(only("progress_toward_excavation", 3.0))
    core = env.core
    core.place_rover(0, 3.0, 2.5, 0.0)
    before = core.dist_excavation[0]
    _, r1, *_ = env.step(FORWARD)
    moved = before - core.dist_excavation[0]
    assert moved > 0 and r1 == pytest.approx(3.0 * moved)
    core.place_rover(0, 3.0, 2.5, math.pi)  # now drive away
    _, r2, *_ = env.step(FORWARD)
    assert r2 < 0


def test_progress_toward_construction_only_while_holding() -> None:
    env = bare_env(only("progress_toward_construction", 2.0))
    core = env.core
    core.place_rover(0, 3.0, 3.5, math.pi)  # facing -x, towards the construction zone
    _, r_empty, *_ = env.step(FORWARD)
    assert r_empty == 0.0
    core.holding[0] = True
    core.place_rover(0, 3.0, 3.5, math.pi)
    before = core.dist_construction[0]
    _, r_holding, *_ = env.step(FORWARD)
    assert r_holding == pytest.approx(2.0 * (before - core.dist_construction[0])) and r_holding > 0


def test_reach_excavation_zone_pays_once_per_episode() -> None:
    env = bare_env(only("reach_excavation_zone", 10.0))
    core = env.core
    core.place_rover(0, 4.7, 2.5, 0.0)
    total = 0.0
    for _ in range(6):
        total += env.step(FORWARD)[1]
    assert core.zone[0] == ZONE_EXCAVATION and total == pytest.approx(10.0)
    core.place_rover(0, 4.7, 2.5, 0.0)  # leave and come back: no second bonus
    assert sum(env.step(FORWARD)[1] for _ in range(6)) == 0.0
    env.reset(seed=1)  # a new episode pays again
    clear(env.core)
    env.core.place_rover(0, 4.7, 2.5, 0.0)
    assert sum(env.step(FORWARD)[1] for _ in range(6)) == pytest.approx(10.0)


def test_collect_orb_needs_dig_radius_excavation_zone_and_free_hands() -> None:
    env = bare_env(only("collect_orb", 50.0))
    core = env.core
    core.place_rover(0, 5.5, 2.5)
    put_orb(core, 5.5 + core.cfg.dig_radius + 0.05, 2.5, j=0)  # just out of reach
    _, reward, _, _, info = env.step(DIG)
    assert reward == 0.0 and not info["collected"] and not core.holding[0]
    put_orb(core, 5.8, 2.6, j=1)
    obs, reward, _, _, info = env.step(IDLE)  # no dig, no collect
    assert reward == 0.0 and obs[7] == 0.0
    obs, reward, _, _, info = env.step(DIG)
    assert reward == 50.0 and info["collected"] and obs[7] == 1.0
    assert not core.orb_on_ground[1, 0] and core.orb_on_ground[0, 0]
    # Orb sensor no longer reports the collected orb.
    assert np.all(obs[18:28:2][obs[18:28:2] >= 0] > 0.3)
    # Holding one: digging again next to another orb collects nothing.
    put_orb(core, 5.6, 2.5, j=2)
    _, reward, _, _, info = env.step(DIG)
    assert reward == 0.0 and not info["collected"]
    # Outside the excavation zone an orb in reach cannot be dug.
    env2 = bare_env(only("collect_orb", 50.0))
    env2.core.place_rover(0, 4.5, 2.5)
    put_orb(env2.core, 4.6, 2.5)
    assert env2.step(DIG)[1] == 0.0


def test_collect_takes_the_nearest_orb_in_reach() -> None:
    env = bare_env()
    core = env.core
    core.place_rover(0, 5.5, 2.5)
    put_orb(core, 5.8, 2.5, j=0)
    put_orb(core, 5.6, 2.5, j=1)
    env.step(DIG)
    assert core.orb_on_ground[:2, 0].tolist() == [True, False]


def test_construction_bonus_once_per_carried_orb() -> None:
    env = bare_env(only("reach_construction_zone_with_orb", 100.0))
    core = env.core
    core.place_rover(0, 2.1, 3.5, math.pi)
    assert env.step(FORWARD)[1] + env.step(FORWARD)[1] == 0.0  # without an orb: nothing
    core.holding[0] = True
    core.place_rover(0, 2.1, 3.5, math.pi)
    total = sum(env.step(FORWARD)[1] for _ in range(5))
    assert core.zone[0] == ZONE_CONSTRUCTION and total == pytest.approx(100.0)
    core.place_rover(0, 2.1, 3.5, math.pi)  # same orb, enters again: no second bonus
    assert sum(env.step(FORWARD)[1] for _ in range(5)) == 0.0


def test_deposit_pays_terminates_and_marks_success() -> None:
    env = bare_env(only("deposit_orb", 200.0))
    core = env.core
    core.place_rover(0, 1.0, 4.0)
    _, reward, term, _, info = env.step(DIG)
    assert reward == 0.0 and not term and not info["deposited"]  # nothing to deposit
    core.holding[0] = True
    _, reward, term, trunc, info = env.step(IDLE)
    assert reward == 0.0 and not term
    _, reward, term, trunc, info = env.step(DIG)
    assert reward == 200.0 and term and not trunc and info["deposited"] and info["success"]
    assert not core.holding[0]


def test_deposit_outside_construction_zone_does_nothing() -> None:
    env = bare_env(only("deposit_orb", 200.0))
    env.core.place_rover(0, 3.5, 2.5)
    env.core.holding[0] = True
    _, reward, term, _, info = env.step(DIG)
    assert reward == 0.0 and not term and not info["deposited"] and env.core.holding[0]


def test_more_deposits_to_finish_keeps_the_episode_going() -> None:
    env = bare_env(only("deposit_orb", 1.0), deposits_to_finish=2)
    core = env.core
    core.place_rover(0, 1.0, 4.0)
    core.holding[0] = True
    _, _, term, _, info = env.step(DIG)
    assert not term and info["success"] and core.deposits[0] == 1
    core.holding[0] = True
    assert env.step(DIG)[2] is True


def test_truncation_at_max_steps() -> None:
    env = LunaboticsEnv(LunaboticsConfig(max_steps_per_episode=7))
    env.reset(seed=0)
    flags = [env.step(IDLE)[2:4] for _ in range(7)]
    assert flags[:-1] == [(False, False)] * 6 and flags[-1] == (False, True)


# --------------------------------------------------------------------------- collisions


def test_driving_into_a_rock_pushes_out_and_penalises_once() -> None:
    env = bare_env(only("collision_obstacle", -10.0))
    core = env.core
    put_obstacle(core, 3.5, 2.5, 0.3)
    core.place_rover(0, 2.4, 2.5, 0.0)  # 0.5 m gap ahead, driving straight at it
    rewards, events = [], []
    for _ in range(30):
        _, r, _, _, info = env.step(FORWARD)
        rewards.append(r)
        events.append(info["collision_obstacle"])
        depth = 0.3 - (3.5 - core.x[0] - core.cfg.rover_half_length)
        assert depth < 0.04  # never deeper than one substep of travel
    assert sum(events) >= 1 and sum(rewards) == pytest.approx(-10.0 * sum(events))
    # After bouncing it settles pressed against the rock: one continuous contact, so the
    # number of events is far below the number of steps spent in contact.
    assert sum(events) <= 3 and core.contact_obstacle[0]
    assert 3.5 - core.x[0] - core.cfg.rover_half_length >= 0.3 - 1e-3


def test_resting_contact_is_not_a_new_collision() -> None:
    env = bare_env(only("collision_obstacle", -10.0))
    core = env.core
    put_obstacle(core, 3.5, 2.5, 0.3)
    core.place_rover(0, 3.5 - 0.3 - 0.3 - 0.02, 2.5, 0.0)  # 2 cm gap
    rewards = [env.step(np.array([0.05, 0.0, 0.0]))[1] for _ in range(40)]  # creep into it
    assert rewards.count(-10.0) == 1


def test_driving_into_a_wall_pushes_out_and_penalises_once() -> None:
    env = bare_env(only("collision_wall", -5.0))
    core = env.core
    core.place_rover(0, 1.0, 2.5, math.pi)  # facing the left wall, 0.7 m away
    rewards, events = [], []
    for _ in range(30):
        _, r, _, _, info = env.step(FORWARD)
        rewards.append(r)
        events.append(info["collision_wall"])
        assert core.x[0] >= core.cfg.rover_half_length - 1e-9  # never through the wall
    assert 1 <= sum(events) <= 3 and sum(rewards) == pytest.approx(-5.0 * sum(events))
    assert core.x[0] == pytest.approx(core.cfg.rover_half_length, abs=2e-3)


def test_bounce_reverses_the_normal_velocity() -> None:
    def coast_into_wall(restitution: float) -> float:
        env = bare_env(restitution=restitution)
        core = env.core
        core.place_rover(0, 0.6, 2.5, math.pi)
        core.vx[0] = -2.0  # moving at full speed towards the left wall, 0.3 m away
        for _ in range(10):
            if env.step(IDLE)[4]["collision_wall"]:  # coasting: the drive brakes, the wall bounces
                return float(core.vx[0])
        raise AssertionError("never reached the wall")

    assert coast_into_wall(0.5) > 0.3  # bounced back out
    assert coast_into_wall(0.0) >= 0.0  # stopped dead, no bounce
    assert coast_into_wall(0.0) < coast_into_wall(0.5)


def test_turning_against_a_wall_keeps_the_rover_inside() -> None:
    env = bare_env()
    core = env.core
    core.place_rover(0, core.cfg.rover_half_length + 0.001, 2.5, math.pi)
    for _ in range(20):
        env.step(np.array([0.0, 1.0, 0.0]))
        ex = core.cfg.rover_half_length * abs(core.cos_h[0]) + core.cfg.rover_half_width * abs(core.sin_h[0])
        assert core.x[0] >= ex - 1e-9


# --------------------------------------------------------------------------- determinism


def _rollout_single(seed: int, actions: np.ndarray, cfg: LunaboticsConfig) -> list[tuple]:
    env = LunaboticsEnv(cfg)
    env.reset(seed=seed)
    out = []
    for a in actions:
        nobs, r, term, trunc, info = env.step(a)
        if term or trunc:
            final = nobs
            nobs, _ = env.reset()
        else:
            final = None
        out.append((nobs, r, term, trunc, final, info))
    return out


def test_batched_and_single_trajectories_are_identical_across_autoresets() -> None:
    cfg = LunaboticsConfig(max_steps_per_episode=25)
    n, steps = 4, 70
    rng = np.random.default_rng(5)
    actions = rng.uniform(-1, 1, size=(steps, n, 3)).astype(np.float32)
    actions[:, :, 0] = np.abs(actions[:, :, 0])  # mostly forward so collisions happen
    vec = LunaboticsVectorEnv(n, cfg)
    vec_obs0, _ = vec.reset(seed=40)
    batched = [vec.step(actions[t]) for t in range(steps)]
    resets = 0
    for i in range(n):
        single0, _ = LunaboticsEnv(cfg).reset(seed=40 + i)
        assert np.array_equal(single0, vec_obs0[i])
        for t, (obs, r, term, trunc, final, info) in enumerate(_rollout_single(40 + i, actions[:, i], cfg)):
            b_obs, b_r, b_term, b_trunc, b_info = batched[t]
            assert np.array_equal(obs, b_obs[i]), (i, t)
            assert r == b_r[i] and term == b_term[i] and trunc == b_trunc[i]
            for key in EVENT_KEYS:
                assert info[key] == b_info[key][i]
            assert b_info["_final_obs"][i] == (final is not None)
            if final is not None:
                resets += 1
                assert np.array_equal(final, b_info["final_obs"][i])
    assert resets >= n * 2


def test_reset_seed_list_and_determinism() -> None:
    a = LunaboticsVectorEnv(3)
    b = LunaboticsVectorEnv(3)
    oa, _ = a.reset(seed=7)
    ob, _ = b.reset(seed=[7, 8, 9])
    assert np.array_equal(oa, ob)
    rng = np.random.default_rng(0)
    for _ in range(30):
        act = rng.uniform(-1, 1, (3, 3))
        sa, sb = a.step(act), b.step(act)
        assert np.array_equal(sa[0], sb[0]) and np.array_equal(sa[1], sb[1])
    c = LunaboticsVectorEnv(3)
    assert not np.array_equal(c.reset(seed=8)[0], oa)
    with pytest.raises(ValueError):
        c.reset(seed=[1, 2])
    # Unseeded resets continue each arena's own stream: two resets give new layouts.
    first = a.reset()[0]
    assert not np.array_equal(first, a.reset()[0])


def test_final_obs_and_mask_at_autoreset() -> None:
    cfg = LunaboticsConfig(max_steps_per_episode=3)
    vec = LunaboticsVectorEnv(2, cfg)
    vec.reset(seed=0)
    before = None
    for t in range(3):
        obs, _, _, trunc, info = vec.step(np.zeros((2, 3)))
        if t < 2:
            assert not info["_final_obs"].any()
            before = obs
    assert trunc.all() and info["_final_obs"].all()
    # Idle rover: the final obs is the pose it stood at; the new first obs matches a fresh env.
    assert np.array_equal(info["final_obs"][:, :2], before[:, :2])
    assert not np.array_equal(info["final_obs"], obs)
    single = LunaboticsEnv(cfg)
    single.reset(seed=1)
    assert np.array_equal(single.reset()[0], obs[1])
    assert np.array_equal(final_observations(obs, info), info["final_obs"])


# --------------------------------------------------------------------------- render


def test_render_rgb_array() -> None:
    env = LunaboticsEnv(render_mode="rgb_array")
    env.reset(seed=0)
    img = env.render()
    cfg = env.config
    assert (
        img.shape == (round(cfg.world_height * 100), round(cfg.world_width * 100), 3)
        and img.dtype == np.uint8
    )
    packed = (img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8) | img[..., 2]
    assert len(np.unique(packed)) > 5  # zones, cone, objects and rover are drawn
    vec = LunaboticsVectorEnv(2, render_mode="rgb_array")
    vec.reset(seed=0)
    assert vec.render().shape == img.shape
    assert LunaboticsEnv().render() is None


# --------------------------------------------------------------------------- solvability


def heuristic_actions(core: LunaboticsCore) -> np.ndarray:
    """Drive to the nearest orb, dig, drive to the construction zone, dig; steer around obstacles
    with a potential field. Vectorised over arenas; reads the simulator state directly."""
    n = core.n
    cols = np.arange(n)
    x, y = core.x, core.y
    orb_d = np.where(core.orb_on_ground, np.hypot(core.orb_x - x, core.orb_y - y), np.inf)
    j = np.argmin(orb_d, axis=0)
    cx0, cy0, cx1, _ = core.zones[ZONE_CONSTRUCTION]
    tx = np.where(core.holding, (cx0 + cx1) / 2, core.orb_x[j, cols])
    ty = np.where(core.holding, cy0 + 0.6, core.orb_y[j, cols])
    dist = np.hypot(tx - x, ty - y)
    ax, ay = (tx - x) / np.maximum(dist, 1e-6), (ty - y) / np.maximum(dist, 1e-6)
    dx, dy = x - core.obs_x, y - core.obs_y
    dc = np.maximum(np.hypot(dx, dy), 1e-6)
    edge = dc - core.obs_r - 0.3
    w = np.where((core.obs_r > 0) & (edge < 0.7), (0.7 - np.maximum(edge, 0.02)) / 0.7 * 2.5, 0.0)
    nx, ny = dx / dc, dy / dc
    side = np.where(-ny * ax + nx * ay >= 0, 1.0, -1.0)  # slide round on the goal's side
    vx = ax + (w * (0.6 * nx - side * ny)).sum(axis=0)
    vy = ay + (w * (0.6 * ny + side * nx)).sum(axis=0)
    err = np.arctan2(vy, vx) - core.theta
    err = (err + np.pi) % (2 * np.pi) - np.pi
    lin = np.maximum(np.cos(err), 0.0) * np.where(dist > 0.6, 1.0, 0.5)
    in_con = (core.zone == ZONE_CONSTRUCTION) | (core.zone == ZONE_BERM)
    dig = (~core.holding & (core.zone == ZONE_EXCAVATION) & (dist < 0.9 * core.cfg.dig_radius)) | (
        core.holding & in_con
    )
    return np.stack([lin, np.clip(2.5 * err, -1, 1), dig.astype(float)], axis=1)


def test_heuristic_controller_solves_most_episodes_within_the_step_limit() -> None:
    n = 150
    vec = LunaboticsVectorEnv(n)
    vec.reset(seed=2024)
    finished = np.zeros(n, bool)
    success = np.zeros(n, bool)
    returns = np.zeros(n)
    for _ in range(vec.config.max_steps_per_episode):
        _, reward, term, trunc, info = vec.step(heuristic_actions(vec.core))
        returns[~finished] += reward[~finished]
        done = (term | trunc) & ~finished
        success[done] = info["success"][done]
        finished |= term | trunc
    assert finished.all()
    assert success.mean() >= 0.9
    assert returns[success].mean() > 300  # bonuses 10 + 50 + 100 + 200 minus small costs


def test_carry_start_curriculum_starts_some_rovers_holding_in_the_excavation_zone() -> None:
    plain = LunaboticsVectorEnv(64, LunaboticsConfig())
    curriculum = LunaboticsVectorEnv(64, LunaboticsConfig(carry_start_fraction=0.5))
    obs_plain, _ = plain.reset(seed=11)
    obs_cur, _ = curriculum.reset(seed=11)
    carrying = obs_cur[:, 7] == 1.0
    assert 16 <= carrying.sum() <= 48  # about half of 64
    assert np.all(obs_cur[carrying, 6] == ZONE_EXCAVATION)
    assert not obs_plain[:, 7].any()
    # The layout of an arena does not depend on the curriculum; rovers that start normally match.
    np.testing.assert_array_equal(plain.core.obs_x, curriculum.core.obs_x)
    np.testing.assert_array_equal(plain.core.orb_x, curriculum.core.orb_x)
    np.testing.assert_array_equal(obs_plain[~carrying], obs_cur[~carrying])
    # A carried orb starts the return leg: no excavation bonus, progress shaping toward construction.
    row = int(np.flatnonzero(carrying)[0])
    west = np.zeros((64, 3), np.float32)
    curriculum.core.set_heading(np.array([row]), math.pi)
    curriculum.core.refresh_distances()
    _, reward, *_ = curriculum.step(west + np.array([1.0, 0.0, 0.0], np.float32))
    assert reward[row] > 0.0


def test_route_curriculum_starts_rovers_all_along_the_obstacle_free_way_home() -> None:
    from tether.envs.lunabotics_physics import distance_to_rect

    cfg = LunaboticsConfig(carry_start_fraction=1.0, carry_start_region="route")
    env = LunaboticsVectorEnv(2000, cfg)
    obs, _ = env.reset(seed=3)
    x, y = obs[:, 0].astype(np.float64), obs[:, 1].astype(np.float64)
    assert obs[:, 7].all()
    core = env.core
    edge = math.hypot(cfg.rover_half_length, cfg.rover_half_width)
    assert x.min() > edge and y.min() > edge and x.max() < cfg.world_width - edge and y.max() < 5.0 - edge
    # Never inside the grown obstacle zone (no start touches a rock) nor already home.
    assert distance_to_rect(x, y, core.zones[ZONE_OBSTACLE]).min() >= cfg.obstacle_zone_clearance - 1e-6
    assert not np.isin(obs[:, 6], [ZONE_CONSTRUCTION, ZONE_BERM]).any()
    # Every part of the way home gets starts: the lane, the left side below the construction zone
    # and the excavation zone.
    lane = y < 1.4
    left = (x < 1.8) & (y >= 1.4)
    assert lane.mean() > 0.2 and left.mean() > 0.05 and (obs[:, 6] == ZONE_EXCAVATION).mean() > 0.2
    # Same seed, same starts: the draws are the same fixed block as the excavation curriculum's.
    again, _ = LunaboticsVectorEnv(2000, cfg).reset(seed=3)
    np.testing.assert_array_equal(obs, again)


def test_empty_start_curriculum_starts_rovers_empty_handed_on_the_way() -> None:
    both = LunaboticsConfig(carry_start_fraction=0.25, empty_start_fraction=0.25, carry_start_region="route")
    obs, _ = LunaboticsVectorEnv(2000, both).reset(seed=5)
    obs_carry, _ = LunaboticsVectorEnv(2000, both.model_copy(update={"empty_start_fraction": 0.0})).reset(
        seed=5
    )
    obs_plain, _ = LunaboticsVectorEnv(2000, LunaboticsConfig()).reset(seed=5)
    holding = obs[:, 7] == 1.0
    moved = (obs[:, :2] != obs_plain[:, :2]).any(axis=1)  # not where a plain reset puts the rover
    empty_on_the_way = moved & ~holding
    assert 0.2 < holding.mean() < 0.3 and 0.2 < empty_on_the_way.mean() < 0.3
    # The carried starts are those of the carry-only curriculum (same draws); the rest start as
    # without a curriculum.
    np.testing.assert_array_equal(holding, obs_carry[:, 7] == 1.0)
    np.testing.assert_array_equal(obs[holding], obs_carry[holding])
    np.testing.assert_array_equal(obs[~moved], obs_plain[~moved])
    # The empty-handed starts lie on the way out: the lane or the excavation zone, not the left
    # side, which leads only home.
    x, y = obs[empty_on_the_way, 0], obs[empty_on_the_way, 1]
    lane, excavation = y < 1.4, obs[empty_on_the_way, 6] == ZONE_EXCAVATION
    assert (lane | excavation).all() and lane.mean() > 0.3 and excavation.mean() > 0.2
    assert not ((x < 1.4) & (y >= 1.4)).any()
    assert ((obs[holding, 0] < 1.4) & (obs[holding, 1] >= 1.4)).any()  # carried ones start there too
    with pytest.raises(ValueError, match="at most 1"):
        LunaboticsConfig(carry_start_fraction=0.6, empty_start_fraction=0.5)


def test_evaluation_environment_drops_the_curriculum() -> None:
    from tether.envs import evaluation_environment

    env_cfg = EnvironmentConfig(
        id=LUNABOTICS_ID,
        num_envs=4,
        carry_start_fraction=0.5,
        empty_start_fraction=0.5,
        carry_start_region="route",
        num_orbs=3,
    )
    plain_cfg = EnvironmentConfig(id=LUNABOTICS_ID, num_envs=8, num_orbs=3)
    plain_obs, _ = make_vector_env(plain_cfg).reset(seed=0)
    train_obs, _ = make_vector_env(env_cfg).reset(seed=0)
    # The two curriculum shares add up to 1: every rover starts on the way, none where plain ones do.
    assert (train_obs[:, :2] != plain_obs[:4, :2]).any(axis=1).all()
    eval_cfg = evaluation_environment(env_cfg, num_envs=8)
    assert eval_cfg.num_envs == 8 and eval_cfg.options == {"num_orbs": 3}
    eval_obs, _ = make_vector_env(eval_cfg).reset(seed=0)
    np.testing.assert_array_equal(eval_obs, plain_obs)


def test_route_cost_matches_straight_distance_in_the_open_and_goes_round_the_obstacle_zone() -> None:
    from tether.envs.lunabotics_physics import distance_to_rect
    from tether.envs.lunabotics_route import route_cost_grid, sample_grid

    con, obstacle = (0.0, 3.0, 2.0, 5.0), (2.2, 1.8, 4.8, 5.0)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 6.8, 500), rng.uniform(0, 5.0, 500)
    flat = sample_grid(route_cost_grid(6.8, 5.0, con, obstacle, 1.0), 6.8, 5.0, x, y)
    straight = distance_to_rect(x, y, con)
    assert np.all(np.abs(flat - straight) <= 0.03 * np.maximum(straight, 1.0))
    dear = route_cost_grid(6.8, 5.0, con, obstacle, 4.0)
    # East of the obstacle zone, the way home is down to the lane, along it and up the left side.
    lane_route = np.hypot(5.5 - 4.8, 3.5 - 1.8) + (4.8 - 2.2) + np.hypot(0.2, 1.2)
    got = float(sample_grid(dear, 6.8, 5.0, np.array([5.5]), np.array([3.5]))[0])
    assert abs(got - lane_route) <= 0.03 * lane_route
    # Inside the target the cost is 0, and it falls monotonically along the lane going west.
    assert float(sample_grid(dear, 6.8, 5.0, np.array([1.0]), np.array([4.0]))[0]) == 0.0
    lane = sample_grid(dear, 6.8, 5.0, np.linspace(6.0, 2.5, 20), np.full(20, 1.0))
    assert np.all(np.diff(lane) < 0)
    with pytest.raises(ValueError):
        dear[0, 0] = 1.0  # cached and shared: read-only


def test_route_home_keeps_the_rover_body_clear_of_the_obstacle_zone() -> None:
    """Steepest descent of the env's route cost from anywhere in the excavation zone stays at
    least the clearance (less a grid cell) outside the obstacle zone: a rover following the
    shaping never scrapes a rock sitting on the zone's edge."""
    from tether.envs.lunabotics_physics import distance_to_rect

    env = bare_env(only("progress_toward_construction", 2.0), obstacle_zone_cost=4.0)
    core = env.core
    clearance = core.cfg.obstacle_zone_clearance
    assert clearance > math.hypot(core.cfg.rover_half_length, core.cfg.rover_half_width)
    obstacle = core.zones[ZONE_OBSTACLE]
    angles = np.linspace(-math.pi, math.pi, 32, endpoint=False)
    for start_y in (0.5, 2.5, 4.5):
        x, y = np.array([5.5]), np.array([start_y])
        for _ in range(400):
            cost = float(core.zone_distances(x, y)[1][0])
            if cost == 0.0:
                break
            # Best of 32 headings for a 5 cm step: the direction the shaping pays most for.
            cx, cy = x + 0.05 * np.cos(angles), y + 0.05 * np.sin(angles)
            best = int(np.argmin(core.zone_distances(cx, cy)[1]))
            x, y = cx[best : best + 1], cy[best : best + 1]
            assert float(distance_to_rect(x, y, obstacle)[0]) >= clearance - 0.06, (x, y)
        assert cost == 0.0, f"descent from y={start_y} did not reach the construction zone"


def test_route_shaping_pays_driving_home_along_the_lane() -> None:
    env = bare_env(only("progress_toward_construction", 2.0), obstacle_zone_cost=4.0)
    core = env.core
    core.x[0], core.y[0], core.holding[0] = 5.0, 1.0, True
    core.set_heading(np.array([0]), math.pi)
    core.refresh_distances()
    before = float(core.dist_construction[0])
    _, reward, *_ = env.step(FORWARD)
    assert reward > 0.0
    assert reward == pytest.approx(2.0 * (before - float(core.dist_construction[0])))
