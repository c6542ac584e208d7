"""A simulated rover: a 2D world of walls and cylinders rendered into RGB-D frames by raycasting,
the rover's reward, and a driver loop that streams samples to a rover server like the real robot.

Rendering: one ray per image column finds the nearest wall or cylinder; the camera (hfov 70°,
0.25 m above the floor) then sees, per pixel, either the floor (a checker texture, its depth from
the ground-plane intersection), the obstacle (its z-depth) or the sky (no depth reading, 0 - as a
RealSense reports out-of-range pixels). Depth is z-depth in metres, 0 beyond `max_range`.

The task: drive forward (reward 2·linear_vel) without spinning (−0.5·|angular_vel|) and without
coming within `safety_distance` of anything straight ahead (−5), minus 0.01 a step. Touching an
obstacle ends the episode (terminated); `max_steps` truncates it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PROPRIO_DIM = 6
ACTION_DIM = 2


def rover_reward(
    linear_vel: float, angular_vel: float, min_forward_dist: float, safety_distance: float
) -> float:
    """The rover's reward, exactly as its design states it."""
    collision_penalty = 5.0 if min_forward_dist < safety_distance else 0.0
    return 2.0 * linear_vel - 0.5 * abs(angular_vel) - collision_penalty - 0.01


@dataclass
class RoverFrame:
    """What the rover's sensors give at one instant."""

    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 metres, 0 = no reading
    proprio: np.ndarray  # (6,) float32: linear_vel, angular_vel, roll, pitch, accel_mag, min_forward_dist


@dataclass
class WorldConfig:
    image_size: tuple[int, int] = (106, 60)  # (w, h)
    arena: float = 8.0  # square side, metres
    num_obstacles: int = 6
    obstacle_radius: tuple[float, float] = (0.25, 0.5)
    rover_radius: float = 0.2
    max_linear: float = 0.5  # m/s at linear_cmd = 1
    max_angular: float = 1.0  # rad/s at angular_cmd = 1
    dt: float = 0.1
    max_steps: int = 200
    safety_distance: float = 0.4  # metres from the rover's centre
    forward_cone_deg: float = 20.0  # half-angle scanned for min_forward_dist
    hfov_deg: float = 70.0
    camera_height: float = 0.25
    wall_height: float = 0.6
    obstacle_height: float = 0.5
    max_range: float = 10.0
    noise: float = 4.0  # RGB noise std (0-255 scale)
    new_map_each_episode: bool = True


_OBSTACLE_COLOURS = np.array(
    [[200, 60, 50], [220, 140, 40], [210, 200, 60], [60, 120, 200], [150, 70, 170], [60, 170, 110]],
    np.float32,
)
_WALL_COLOUR = np.array([150, 150, 155], np.float32)


