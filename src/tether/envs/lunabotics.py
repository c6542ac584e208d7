"""Lunabotics: a rover drives from its start zone through rocks and craters to the excavation
zone, digs up an orb, carries it back to the construction zone and deposits it.

`LunaboticsVectorEnv` steps N arenas at once in numpy (same-step autoreset); `LunaboticsEnv` is the
single-arena `gymnasium.Env` view built on the same core, so both follow identical trajectories for
the same seeds and actions. The reference (field layout, zone ids, observation table, reward terms,
info events, config keys) is docs/lunabotics.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_space
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tether.config import ConfigError
from tether.envs.lunabotics_physics import (
    KEY_INVALID,
    MAX_OBJECTS,
    SENTINEL_ANGLE,
    SENTINEL_DIST,
    FrustumSensor,
    all_true,
    any_true,
    clip,
    distance_to_rect,
    fast_atan2,
    pack_keys,
    rect_circle_penetration,
    rover_extent,
    zone_of,
)
from tether.envs.lunabotics_route import route_cost_grid, sample_grid

# Zone ids (observation index 6). A point belongs to the first zone in ZONE_PRECEDENCE that holds it.
ZONE_OPEN = 0
ZONE_START = 1
ZONE_OBSTACLE = 2
ZONE_EXCAVATION = 3
ZONE_CONSTRUCTION = 4
ZONE_BERM = 5  # the berm strip inside the construction zone; deposits count there too
ZONE_NAMES = {
    ZONE_OPEN: "open field",
    ZONE_START: "starting zone",
    ZONE_OBSTACLE: "obstacle zone",
    ZONE_EXCAVATION: "excavation zone",
    ZONE_CONSTRUCTION: "construction zone",
    ZONE_BERM: "berm",
}

# Zone rectangles (x0, y0, x1, y1) in metres on the default 6.8 m x 5.0 m field; other field sizes
# scale them by (world_width / 6.8, world_height / 5.0).
_BASE_W, _BASE_H = 6.8, 5.0
BASE_ZONES: dict[int, tuple[float, float, float, float]] = {
    ZONE_START: (0.0, 0.0, 2.0, 2.0),
    ZONE_CONSTRUCTION: (0.0, 3.0, 2.0, 5.0),
    ZONE_BERM: (0.0, 3.5, 1.0, 4.5),
    ZONE_OBSTACLE: (2.2, 1.8, 4.8, 5.0),
    ZONE_EXCAVATION: (4.8, 0.0, 6.8, 5.0),
}
# Rover centres spawn uniformly in this square of the starting zone (same scaling): >= 1 m from
# both walls, so a jittery untrained policy does not start out bumping into them.
BASE_SPAWN = (1.0, 1.0, 1.6, 1.6)
ZONE_PRECEDENCE = (ZONE_BERM, ZONE_CONSTRUCTION, ZONE_START, ZONE_EXCAVATION, ZONE_OBSTACLE)

OBS_DIM = 28
SENSOR_SLOTS = 5
OBS_NAMES: tuple[str, ...] = (
    "rover_x",
    "rover_y",
    "rover_vx",
    "rover_vy",
    "rover_angle",
    "rover_angular_vel",
    "zone",
    "holding_orb",
    *(f"obstacle_{i}_{q}" for i in range(1, SENSOR_SLOTS + 1) for q in ("dist", "angle")),
    *(f"orb_{i}_{q}" for i in range(1, SENSOR_SLOTS + 1) for q in ("dist", "angle")),
)

EVENT_KEYS = ("collision_obstacle", "collision_wall", "collected", "deposited", "success")

# A contact lasts while the gap stays below this; a collision event fires when one starts.
CONTACT_MARGIN = 0.005
# Rejection-sampling tries per obstacle; an obstacle with no valid try is left out of that layout.
PLACEMENT_TRIES = 64
# Orbs keep this far from the excavation zone's edges and the walls.
ORB_MARGIN = 0.3
# Parking spot for obstacles that are left out (never seen, never touched).
_FAR = -1.0e3


# Options that shape only the training distribution; `tether.envs.evaluation_environment` drops them.
TRAINING_ONLY_OPTIONS = frozenset({"carry_start_fraction", "carry_start_region", "empty_start_fraction"})


class LunaboticsConfig(BaseModel):
    """Physics and arena options (the `environment` section of a job config)."""

    model_config = ConfigDict(extra="forbid")

    world_width: float = Field(6.8, ge=3.0, le=100.0, description="field size along x, metres")
    world_height: float = Field(5.0, ge=2.0, le=100.0, description="field size along y, metres")
    max_speed: float = Field(2.0, gt=0.0, le=20.0, description="m/s at linear action 1")
    max_angular_vel: float = Field(3.0, gt=0.0, le=20.0, description="rad/s at angular action 1")
    linear_accel: float = Field(
        4.0, gt=0.0, le=1000.0, description="m/s^2 limit towards the commanded velocity"
    )
    angular_accel: float = Field(12.0, gt=0.0, le=1000.0, description="rad/s^2 limit towards the command")
    rover_half_length: float = Field(0.3, gt=0.0, le=0.5, description="metres, along the heading")
    rover_half_width: float = Field(0.2, gt=0.0, le=0.5, description="metres, across the heading")
    num_rocks: int = Field(7, ge=0, le=64, description="obstacles (rocks and craters) in the obstacle zone")
    crater_fraction: float = Field(0.4, ge=0.0, le=1.0, description="chance that an obstacle is a crater")
    rock_radius_min: float = Field(0.1, gt=0.0, le=0.45)
    rock_radius_max: float = Field(0.2, gt=0.0, le=0.45)
    crater_radius_min: float = Field(0.18, gt=0.0, le=0.45)
    crater_radius_max: float = Field(0.3, gt=0.0, le=0.45)
    obstacle_gap: float = Field(
        0.5, ge=0.0, le=5.0, description="least free gap between two obstacles, metres"
    )
    num_orbs: int = Field(15, ge=0, le=64, description="orbs spawned in the excavation zone")
    orb_radius: float = Field(0.06, gt=0.0, le=0.5, description="drawing only; orbs are not obstacles")
    dig_radius: float = Field(0.45, gt=0.0, le=5.0, description="rover centre to orb centre for a dig")
    sensor_range: float = Field(3.0, gt=0.0, le=100.0, description="metres")
    sensor_fov: float = Field(2.0 * math.pi / 3.0, gt=0.0, le=2.0 * math.pi, description="full cone, radians")
    restitution: float = Field(0.3, ge=0.0, le=1.0, description="bounce of the normal velocity on impact")
    contact_friction: float = Field(
        0.2, ge=0.0, le=1.0, description="share of tangential velocity lost per contact substep"
    )
    dt: float = Field(1.0 / 60.0, gt=0.0, le=0.1, description="physics step, seconds")
    frame_skip: int = Field(4, ge=1, le=64, description="physics steps per agent step (15 Hz control)")
    max_steps_per_episode: int = Field(250, ge=1, le=1_000_000, description="agent steps before truncation")
    start_heading_range: float = Field(
        math.pi / 4.0, ge=0.0, le=math.pi, description="start heading in +-this, radians"
    )
    deposits_to_finish: int = Field(
        1, ge=1, le=64, description="deposits that end the episode (capped at num_orbs)"
    )
    render_pixels_per_meter: int = Field(100, ge=10, le=400)
    obstacle_zone_cost: float = Field(
        1.0,
        ge=1.0,
        le=100.0,
        description=(
            "progress shaping measures distance to a zone as travel cost, a metre inside the "
            "obstacle zone costing this much (1: straight-line distance)"
        ),
    )
    obstacle_zone_clearance: float = Field(
        0.4,
        ge=0.0,
        le=5.0,
        description=(
            "route cost: the dear region is the obstacle zone grown by this much, metres, so the "
            "cheapest route keeps the rover's body (0.36 m corner radius) clear of rocks at the "
            "zone's edge"
        ),
    )
    carry_start_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description=(
            "training curriculum: share of episodes that start in the excavation zone already "
            "holding an orb, facing any way, so the return leg is practised from the first update "
            "(evaluation always starts in the starting zone)"
        ),
    )

    carry_start_region: Literal["excavation", "route"] = Field(
        "excavation",
        description=(
            "where curriculum rovers start: anywhere in the excavation zone, or anywhere on the "
            "obstacle-free way home (lane, left side, excavation zone) so the last metres before "
            "the construction zone are practised too"
        ),
    )
    empty_start_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description=(
            "training curriculum: share of episodes that start empty-handed on the way out, facing "
            "any way (with carry_start_region 'route': the lane and the excavation zone; with "
            "'excavation': that zone), so the way out is practised from every point on it too "
            "(evaluation always starts in the starting zone)"
        ),
    )

    @model_validator(mode="after")
    def _curriculum_shares_fit(self) -> LunaboticsConfig:
        if self.carry_start_fraction + self.empty_start_fraction > 1.0:
            raise ValueError("carry_start_fraction + empty_start_fraction must be at most 1")
        return self

    @field_validator("rock_radius_max", "crater_radius_max")
    @classmethod
    def _max_not_below_min(cls, value: float, info: ValidationInfo) -> float:
        low_name = str(info.field_name).replace("_max", "_min")
        low = info.data.get(low_name)
        if low is not None and value < low:
            raise ValueError(f"must be at least {low_name} ({low})")
        return value


class LunaboticsRewards(BaseModel):
    """Reward terms (the `rewards` section of a job config); see docs/lunabotics.md."""

    model_config = ConfigDict(extra="forbid")

    time_step: float = -0.01
    reach_excavation_zone: float = 10.0
    collect_orb: float = 50.0
    reach_construction_zone_with_orb: float = 100.0
    deposit_orb: float = 200.0
    collision_obstacle: float = -10.0
    collision_wall: float = -5.0
    progress_toward_excavation: float = 1.0
    progress_toward_construction: float = 2.0


def _scaled_zones(cfg: LunaboticsConfig) -> dict[int, tuple[float, float, float, float]]:
    sx = cfg.world_width / _BASE_W
    sy = cfg.world_height / _BASE_H
    return {z: (x0 * sx, y0 * sy, x1 * sx, y1 * sy) for z, (x0, y0, x1, y1) in BASE_ZONES.items()}


def observation_bounds(cfg: LunaboticsConfig) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the 28-D observation as float32 arrays."""
    pi = np.float32(np.pi)
    low = [0.0, 0.0, -cfg.max_speed, -cfg.max_speed, -pi, -cfg.max_angular_vel, 0.0, 0.0]
    high = [
        cfg.world_width,
        cfg.world_height,
        cfg.max_speed,
        cfg.max_speed,
        pi,
        cfg.max_angular_vel,
        5.0,
        1.0,
    ]
    low += [-1.0, -pi] * (2 * SENSOR_SLOTS)
    high += [cfg.sensor_range, pi] * (2 * SENSOR_SLOTS)
    return np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)


