"""Top-down RGB drawing of one Lunabotics arena with numpy only (no display, no extra packages)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tether.envs.lunabotics import LunaboticsCore

_GROUND = (120, 116, 110)
_ZONE_COLOURS = {
    1: (70, 110, 170),  # starting zone: blue
    2: (135, 120, 100),  # obstacle zone: tan
    3: (170, 140, 70),  # excavation zone: ochre
    4: (70, 140, 80),  # construction zone: green
    5: (50, 110, 60),  # berm: dark green
}
_ZONE_ORDER = (2, 3, 1, 4, 5)  # later ones paint over earlier ones (berm on top of construction)
_ROCK = (80, 80, 85)
_CRATER = (45, 38, 35)
_CRATER_RIM = (160, 150, 140)
_ORB = (250, 210, 40)
_ROVER = (235, 235, 240)
_ROVER_NOSE = (220, 60, 50)
_FOV = np.array([255.0, 255.0, 200.0])
_FOV_ALPHA = 0.18


def _pixel_box(
    xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, reach: float
) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Row/column slices covering a square of half-size `reach` around (cx, cy), with the world
    coordinates of those pixel centres."""
    ppm = 1.0 / (xs[1] - xs[0]) if xs.size > 1 else 1.0
    c0 = max(int((cx - reach) * ppm), 0)
    c1 = min(int((cx + reach) * ppm) + 2, xs.size)
    top = ys[0] + 0.5 / ppm
    r0 = max(int((top - (cy + reach)) * ppm), 0)
    r1 = min(int((top - (cy - reach)) * ppm) + 2, ys.size)
    return slice(r0, r1), slice(c0, c1), xs[c0:c1][None, :], ys[r0:r1][:, None]


def _disc(
    img: np.ndarray, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float, colour: tuple[int, ...]
) -> None:
    rows, cols, px, py = _pixel_box(xs, ys, cx, cy, r)
    mask = (px - cx) ** 2 + (py - cy) ** 2 <= r * r
    img[rows, cols][mask] = colour


def render_arena(core: LunaboticsCore, i: int) -> np.ndarray:
    """An (H, W, 3) uint8 frame of arena `i`: zones, FOV cone, obstacles, orbs, rover."""
    cfg = core.cfg
    ppm = cfg.render_pixels_per_meter
    width = round(cfg.world_width * ppm)
    height = round(cfg.world_height * ppm)
    xs = (np.arange(width) + 0.5) / ppm
    ys = cfg.world_height - (np.arange(height) + 0.5) / ppm  # row 0 is the top (largest y)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = _GROUND
    for zid in _ZONE_ORDER:
        x0, y0, x1, y1 = core.zones[zid]
        in_cols = (xs >= x0) & (xs <= x1)
        in_rows = (ys >= y0) & (ys <= y1)
        img[np.ix_(in_rows, in_cols)] = _ZONE_COLOURS[zid]

    rx, ry = float(core.x[i]), float(core.y[i])
    th = math.atan2(float(core.sin_h[i]), float(core.cos_h[i]))
    # Sensor cone, blended over the field.
    rows, cols, px, py = _pixel_box(xs, ys, rx, ry, cfg.sensor_range)
    dx = px - rx
    dy = py - ry
    d2 = dx * dx + dy * dy
    ahead = dx * math.cos(th) + dy * math.sin(th)  # same cone test as the sensor
    cone = (d2 <= cfg.sensor_range**2) & (ahead >= np.sqrt(d2) * math.cos(cfg.sensor_fov / 2))
    view = img[rows, cols]
    view[cone] = (view[cone] * (1 - _FOV_ALPHA) + _FOV * _FOV_ALPHA).astype(np.uint8)

    for j in range(core.k):
        r = float(core.obs_r[j, i])
        if r <= 0.0:
            continue
        ox, oy = float(core.obs_x[j, i]), float(core.obs_y[j, i])
        if core.obs_crater[j, i]:
            _disc(img, xs, ys, ox, oy, r, _CRATER_RIM)
            _disc(img, xs, ys, ox, oy, r * 0.8, _CRATER)
        else:
            _disc(img, xs, ys, ox, oy, r, _ROCK)
    for j in range(core.o):
        if core.orb_on_ground[j, i]:
            _disc(img, xs, ys, float(core.orb_x[j, i]), float(core.orb_y[j, i]), cfg.orb_radius, _ORB)

    # Rover body as an oriented rectangle, a red nose on its front edge, the carried orb on top.
    hl, hw = cfg.rover_half_length, cfg.rover_half_width
    rows, cols, px, py = _pixel_box(xs, ys, rx, ry, math.hypot(hl, hw))
    c, s = math.cos(th), math.sin(th)
    lx = (px - rx) * c + (py - ry) * s
    ly = (py - ry) * c - (px - rx) * s
    body = (np.abs(lx) <= hl) & (np.abs(ly) <= hw)
    nose = body & (lx >= hl * 0.6)
    view = img[rows, cols]
    view[body] = _ROVER
    view[nose] = _ROVER_NOSE
    if core.holding[i]:
        _disc(img, xs, ys, rx, ry, max(cfg.orb_radius, hw * 0.5), _ORB)
    return img