class RoverWorld:
    """One rover in a walled arena with cylindrical obstacles. Not thread-safe; one owner."""

    def __init__(self, config: WorldConfig | None = None, seed: int = 0) -> None:
        self.config = config or WorldConfig()
        self.rng = np.random.default_rng(seed)
        self._setup_camera()
        self.centres = np.zeros((0, 2))
        self.radii = np.zeros(0)
        self.colours = np.zeros((0, 3), np.float32)
        self.pose = np.zeros(3)  # x, y, heading
        self.vel = np.zeros(2)  # linear, angular
        self._last_dv = 0.0
        self.steps = 0
        self._new_map()

    # --- world ------------------------------------------------------------------------------
    def _setup_camera(self) -> None:
        c = self.config
        w, h = c.image_size
        self.focal = (w / 2) / math.tan(math.radians(c.hfov_deg) / 2)
        cols = np.arange(w) + 0.5 - w / 2
        self.col_angles = -np.arctan(cols / self.focal)  # left of centre is positive (CCW)
        self.row_offsets = (np.arange(h) + 0.5 - h / 2).astype(np.float64)  # + is below the horizon
        n_cone = 9
        self.cone_angles = np.linspace(-1.0, 1.0, n_cone) * math.radians(c.forward_cone_deg)

    def _new_map(self) -> None:
        c = self.config
        n = c.num_obstacles
        self.radii = self.rng.uniform(*c.obstacle_radius, size=n)
        self.centres = self.rng.uniform(1.0, c.arena - 1.0, size=(n, 2))
        self.colours = _OBSTACLE_COLOURS[self.rng.integers(0, len(_OBSTACLE_COLOURS), size=n)]

    def _clearance(self, xy: np.ndarray) -> float:
        """Distance from a point to the nearest obstacle surface or wall."""
        a = self.config.arena
        walls = min(xy[0], xy[1], a - xy[0], a - xy[1])
        if len(self.radii) == 0:
            return float(walls)
        d = np.linalg.norm(self.centres - xy, axis=1) - self.radii
        return float(min(walls, d.min()))

    def reset(self, seed: int | None = None) -> RoverFrame:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        if self.config.new_map_each_episode or seed is not None:
            self._new_map()
        a = self.config.arena
        for _ in range(1000):
            xy = self.rng.uniform(0.8, a - 0.8, size=2)
            if self._clearance(xy) > 1.0:
                break
        self.pose = np.array([xy[0], xy[1], self.rng.uniform(-math.pi, math.pi)])
        self.vel = np.zeros(2)
        self._last_dv = 0.0
        self.steps = 0
        return self.observe()

    # --- raycasting --------------------------------------------------------------------------
    def raycast(self, angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance along each world-frame ray angle to the first hit, and what was hit
        (-1 wall, i >= 0 obstacle i)."""
        c = self.config
        ox, oy = self.pose[0], self.pose[1]
        ux, uy = np.cos(angles), np.sin(angles)
        with np.errstate(divide="ignore", invalid="ignore"):
            tx = np.where(ux > 0, (c.arena - ox) / ux, np.where(ux < 0, -ox / ux, np.inf))
            ty = np.where(uy > 0, (c.arena - oy) / uy, np.where(uy < 0, -oy / uy, np.inf))
        dist = np.minimum(tx, ty)
        hit = np.full(angles.shape, -1, np.int64)
        if len(self.radii):
            rel = self.centres - self.pose[:2]  # (M, 2)
            proj = ux[:, None] * rel[None, :, 0] + uy[:, None] * rel[None, :, 1]  # (R, M)
            disc = proj**2 - (rel**2).sum(1)[None, :] + self.radii[None, :] ** 2
            with np.errstate(invalid="ignore"):
                t = proj - np.sqrt(disc)
            t = np.where((disc >= 0) & (t > 0), t, np.inf)
            nearest = t.argmin(axis=1)
            tmin = t[np.arange(len(angles)), nearest]
            closer = tmin < dist
            dist = np.where(closer, tmin, dist)
            hit = np.where(closer, nearest, hit)
        return dist, hit

    def min_forward_dist(self) -> float:
        dist, _ = self.raycast(self.pose[2] + self.cone_angles)
        return float(min(dist.min(), self.config.max_range))

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        w, h = c.image_size
        f = self.focal
        dist, hit = self.raycast(self.pose[2] + self.col_angles)
        zdepth = dist * np.cos(self.col_angles)  # (W,)
        obj_h = np.where(hit < 0, c.wall_height, c.obstacle_height)
        y = self.row_offsets[:, None]  # (H, 1)
        with np.errstate(divide="ignore"):
            floor_z = np.where(y > 0, c.camera_height * f / y, np.inf)  # (H, 1)
        is_floor = floor_z < zdepth[None, :]
        top = -(obj_h - c.camera_height) * f / zdepth  # first row offset of the obstacle
        is_obj = ~is_floor & (y >= top[None, :])
        depth = np.where(is_floor, floor_z, np.where(is_obj, zdepth[None, :], 0.0))
        depth = np.where(depth > c.max_range, 0.0, depth).astype(np.float32)

        # Colours: obstacles shaded by distance, a checker floor in world coordinates, a sky gradient.
        rgb = np.empty((h, w, 3), np.float32)
        sky = np.array([150, 190, 235], np.float32) - (np.clip(-y, 0, None) / (h / 2)) * np.array(
            [60, 50, 10]
        )
        rgb[:] = sky[:, None, :]  # (H, 1, 3) over every column
        palette = np.vstack([self.colours, _WALL_COLOUR[None]])  # index -1 is the wall
        obj_col = palette[hit]  # (W, 3)
        shade = 1.0 / (1.0 + 0.12 * zdepth)[:, None]
        obj_rgb = np.broadcast_to((obj_col * (0.45 + 0.55 * shade))[None], (h, w, 3))
        rgb = np.where(is_obj[..., None], obj_rgb, rgb)
        ground = (
            np.where(np.isfinite(floor_z), floor_z, 0.0) / np.cos(self.col_angles)[None, :]
        )  # along-ray (H, W)
        ang = self.pose[2] + self.col_angles[None, :]
        fx = self.pose[0] + ground * np.cos(ang)
        fy = self.pose[1] + ground * np.sin(ang)
        checker = (np.floor(fx / 0.5) + np.floor(fy / 0.5)) % 2
        floor_rgb = np.where(checker[..., None] > 0, [110, 95, 70], [90, 80, 60]).astype(np.float32)
        floor_rgb *= (0.55 + 0.45 / (1.0 + 0.1 * ground))[..., None]
        rgb = np.where(is_floor[..., None], floor_rgb, rgb)
        if c.noise > 0:
            rgb += self.rng.normal(0.0, c.noise, size=rgb.shape).astype(np.float32)
        return np.clip(rgb, 0, 255).astype(np.uint8), depth

    def observe(self) -> RoverFrame:
        rgb, depth = self.render()
        noise = self.rng.normal(0.0, 1.0, size=5)
        accel = 9.81 + 0.05 * noise[4] + abs(self._last_dv) / self.config.dt
        proprio = np.array(
            [
                self.vel[0] + 0.01 * noise[0],
                self.vel[1] + 0.01 * noise[1],
                0.01 * noise[2],
                0.01 * noise[3],
                accel,
                self.min_forward_dist(),
            ],
            np.float32,
        )
        return RoverFrame(rgb, depth, proprio)

    # --- dynamics ---------------------------------------------------------------------------
    def step(self, action: np.ndarray) -> tuple[RoverFrame, float, bool, bool]:
        """Apply [linear_cmd, angular_cmd] (clipped to [-1, 1]) for one control period."""
        c = self.config
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[:2], -1.0, 1.0)
        v, w = a[0] * c.max_linear, a[1] * c.max_angular
        self._last_dv = v - self.vel[0]
        self.vel = np.array([v, w])
        x, y, th = self.pose
        th_mid = th + 0.5 * w * c.dt
        self.pose = np.array(
            [x + v * c.dt * math.cos(th_mid), y + v * c.dt * math.sin(th_mid), th + w * c.dt]
        )
        self.pose[2] = (self.pose[2] + math.pi) % (2 * math.pi) - math.pi
        self.steps += 1
        collided = self._clearance(self.pose[:2]) < c.rover_radius
        frame = self.observe()
        reward = rover_reward(v, w, float(frame.proprio[5]), c.safety_distance)
        truncated = not collided and self.steps >= c.max_steps
        return frame, reward, collided, truncated


# ------------------------------------------------------------------------------- behaviour


class ScriptedDriver:
    """A noisy teleoperator stand-in: drives forward, turns away from what is close ahead.
    It has no log-probabilities, like a human with a joystick."""

    def __init__(self, seed: int = 0, noise: float = 0.2, safety_distance: float = 0.4) -> None:
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.safety = safety_distance
        self.turn = 1.0

    def __call__(self, frame: RoverFrame) -> tuple[np.ndarray, float | None]:
        d = float(frame.proprio[5])
        if d < 2.5 * self.safety:
            linear, angular = 0.0, self.turn
        else:
            linear, angular = 0.8, 0.0
            if self.rng.random() < 0.05:
                self.turn = -self.turn
        action = np.array([linear, angular]) + self.rng.normal(0.0, self.noise, size=2)
        return np.clip(action, -1.0, 1.0).astype(np.float32), None


@dataclass
class SimStats:
    steps: int = 0
    sent: int = 0
    dropped: int = 0
    episodes: int = 0
    episode_returns: list[float] = field(default_factory=list)
    model_reloads: int = 0
    policy: str = "scripted"


def evaluate_policy(
    act: Callable[[RoverFrame], np.ndarray], config: WorldConfig, seeds: list[int]
) -> list[float]:
    """Deterministic returns of `act` on one episode per seed (fixed maps and start poses)."""
    returns = []
    for seed in seeds:
        world = RoverWorld(config, seed=seed)
        frame = world.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            frame, reward, terminated, truncated = world.step(act(frame))
            total += reward
            done = terminated or truncated
        returns.append(total)
    return returns


def run_sim_rover(
    connect: str,
    *,
    rate: float | None = 10.0,
    image_size: tuple[int, int] = (424, 240),
    steps: int | None = None,
    policy: str = "auto",
    model_connect: str | None = None,
    models_dir: str | None = None,
    compress: bool = True,
    jpeg_quality: int = 90,
    seed: int = 0,
    rover_id: str | None = None,
    world_config: WorldConfig | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_episode: Callable[[float], None] | None = None,
    on_step: Callable[[float, int | None], None] | None = None,
    wait_for_model: float = 60.0,
    sndhwm: int = 200,
) -> SimStats:
    """Drive a simulated rover and stream each step to `connect` with `RoverClient`.

    `policy`: "scripted" (the noisy teleop stand-in, no log_prob), "onnx" (the latest model the
    server published, sampled with its exploration noise, with log_prob; waits up to
    `wait_for_model` seconds for the first one) or "auto" (scripted until a model arrives).
    Models arrive on the server's PUB socket (`model_connect`, default: the server's port + 1).
    `on_step(reward, update)` sees every step's reward and the update number of the model that
    chose the action (None for the scripted driver).
    """
    from tether.ingest.rover import ModelWatcher, RoverClient, RoverPolicy, default_model_endpoint

    if policy not in ("auto", "scripted", "onnx"):
        raise ValueError("policy must be auto, scripted or onnx")
    config = world_config or WorldConfig(image_size=image_size)
    world = RoverWorld(config, seed=seed)
    driver = ScriptedDriver(seed=seed + 1, safety_distance=config.safety_distance)
    rng = np.random.default_rng(seed + 2)
    stats = SimStats(policy="scripted" if policy != "onnx" else "onnx")
    watcher = None
    learned: RoverPolicy | None = None
    if policy != "scripted":
        import tempfile

        directory = models_dir or tempfile.mkdtemp(prefix="tether-sim-models-")
        watcher = ModelWatcher(directory, connect=model_connect or default_model_endpoint(connect))
    client = RoverClient(
        connect, compress=compress, jpeg_quality=jpeg_quality, rover_id=rover_id, sndhwm=sndhwm
    )
    try:
        if policy == "onnx" and watcher is not None:
            deadline = time.monotonic() + wait_for_model
            while learned is None and time.monotonic() < deadline:
                if should_stop is not None and should_stop():
                    return stats
                path = watcher.poll(timeout=0.2)
                if path is not None:
                    learned = RoverPolicy.load(path)
                    stats.model_reloads += 1
            if learned is None:
                raise TimeoutError(f"no model arrived from {watcher.connect} within {wait_for_model:.0f} s")
        frame = world.reset()
        episode_return, episode_step = 0.0, 0
        period = 1.0 / rate if rate else 0.0
        next_time = time.monotonic()
        while steps is None or stats.steps < steps:
            if should_stop is not None and should_stop():
                break
            if watcher is not None:
                path = watcher.poll(timeout=0)
                if path is not None:
                    learned = RoverPolicy.load(path)
                    stats.model_reloads += 1
                    stats.policy = "onnx"
                    log.info("sim rover: loaded %s", path)
            if learned is not None:
                action, log_prob = learned.sample(frame.rgb, frame.depth, frame.proprio, rng)
            else:
                action, log_prob = driver(frame)
            next_frame, reward, terminated, truncated = world.step(action)
            done = terminated or truncated
            ok = client.send(
                frame.rgb,
                frame.depth,
                frame.proprio,
                action,
                reward,
                done,
                episode_step,
                log_prob=log_prob,
                truncated=truncated,
            )
            stats.sent += int(ok)
            stats.dropped += int(not ok)
            stats.steps += 1
            if on_step is not None:
                on_step(reward, learned.update if learned is not None else None)
            episode_return += reward
            episode_step += 1
            if done:
                stats.episodes += 1
                stats.episode_returns.append(episode_return)
                if on_episode is not None:
                    on_episode(episode_return)
                frame = world.reset()
                episode_return, episode_step = 0.0, 0
            else:
                frame = next_frame
            if period:
                next_time += period
                delay = next_time - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_time = time.monotonic()
    finally:
        client.close()
        if watcher is not None:
            watcher.close()
    return stats


def world_config_for(image_size: tuple[int, int], **overrides: Any) -> WorldConfig:
    return WorldConfig(image_size=image_size, **overrides)