class LunaboticsCore:
    """The simulation of `num_arenas` independent arenas: rover state as (arenas,) arrays, objects
    as (objects, arenas) arrays (object-major, so per-arena reductions are fast element-wise ops),
    one numpy expression per rule. No autoreset here; the env classes decide what to reset."""

    def __init__(self, num_arenas: int, config: LunaboticsConfig, rewards: LunaboticsRewards) -> None:
        self.cfg = config
        self.rew = rewards
        n = self.n = int(num_arenas)
        k = self.k = config.num_rocks
        o = self.o = config.num_orbs
        zones = self.zones = _scaled_zones(config)
        self._zone_rects = [(z, *zones[z]) for z in ZONE_PRECEDENCE]
        self._rect_exc = zones[ZONE_EXCAVATION]
        self._rect_con = zones[ZONE_CONSTRUCTION]
        self._route: tuple[np.ndarray, np.ndarray] | None = None
        if config.obstacle_zone_cost > 1.0:
            w, h, costly = config.world_width, config.world_height, zones[ZONE_OBSTACLE]
            dear = (costly, config.obstacle_zone_cost, config.obstacle_zone_clearance)
            self._route = (
                route_cost_grid(w, h, self._rect_exc, *dear),
                route_cost_grid(w, h, self._rect_con, *dear),
            )
        sx, sy = config.world_width / _BASE_W, config.world_height / _BASE_H
        self.spawn_rect = tuple(v * f for v, f in zip(BASE_SPAWN, (sx, sy, sx, sy), strict=True))
        self._hl = config.rover_half_length
        self._hw = config.rover_half_width
        self._bound_r = math.hypot(self._hl, self._hw)
        self._lin_step = config.linear_accel * config.dt
        self._ang_step = config.angular_accel * config.dt
        # The heading turns by a short Taylor series of cos/sin of the increment (numpy's float64
        # cos/sin are slow scalar code); beyond this increment the series loses accuracy.
        self._exact_turn = config.max_angular_vel * config.dt > 0.1
        self._obstacle_sensor = FrustumSensor(k, n, SENSOR_SLOTS, config.sensor_range, config.sensor_fov)
        self._orb_sensor = FrustumSensor(o, n, SENSOR_SLOTS, config.sensor_range, config.sensor_fov)
        self._deposit_target = min(config.deposits_to_finish, o) if o > 0 else np.iinfo(np.int32).max
        # Culling windows on the rover's x: every obstacle centre lies in the obstacle zone and every
        # orb in the excavation zone, so a rover outside these windows can neither touch nor see them.
        ox0, oy0, ox1, oy1 = zones[ZONE_OBSTACLE]
        ex0, _, _, _ = zones[ZONE_EXCAVATION]
        slack = 0.01
        # Obstacle broad phase runs once per agent step with this much slack for how far a rover
        # can get in the step's substeps: driving, plus push-outs from an obstacle and a wall, each
        # at most one substep of driving and of corner sweep deep.
        per_substep = 3.0 * config.max_speed + 2.0 * self._bound_r * config.max_angular_vel
        self._slack = config.frame_skip * per_substep * config.dt + CONTACT_MARGIN
        reach = self._bound_r + self._slack
        self._touch_window = (ox0 - reach, ox1 + reach, oy0 - reach, oy1 + reach)
        self._see_obstacle_window = (ox0 - config.sensor_range - slack, ox1 + config.sensor_range + slack)
        self._see_orb_window = (ex0 - config.sensor_range - slack, math.inf)
        # Carry-start draws come last so layouts for a seed do not depend on the curriculum.
        self._draw_size = 3 + 2 * k + 2 * k * PLACEMENT_TRIES + 2 * o + 4

        f64 = np.float64
        self.x = np.zeros(n, f64)
        self.y = np.zeros(n, f64)
        self.vx = np.zeros(n, f64)
        self.vy = np.zeros(n, f64)
        self.cos_h = np.ones(n, f64)  # heading as a unit vector (cos, sin)
        self.sin_h = np.zeros(n, f64)
        self.omega = np.zeros(n, f64)
        # Objects are stored in float32 (the sensor works in float32; the physics upcasts exactly).
        f32 = np.float32
        self.obs_x = np.full((k, n), _FAR, f32)
        self.obs_y = np.full((k, n), _FAR, f32)
        self.obs_r = np.zeros((k, n), f32)
        self.obs_crater = np.zeros((k, n), bool)
        self.orb_x = np.zeros((o, n), f32)
        self.orb_y = np.zeros((o, n), f32)
        self.orb_on_ground = np.zeros((o, n), bool)
        self.holding = np.zeros(n, bool)
        self.deposits = np.zeros(n, np.int32)
        self.steps = np.zeros(n, np.int32)
        self.zone = np.zeros(n, np.int8)
        self.visited_excavation = np.zeros(n, bool)
        self.construction_bonus_paid = np.zeros(n, bool)
        self.contact_obstacle = np.zeros(n, bool)
        self.contact_wall = np.zeros(n, bool)
        self.dist_excavation = np.zeros(n, f64)
        self.dist_construction = np.zeros(n, f64)
        self.obs_low, self.obs_high = observation_bounds(config)

    @property
    def theta(self) -> np.ndarray:
        """Headings in radians, [-pi, pi]."""
        return np.arctan2(self.sin_h, self.cos_h)

    def set_heading(self, idx: Any, theta: np.ndarray | float) -> None:
        self.cos_h[idx] = np.cos(theta)
        self.sin_h[idx] = np.sin(theta)

    def clear_objects(self, i: int) -> None:
        """Remove every obstacle and orb from arena `i` (tests, demos)."""
        self.obs_x[:, i] = self.obs_y[:, i] = _FAR
        self.obs_r[:, i] = 0.0
        self.obs_crater[:, i] = False
        self.orb_x[:, i] = self.orb_y[:, i] = _FAR
        self.orb_on_ground[:, i] = False

    def put_obstacle(self, i: int, j: int, x: float, y: float, radius: float, crater: bool = False) -> None:
        """Place obstacle slot `j` of arena `i` (tests, demos)."""
        self.obs_x[j, i], self.obs_y[j, i], self.obs_r[j, i] = x, y, radius
        self.obs_crater[j, i] = crater

    def put_orb(self, i: int, j: int, x: float, y: float) -> None:
        """Place orb slot `j` of arena `i` on the ground (tests, demos)."""
        self.orb_x[j, i], self.orb_y[j, i] = x, y
        self.orb_on_ground[j, i] = True

    def place_rover(self, i: int, x: float, y: float, theta: float = 0.0) -> None:
        """Put rover `i` at rest at a pose (tests, demos); resets its contact and shaping baselines."""
        self.x[i] = x
        self.y[i] = y
        self.set_heading(i, theta)
        self.vx[i] = self.vy[i] = self.omega[i] = 0.0
        self.contact_obstacle[i] = self.contact_wall[i] = False
        self.refresh_distances(np.array([i]))

    # ------------------------------------------------------------------ reset

    def reset_arenas(self, idx: np.ndarray, gens: Sequence[np.random.Generator]) -> None:
        """Lay out arenas `idx` afresh, each from its own generator (one fixed-size draw each, so
        an arena's layouts depend only on its seed)."""
        cfg = self.cfg
        m = len(idx)
        if m == 0:
            return
        u = np.stack([g.random(self._draw_size) for g in gens])
        pos = 0

        def take(count: int) -> np.ndarray:
            nonlocal pos
            out = u[:, pos : pos + count]
            pos += count
            return out

        # Rover pose: uniform in the spawn square (inside the start zone, well clear of the walls).
        lo_x, lo_y, hi_x, hi_y = self.spawn_rect
        r3 = take(3)
        self.x[idx] = lo_x + r3[:, 0] * (hi_x - lo_x)
        self.y[idx] = lo_y + r3[:, 1] * (hi_y - lo_y)
        self.set_heading(idx, (2.0 * r3[:, 2] - 1.0) * cfg.start_heading_range)
        self.vx[idx] = 0.0
        self.vy[idx] = 0.0
        self.omega[idx] = 0.0

        # Obstacles: radius and kind per obstacle, then rejection sampling (vectorised over arenas)
        # so every pair keeps `obstacle_gap` of free space between them.
        k = self.k
        if k:
            crater = take(k) < cfg.crater_fraction
            ur = take(k)
            radius = np.where(
                crater,
                cfg.crater_radius_min + ur * (cfg.crater_radius_max - cfg.crater_radius_min),
                cfg.rock_radius_min + ur * (cfg.rock_radius_max - cfg.rock_radius_min),
            )
            # Largest first: sequential placement packs far better that way.
            order = np.argsort(-radius, axis=1, kind="stable")
            radius = np.take_along_axis(radius, order, axis=1)
            crater = np.take_along_axis(crater, order, axis=1)
            ux = take(k * PLACEMENT_TRIES).reshape(m, k, PLACEMENT_TRIES)
            uy = take(k * PLACEMENT_TRIES).reshape(m, k, PLACEMENT_TRIES)
            zx0, zy0, zx1, zy1 = self.zones[ZONE_OBSTACLE]
            h = cfg.world_height
            ox = np.full((m, k), _FAR)
            oy = np.full((m, k), _FAR)
            orad = np.zeros((m, k))
            rows = np.arange(m)
            for j in range(k):
                rj = radius[:, j : j + 1]
                cx = zx0 + rj + ux[:, j] * (zx1 - zx0 - 2.0 * rj)
                cy = zy0 + rj + uy[:, j] * (zy1 - zy0 - 2.0 * rj)
                # An obstacle that would leave a gap to a wall narrower than `obstacle_gap` sits
                # against that wall instead, so no dead-end slots form along the walls.
                cy = np.where(cy - rj < cfg.obstacle_gap, rj, cy)
                cy = np.where(h - cy - rj < cfg.obstacle_gap, h - rj, cy)
                if j:
                    ddx = cx[:, :, None] - ox[:, None, :j]
                    ddy = cy[:, :, None] - oy[:, None, :j]
                    need = rj[:, :, None] + orad[:, None, :j] + cfg.obstacle_gap
                    ok = (ddx * ddx + ddy * ddy >= need * need).all(axis=2)
                else:
                    ok = np.ones(cx.shape, bool)
                first = np.argmax(ok, axis=1)
                found = ok[rows, first]
                ox[:, j] = np.where(found, cx[rows, first], _FAR)
                oy[:, j] = np.where(found, cy[rows, first], _FAR)
                orad[:, j] = np.where(found, radius[:, j], 0.0)
            self.obs_x[:, idx] = ox.T
            self.obs_y[:, idx] = oy.T
            self.obs_r[:, idx] = orad.T
            self.obs_crater[:, idx] = (crater & (orad > 0.0)).T

        o = self.o
        if o:
            ex0, ey0, ex1, ey1 = self._rect_exc
            ex0 += ORB_MARGIN
            ex1 = min(ex1, cfg.world_width) - ORB_MARGIN
            ey0 += ORB_MARGIN
            ey1 = min(ey1, cfg.world_height) - ORB_MARGIN
            self.orb_x[:, idx] = (ex0 + take(o) * (ex1 - ex0)).T
            self.orb_y[:, idx] = (ey0 + take(o) * (ey1 - ey0)).T
            self.orb_on_ground[:, idx] = True

        self.holding[idx] = False
        curriculum = take(4)
        share = cfg.carry_start_fraction + cfg.empty_start_fraction
        if share > 0.0:
            # Curriculum: these rovers start on the way, facing any way; the first share of them
            # holding an orb.
            pick = curriculum[:, 0] < share
            picked, rows = curriculum[pick], idx[pick]
            holding = picked[:, 0] < cfg.carry_start_fraction
            self.x[rows], self.y[rows] = self._curriculum_start_positions(picked[:, 1], picked[:, 2], holding)
            self.set_heading(rows, (2.0 * picked[:, 3] - 1.0) * math.pi)
            self.holding[rows] = holding
        self.deposits[idx] = 0
        self.steps[idx] = 0
        self.contact_obstacle[idx] = False
        self.contact_wall[idx] = False
        x, y = self.x[idx], self.y[idx]
        zone = zone_of(x, y, self._zone_rects)
        self.zone[idx] = zone
        # A rover placed inside the excavation zone (possible only via tests) earns no entry bonus.
        self.visited_excavation[idx] = zone == ZONE_EXCAVATION
        self.construction_bonus_paid[idx] = False
        self.refresh_distances(idx)

    def _curriculum_start_positions(
        self, u: np.ndarray, v: np.ndarray, holding: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Curriculum start points from two uniforms per rover: in the excavation zone, or on the
        way, uniform over rectangles left free by the obstacle zone (grown by the route clearance)
        and the construction zone. The way home is the lane, the left side and the excavation
        zone; the way out, for rovers not `holding` an orb, leaves out the left side, which leads
        only home (a rover there would be taught to drive away from home without an orb and
        towards it with one, from the same spot)."""
        cfg = self.cfg
        w, h = cfg.world_width, cfg.world_height
        edge = self._bound_r + 0.05  # the rover never starts touching a wall
        c = cfg.obstacle_zone_clearance
        ox0, oy0, ox1, _ = self.zones[ZONE_OBSTACLE]
        cy0 = self._rect_con[1]
        rects = np.array(
            [
                (edge, edge, w - edge, oy0 - c),  # the lane along the bottom wall
                (edge, oy0 - c, ox0 - c, cy0),  # the left side up to the construction zone
                (ox1 + c, oy0 - c, w - edge, h - edge),  # the excavation zone beside the obstacles
            ]
        )
        area = np.clip(rects[:, 2] - rects[:, 0], 0.0, None) * np.clip(rects[:, 3] - rects[:, 1], 0.0, None)
        if cfg.carry_start_region == "excavation" or area.sum() <= 0.0:  # (a field too small for a route)
            ex0, ey0, ex1, ey1 = self._rect_exc
            margin = cfg.rover_half_length + ORB_MARGIN
            ex1, ey1 = min(ex1, w), min(ey1, h)
            x = ex0 + margin + u * (ex1 - ex0 - 2.0 * margin)
            return x, ey0 + margin + v * (ey1 - ey0 - 2.0 * margin)
        way_out = area * np.array([1.0, 0.0, 1.0])  # the lane and the excavation zone
        if way_out.sum() <= 0.0:  # neither fits this field: the left side is all the way there is
            way_out = area
        empty = ~holding
        x, y = np.empty_like(u), np.empty_like(v)
        x[holding], y[holding] = self._uniform_in_rects(rects, area, u[holding], v[holding])
        x[empty], y[empty] = self._uniform_in_rects(rects, way_out, u[empty], v[empty])
        return x, y

    @staticmethod
    def _uniform_in_rects(
        rects: np.ndarray, area: np.ndarray, u: np.ndarray, v: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points uniform over rectangles (x0, y0, x1, y1) of the given areas, from two uniforms
        each: `u` picks the rectangle and, rescaled within its share, the x; `v` the y."""
        bounds = np.cumsum(area) / area.sum()
        k = np.minimum(np.searchsorted(bounds, u, side="right"), len(rects) - 1)
        low = np.concatenate([[0.0], bounds[:-1]])[k]
        frac = np.clip((u - low) / np.maximum(bounds[k] - low, 1e-12), 0.0, 1.0)  # u reused within the pick
        r = rects[k]
        return r[:, 0] + frac * (r[:, 2] - r[:, 0]), r[:, 1] + v * (r[:, 3] - r[:, 1])

    def refresh_distances(self, idx: Any = slice(None)) -> None:
        """Recompute zone distances (the shaping baseline), e.g. after moving a rover by hand."""
        x, y = self.x[idx], self.y[idx]
        self.zone[idx] = zone_of(x, y, self._zone_rects)
        self.dist_excavation[idx], self.dist_construction[idx] = self.zone_distances(x, y)

    def zone_distances(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(to the excavation zone, to the construction zone): the progress shaping's distances,
        straight-line or route cost (see `obstacle_zone_cost` and lunabotics_route)."""
        if self._route is None:
            return distance_to_rect(x, y, self._rect_exc), distance_to_rect(x, y, self._rect_con)
        w, h = self.cfg.world_width, self.cfg.world_height
        return sample_grid(self._route[0], w, h, x, y), sample_grid(self._route[1], w, h, x, y)

    # ------------------------------------------------------------ observation

    def observe(self, idx: np.ndarray | None = None) -> np.ndarray:
        """The (M, 28) float32 observation of arenas `idx` (all when None)."""
        sel: Any = slice(None) if idx is None else idx
        x = self.x[sel]
        y = self.y[sel]
        c = self.cos_h[sel]
        s = self.sin_h[sel]
        m = x.shape[0]
        out = np.empty((m, OBS_DIM), np.float32)
        out[:, 0] = x
        out[:, 1] = y
        out[:, 2] = self.vx[sel]
        out[:, 3] = self.vy[sel]
        out[:, 4] = fast_atan2(s, c)
        out[:, 5] = self.omega[sel]
        np.maximum(out[:, :6], self.obs_low[:6], out=out[:, :6])
        np.minimum(out[:, :6], self.obs_high[:6], out=out[:, :6])
        out[:, 6] = self.zone[sel]
        out[:, 7] = self.holding[sel]
        rows = np.arange(self.n)[sel]
        # Absent obstacles and orbs off the ground are parked at _FAR: out of range for the sensor.
        self._sense(out, 8, rows, x, y, c, s, self._obstacle_sensor, self.obs_x, self.obs_y,
                    self.obs_r, self._see_obstacle_window)  # fmt: skip
        self._sense(out, 18, rows, x, y, c, s, self._orb_sensor, self.orb_x, self.orb_y,
                    None, self._see_orb_window)  # fmt: skip
        return out

    @staticmethod
    def _sense(
        out: np.ndarray,
        col: int,
        rows: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        c: np.ndarray,
        s: np.ndarray,
        sensor: FrustumSensor,
        ox: np.ndarray,
        oy: np.ndarray,
        radius: np.ndarray | None,
        window: tuple[float, float],
    ) -> None:
        """Fill out[:, col:col+10] with one kind's sensor readings, only computing them for the
        rovers inside that kind's x window (the others read all sentinels)."""
        dist_cols = slice(col, col + 2 * SENSOR_SLOTS, 2)
        angle_cols = slice(col + 1, col + 2 * SENSOR_SLOTS, 2)
        near = (x >= window[0]) & (x <= window[1])
        pick: Any
        if all_true(near):
            pick = slice(None)
            g: Any = rows if rows.size != ox.shape[1] else slice(None)
        else:
            out[:, dist_cols] = SENTINEL_DIST
            out[:, angle_cols] = SENTINEL_ANGLE
            pick = np.flatnonzero(near)
            if pick.size == 0:
                return
            g = rows[pick]
        d, a = sensor(
            x[pick], y[pick], c[pick], s[pick], ox[:, g], oy[:, g], None,
            None if radius is None else radius[:, g],
        )  # fmt: skip
        out[pick, dist_cols] = d.T
        out[pick, angle_cols] = a.T

    # ------------------------------------------------------------------ step

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Advance every arena by one agent step (frame_skip physics steps).

        Returns (obs, reward, terminated, truncated, events); events holds the EVENT_KEYS arrays.
        """
        cfg = self.cfg
        rew = self.rew
        n = self.n
        a = np.asarray(actions, dtype=np.float64)
        if a.shape != (n, 3):
            if a.size != n * 3:
                raise ValueError(f"expected actions of shape ({n}, 3), got {a.shape}")
            a = a.reshape(n, 3)
        if not all_true(np.isfinite(a)):
            raise ValueError("actions contain NaN or infinity; the policy has diverged")
        v_cmd = clip(a[:, 0], -1.0, 1.0) * cfg.max_speed
        w_cmd = clip(a[:, 1], -1.0, 1.0) * cfg.max_angular_vel
        dig = a[:, 2] >= 0.5

        hit_obstacle = np.zeros(n, bool)
        hit_wall = np.zeros(n, bool)
        pairs = self._obstacle_pairs()
        wall_rows = self._wall_rows()
        for _ in range(cfg.frame_skip):
            self._integrate(v_cmd, w_cmd)
            touching = self._collide_obstacles(pairs)
            hit_obstacle |= touching & ~self.contact_obstacle
            self.contact_obstacle = touching
            touching = self._collide_walls(wall_rows)
            hit_wall |= touching & ~self.contact_wall
            self.contact_wall = touching
        # Rotating by a unit vector keeps |(cos, sin)| = 1 to ~1e-15 per physics step; renormalise
        # once per agent step so rounding never accumulates.
        inv = 1.0 / np.sqrt(self.cos_h * self.cos_h + self.sin_h * self.sin_h)
        self.cos_h *= inv
        self.sin_h *= inv

        x, y = self.x, self.y
        zone = zone_of(x, y, self._zone_rects)
        self.zone = zone
        d_exc, d_con = self.zone_distances(x, y)
        holding = self.holding
        # Masks multiply rather than np.where (see lunabotics_physics): x * 1 + y * 0 is exact.
        reward = holding * (rew.progress_toward_construction * (self.dist_construction - d_con))
        reward += ~holding * (rew.progress_toward_excavation * (self.dist_excavation - d_exc))
        reward += rew.time_step
        self.dist_excavation = d_exc
        self.dist_construction = d_con

        in_exc = zone == ZONE_EXCAVATION
        in_con = (zone == ZONE_CONSTRUCTION) | (zone == ZONE_BERM)
        first_exc = in_exc & ~self.visited_excavation
        self.visited_excavation |= in_exc
        reward += first_exc * rew.reach_excavation_zone
        arrive = in_con & holding & ~self.construction_bonus_paid
        self.construction_bonus_paid |= arrive
        reward += arrive * rew.reach_construction_zone_with_orb

        deposited = dig & holding & in_con
        collected = np.zeros(n, bool)
        try_collect = dig & ~holding & in_exc
        if self.o and any_true(try_collect):
            rows = np.flatnonzero(try_collect)
            dx = self.orb_x[:, rows] - x[rows]
            dy = self.orb_y[:, rows] - y[rows]
            d2 = dx * dx + dy * dy
            reach = self.orb_on_ground[:, rows] & (d2 <= cfg.dig_radius * cfg.dig_radius)
            nearest = pack_keys(d2.astype(np.float32), reach).min(axis=0)
            got = nearest < KEY_INVALID
            rows = rows[got]
            which = (nearest[got] & np.uint32(MAX_OBJECTS - 1)).astype(np.intp)
            self.orb_on_ground[which, rows] = False
            self.orb_x[which, rows] = _FAR
            self.orb_y[which, rows] = _FAR
            collected[rows] = True
            self.construction_bonus_paid[rows] = False
        self.holding = (holding | collected) & ~deposited
        self.deposits += deposited
        reward += collected * rew.collect_orb
        reward += deposited * rew.deposit_orb
        reward += hit_obstacle * rew.collision_obstacle
        reward += hit_wall * rew.collision_wall

        self.steps += 1
        terminated = self.deposits >= self._deposit_target
        truncated = (self.steps >= cfg.max_steps_per_episode) & ~terminated
        events = {
            "collision_obstacle": hit_obstacle,
            "collision_wall": hit_wall,
            "collected": collected,
            "deposited": deposited,
            "success": self.deposits > 0,
        }
        return self.observe(), reward, terminated, truncated, events

    def _integrate(self, v_cmd: np.ndarray, w_cmd: np.ndarray) -> None:
        """One semi-implicit Euler step: turn rate, heading, velocity (acceleration-limited towards
        the command along the new heading, which also bleeds off sideways slip), position."""
        dt = self.cfg.dt
        omega = self.omega
        omega += clip(w_cmd - omega, -self._ang_step, self._ang_step)
        turn = omega * dt
        if self._exact_turn:
            ct = np.cos(turn)
            st = np.sin(turn)
        else:
            # Series to t^6 / t^7: error below 1e-12 for |turn| <= 0.1 rad per physics step.
            t2 = turn * turn
            ct = 1.0 - t2 * (1 / 2 - t2 * (1 / 24 - t2 * (1 / 720)))
            st = turn * (1.0 - t2 * (1 / 6 - t2 * (1 / 120 - t2 * (1 / 5040))))
        c = self.cos_h * ct
        c -= self.sin_h * st
        s = self.sin_h * ct
        s += self.cos_h * st
        self.cos_h = c
        self.sin_h = s
        dvx = v_cmd * c - self.vx
        dvy = v_cmd * s - self.vy
        norm = np.sqrt(dvx * dvx + dvy * dvy)
        scale = self._lin_step / np.maximum(norm, self._lin_step)
        self.vx += dvx * scale
        self.vy += dvy * scale
        self.x += self.vx * dt
        self.y += self.vy * dt

    def _obstacle_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Broad phase, once per agent step: (arena, obstacle x, y, r) for every obstacle whose
        bounding circle a rover could reach within this step; None when there are none."""
        if not self.k:
            return None
        x, y = self.x, self.y
        x0, x1, y0, y1 = self._touch_window
        rows = _rows_of((x > x0) & (x < x1) & (y > y0) & (y < y1))
        if rows is None:
            return None
        ox = self.obs_x[:, rows]
        oy = self.obs_y[:, rows]
        r = self.obs_r[:, rows]
        # float32 is plenty for a test with centimetres of slack; absent obstacles sit at _FAR.
        dx = ox - x[rows].astype(np.float32)
        dy = oy - y[rows].astype(np.float32)
        reach = r + np.float32(self._bound_r + self._slack)
        kk, mm = np.nonzero(dx * dx + dy * dy < reach * reach)
        if kk.size == 0:
            return None
        arena = mm if isinstance(rows, slice) else rows[mm]
        return (
            arena,
            ox[kk, mm].astype(np.float64),
            oy[kk, mm].astype(np.float64),
            r[kk, mm].astype(np.float64),
        )

    def _collide_obstacles(
        self, pairs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None
    ) -> np.ndarray:
        """Narrow phase on the broad-phase pairs: push each rover out of its deepest overlapping
        obstacle, bounce the normal velocity and rub off some tangential velocity. Returns which
        arenas touch an obstacle (gap below CONTACT_MARGIN)."""
        touching = np.zeros(self.n, bool)
        if pairs is None:
            return touching
        arena, ox, oy, r = pairs
        x, y = self.x, self.y
        depth, nx, ny = rect_circle_penetration(
            x[arena], y[arena], self.cos_h[arena], self.sin_h[arena], self._hl, self._hw, ox, oy, r
        )
        touching[arena[depth > -CONTACT_MARGIN]] = True
        pen = depth > 0.0
        if not any_true(pen):
            return touching
        hit, depth, nx, ny = arena[pen], depth[pen], nx[pen], ny[pen]
        if hit.size > 1:
            # One contact per arena per substep, the deepest; the others resolve on later substeps.
            order = np.lexsort((-depth, hit))
            hit, depth, nx, ny = hit[order], depth[order], nx[order], ny[order]
            first = np.ones(hit.size, bool)
            first[1:] = hit[1:] != hit[:-1]
            hit, depth, nx, ny = hit[first], depth[first], nx[first], ny[first]
        x[hit] -= nx * depth
        y[hit] -= ny * depth
        vx = self.vx[hit]
        vy = self.vy[hit]
        vn = vx * nx + vy * ny
        impulse = np.where(vn > 0.0, (1.0 + self.cfg.restitution) * vn, 0.0)
        vx = vx - impulse * nx
        vy = vy - impulse * ny
        rub = self.cfg.contact_friction * (vy * nx - vx * ny)  # share of the tangential (-ny, nx) part
        self.vx[hit] = vx + rub * ny
        self.vy[hit] = vy - rub * nx
        return touching

    def _wall_rows(self) -> Any:
        """Broad phase for the walls, once per agent step: the arenas whose rover could reach a
        wall within the step (None for none, a slice for all)."""
        reach = self._bound_r + self._slack
        x, y = self.x, self.y
        near = (x < reach) | (x > self.cfg.world_width - reach)
        near |= (y < reach) | (y > self.cfg.world_height - reach)
        return _rows_of(near)

    def _collide_walls(self, rows: Any) -> np.ndarray:
        """Keep the rover's bounding box inside the field, bouncing the velocity into the wall and
        rubbing off some of the velocity along it; returns which arenas touch a wall."""
        touching = np.zeros(self.n, bool)
        if rows is None:
            return touching
        cfg = self.cfg
        ext_x, ext_y = rover_extent(self.cos_h[rows], self.sin_h[rows], self._hl, self._hw)
        e = cfg.restitution
        keep = 1.0 - cfg.contact_friction
        x, y, vx, vy = self.x[rows], self.y[rows], self.vx[rows], self.vy[rows]
        near = np.zeros(x.shape, bool)
        moved = False
        for pos, vel, side, ext, limit in (
            (x, vx, vy, ext_x, cfg.world_width),
            (y, vy, vx, ext_y, cfg.world_height),
        ):
            low = ext - pos
            high = pos + ext - limit
            near |= np.maximum(low, high) > -CONTACT_MARGIN
            hit_low = low > 0.0
            hit = hit_low | (high > 0.0)
            if any_true(hit):
                moved = True
                i = np.flatnonzero(hit)
                lo_i = hit_low[i]
                pos[i] += np.where(lo_i, low[i], -high[i])
                v = vel[i]
                into = np.where(lo_i, v < 0.0, v > 0.0)
                vel[i] = np.where(into, -e * v, v)
                side[i] *= keep
        if moved and not isinstance(rows, slice):
            self.x[rows], self.y[rows], self.vx[rows], self.vy[rows] = x, y, vx, vy
        touching[rows] = near
        return touching


def _rows_of(mask: np.ndarray) -> Any:
    """Index for the arenas in `mask`: None for none, a slice for all (also when most are in: a
    full pass is cheaper than gathering and scattering a large subset), else their indices."""
    count = np.count_nonzero(mask)
    if count == 0:
        return None
    if count > mask.size // 2:
        return slice(None)
    return np.flatnonzero(mask)


def _spaces(cfg: LunaboticsConfig) -> tuple[spaces.Box, spaces.Box]:
    low, high = observation_bounds(cfg)
    obs_space = spaces.Box(low, high, dtype=np.float32)
    act_space = spaces.Box(
        np.array([-1.0, -1.0, 0.0], np.float32), np.array([1.0, 1.0, 1.0], np.float32), dtype=np.float32
    )
    return obs_space, act_space


def _check_render_mode(render_mode: str | None) -> None:
    if render_mode not in (None, "rgb_array"):
        raise ConfigError(f"render_mode {render_mode!r} is not supported; use 'rgb_array' or leave it unset.")


class LunaboticsVectorEnv(gym.vector.VectorEnv):
    """N Lunabotics arenas stepped together; same-step autoreset (see tether.envs)."""

    metadata: dict[str, Any] = {  # noqa: RUF012 - gymnasium's class-level convention
        "render_modes": ["rgb_array"],
        "render_fps": 15,
        "autoreset_mode": gym.vector.AutoresetMode.SAME_STEP,
    }

    def __init__(
        self,
        num_envs: int,
        config: LunaboticsConfig | None = None,
        rewards: LunaboticsRewards | None = None,
        render_mode: str | None = None,
    ) -> None:
        if int(num_envs) < 1:
            raise ConfigError(f"num_envs must be at least 1 (got {num_envs}); set environment.num_envs >= 1.")
        _check_render_mode(render_mode)
        self.config = config or LunaboticsConfig()
        self.rewards = rewards or LunaboticsRewards()
        self.num_envs = int(num_envs)
        self.render_mode = render_mode
        self.metadata = {
            **self.metadata,
            "render_fps": round(1.0 / (self.config.dt * self.config.frame_skip)),
        }
        self.core = LunaboticsCore(self.num_envs, self.config, self.rewards)
        self.single_observation_space, self.single_action_space = _spaces(self.config)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._gens: list[np.random.Generator] | None = None
        self._all = np.arange(self.num_envs)

    def reset(
        self, *, seed: int | Sequence[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every arena. `seed=s` seeds arena i with s + i; a list gives one seed per arena;
        None keeps drawing from each arena's own generator (fresh entropy on first use)."""
        n = self.num_envs
        if seed is None:
            if self._gens is None:
                self._gens = [np.random.default_rng(s) for s in np.random.SeedSequence().spawn(n)]
        else:
            seeds = [int(seed) + i for i in range(n)] if np.isscalar(seed) else [int(s) for s in seed]  # type: ignore[arg-type, union-attr]
            if len(seeds) != n:
                raise ValueError(f"reset(seed=...) got {len(seeds)} seeds for {n} arenas")
            if min(seeds) < 0:
                raise ValueError("seeds must be non-negative integers")
            self._gens = [np.random.default_rng(s) for s in seeds]
            self._np_random_seed = seeds[0]
        self.core.reset_arenas(self._all, self._gens)
        return self.core.observe(), {}

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._gens is None:
            raise RuntimeError("call reset() before step()")
        obs, reward, terminated, truncated, events = self.core.step(actions)
        done = terminated | truncated
        final_obs = np.zeros_like(obs)
        if any_true(done):
            idx = np.flatnonzero(done)
            final_obs[idx] = obs[idx]
            self.core.reset_arenas(idx, [self._gens[i] for i in idx])
            obs[idx] = self.core.observe(idx)
        info: dict[str, Any] = dict(events)
        info["final_obs"] = final_obs
        info["_final_obs"] = done
        return obs, reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        """The first arena's frame (rgb_array), or None without a render mode."""
        if self.render_mode != "rgb_array":
            return None
        from tether.envs.lunabotics_render import render_arena

        return render_arena(self.core, 0)


class LunaboticsEnv(gym.Env[np.ndarray, np.ndarray]):
    """One Lunabotics arena; the same core as the vector env with one row and no autoreset."""

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 15}  # noqa: RUF012

    def __init__(
        self,
        config: LunaboticsConfig | None = None,
        rewards: LunaboticsRewards | None = None,
        render_mode: str | None = None,
    ) -> None:
        _check_render_mode(render_mode)
        self.config = config or LunaboticsConfig()
        self.rewards = rewards or LunaboticsRewards()
        self.render_mode = render_mode
        self.metadata = {
            **self.metadata,
            "render_fps": round(1.0 / (self.config.dt * self.config.frame_skip)),
        }
        self.core = LunaboticsCore(1, self.config, self.rewards)
        self.observation_space, self.action_space = _spaces(self.config)
        self._idx = np.zeros(1, np.intp)
        self._needs_reset = True

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        # Env.np_random is seeded exactly like the vector env's per-arena generator (PCG64 of the seed).
        self.core.reset_arenas(self._idx, [self.np_random])
        self._needs_reset = False
        return self.core.observe()[0], {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (and after an episode ends)")
        obs, reward, terminated, truncated, events = self.core.step(np.asarray(action).reshape(1, 3))
        term = bool(terminated[0])
        trunc = bool(truncated[0])
        self._needs_reset = term or trunc
        info = {key: bool(value[0]) for key, value in events.items()}
        return obs[0], float(reward[0]), term, trunc, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        from tether.envs.lunabotics_render import render_arena

        return render_arena(self.core, 0)
