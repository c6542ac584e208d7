"""Pure geometry of the Lunabotics env: arctan, rectangle-circle overlap, zones, frustum sensor."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.envs.lunabotics_physics import (
    KEY_INVALID,
    SENTINEL_ANGLE,
    SENTINEL_DIST,
    distance_to_rect,
    fast_atan2,
    frustum_sensor,
    pack_keys,
    rect_circle_penetration,
    rover_extent,
    smallest_keys,
    wrap_angle,
    zone_of,
)

FOV = 2 * math.pi / 3  # 120 degree cone


def test_fast_atan2_matches_numpy_everywhere() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=20000) * rng.choice([1e-3, 1.0, 1e3], size=20000)
    x = rng.normal(size=20000) * rng.choice([1e-3, 1.0, 1e3], size=20000)
    axes = np.array([0.0, 1.0, -1.0, 0.0, 0.0, 2.0, -2.0])
    axes_x = np.array([0.0, 0.0, 0.0, 1.0, -1.0, 2.0, -2.0])
    y = np.concatenate([y, axes])
    x = np.concatenate([x, axes_x])
    ref = np.arctan2(y, x)
    got64 = fast_atan2(y, x)
    got32 = fast_atan2(y.astype(np.float32), x.astype(np.float32))
    assert got32.dtype == np.float32
    assert np.max(np.abs(got64 - ref)) < 2e-7
    assert np.max(np.abs(got32.astype(np.float64) - ref)) < 5e-7
    assert np.all(np.abs(got32) <= np.float32(np.pi))


def test_wrap_angle_range() -> None:
    a = np.linspace(-20, 20, 1001)
    w = wrap_angle(a)
    assert np.all(w >= -np.pi) and np.all(w < np.pi)
    assert np.allclose(np.sin(w), np.sin(a)) and np.allclose(np.cos(w), np.cos(a))


def test_zone_of_uses_precedence_and_defaults_to_zero() -> None:
    rects = [(5, 0.0, 0.0, 1.0, 1.0), (4, 0.0, 0.0, 2.0, 2.0), (3, 3.0, 0.0, 4.0, 1.0)]
    x = np.array([0.5, 1.5, 3.5, 2.5, 1.0])
    y = np.array([0.5, 1.5, 0.5, 0.5, 1.0])
    assert zone_of(x, y, rects).tolist() == [5, 4, 3, 0, 5]


def test_distance_to_rect() -> None:
    rect = (1.0, 1.0, 2.0, 3.0)
    x = np.array([1.5, 0.0, 3.0, 4.0, 1.5])
    y = np.array([2.0, 2.0, 2.0, 7.0, 0.5])
    assert np.allclose(distance_to_rect(x, y, rect), [0.0, 1.0, 1.0, math.hypot(2.0, 4.0), 0.5])


def _pen(px: float, py: float, th: float, cx: float, cy: float, r: float) -> tuple[float, float, float]:
    d, nx, ny = rect_circle_penetration(
        np.array([px]), np.array([py]), np.array([math.cos(th)]), np.array([math.sin(th)]),
        0.3, 0.2, np.array([cx]), np.array([cy]), np.array([r]),
    )  # fmt: skip
    return float(d[0]), float(nx[0]), float(ny[0])


def test_rect_circle_face_corner_and_gap() -> None:
    # Circle ahead of the front face (rover faces +x): overlap 0.1, normal +x.
    d, nx, ny = _pen(0.0, 0.0, 0.0, 0.5, 0.0, 0.3)
    assert d == pytest.approx(0.1) and (nx, ny) == pytest.approx((1.0, 0.0))
    # The rover faces +y: the circle is beside its long side, 0.45 - 0.2 = 0.25 from it, overlap 0.05.
    d, nx, ny = _pen(0.0, 0.0, math.pi / 2, 0.45, 0.0, 0.3)
    assert d == pytest.approx(0.05) and (nx, ny) == pytest.approx((1.0, 0.0), abs=1e-12)
    # Near a corner: the distance is to the corner point (0.3, 0.2).
    d, nx, ny = _pen(0.0, 0.0, 0.0, 0.6, 0.6, 0.2)
    assert d == pytest.approx(0.2 - 0.5) and (nx, ny) == pytest.approx((0.6, 0.8))
    # Circle centre inside the rectangle: pushed out along the shallowest face (+y side).
    d, nx, ny = _pen(0.0, 0.0, 0.0, 0.0, 0.15, 0.1)
    assert d == pytest.approx(0.1 + 0.05) and (nx, ny) == pytest.approx((0.0, 1.0))


@settings(max_examples=80, deadline=None)
@given(
    px=st.floats(-2, 2),
    py=st.floats(-2, 2),
    th=st.floats(-math.pi, math.pi),
    cx=st.floats(-2, 2),
    cy=st.floats(-2, 2),
    r=st.floats(0.05, 0.6),
)
def test_rect_circle_agrees_with_brute_force(
    px: float, py: float, th: float, cx: float, cy: float, r: float
) -> None:
    d, nx, ny = _pen(px, py, th, cx, cy, r)
    # Brute force: sample the rectangle densely and measure its distance to the circle centre.
    u, v = np.meshgrid(np.linspace(-0.3, 0.3, 121), np.linspace(-0.2, 0.2, 81))
    wx = px + u * math.cos(th) - v * math.sin(th)
    wy = py + u * math.sin(th) + v * math.cos(th)
    nearest = np.min(np.hypot(wx - cx, wy - cy))
    lx = (cx - px) * math.cos(th) + (cy - py) * math.sin(th)
    ly = (cy - py) * math.cos(th) - (cx - px) * math.sin(th)
    if abs(lx) > 0.3 or abs(ly) > 0.2:  # centre outside the rectangle: depth is r minus the distance
        assert d == pytest.approx(r - nearest, abs=6e-3)
    else:
        assert d >= r
    assert math.hypot(nx, ny) == pytest.approx(1.0)
    # Moving the rover by -depth * n leaves the circle just touching (or clear).
    if d > 0:
        d2, _, _ = _pen(px - nx * d, py - ny * d, th, cx, cy, r)
        assert d2 <= 1e-9


def test_rover_extent_rotated() -> None:
    ex, ey = rover_extent(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.3, 0.2)
    assert ex.tolist() == pytest.approx([0.3, 0.2]) and ey.tolist() == pytest.approx([0.2, 0.3])


def test_smallest_keys_orders_by_distance_then_index() -> None:
    dist = np.array([[3.0, 1.0], [1.0, 1.0], [2.0, 5.0], [1.0, 0.5]], dtype=np.float32)
    valid = np.array([[True, True], [True, True], [True, False], [True, True]])
    keys = smallest_keys(pack_keys(dist, valid), 5)
    idx = np.where(keys >= KEY_INVALID, -1, (keys & 63).astype(int))
    assert idx[:, 0].tolist() == [1, 3, 2, 0, -1]  # tie 1.0/1.0 broken by index
    assert idx[:, 1].tolist() == [3, 0, 1, -1, -1]


def _sense(
    objects: list[tuple[float, float]],
    theta: float = 0.0,
    radius: list[float] | None = None,
    present: list[bool] | None = None,
    max_range: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    k = len(objects)
    cx = np.array([[o[0]] for o in objects]).reshape(k, 1)
    cy = np.array([[o[1]] for o in objects]).reshape(k, 1)
    mask = np.ones((k, 1), bool) if present is None else np.array(present).reshape(k, 1)
    rad = None if radius is None else np.array(radius, dtype=np.float64).reshape(k, 1)
    d, a = frustum_sensor(
        np.array([0.0]), np.array([0.0]), np.array([math.cos(theta)]), np.array([math.sin(theta)]),
        cx, cy, mask, max_range, FOV, 5, radius=rad,
    )  # fmt: skip
    return d[:, 0], a[:, 0]


def test_sensor_sorts_by_distance_and_pads_with_sentinel() -> None:
    d, a = _sense([(2.0, 0.0), (1.0, 0.0), (1.5, 0.0)])
    assert d.tolist() == pytest.approx([1.0, 1.5, 2.0, SENTINEL_DIST, SENTINEL_DIST])
    assert a.tolist() == pytest.approx([0.0, 0.0, 0.0, SENTINEL_ANGLE, SENTINEL_ANGLE])
    assert d.dtype == np.float32 and a.dtype == np.float32


def test_sensor_keeps_the_five_nearest() -> None:
    d, _ = _sense([(0.5 + 0.25 * i, 0.0) for i in range(8)][::-1])
    assert d.tolist() == pytest.approx([0.5, 0.75, 1.0, 1.25, 1.5])


def test_sensor_excludes_outside_fov_and_range() -> None:
    # 60 degrees is the cone's edge: 55 degrees is in, 65 degrees and straight behind are out.
    objs = [
        (math.cos(math.radians(55)), math.sin(math.radians(55))),
        (math.cos(math.radians(65)), math.sin(math.radians(65))),
        (-1.0, 0.0),
        (3.5, 0.0),  # beyond range
        (2.9, 0.0),
    ]
    d, a = _sense(objs)
    assert d[:2].tolist() == pytest.approx([1.0, 2.9], abs=1e-6)
    assert a[0] == pytest.approx(math.radians(55), abs=1e-6)
    assert d[2] == SENTINEL_DIST


def test_sensor_angle_sign_is_positive_to_the_left_and_relative_to_heading() -> None:
    d, a = _sense([(1.0, 0.5), (1.0, -0.2)])
    assert d[:2].tolist() == pytest.approx([math.hypot(1.0, 0.2), math.hypot(1.0, 0.5)])
    assert a[0] == pytest.approx(math.atan2(-0.2, 1.0), abs=1e-6)  # right of the heading: negative
    assert a[1] == pytest.approx(math.atan2(0.5, 1.0), abs=1e-6)  # left: positive
    # Rover facing +y: an object at (-0.5, 1) is ahead and to the left.
    d, a = _sense([(-0.5, 1.0)], theta=math.pi / 2)
    assert a[0] == pytest.approx(math.atan2(0.5, 1.0), abs=1e-6)
    # Rover facing -x (angle pi): its left is -y, so an object at (-1, -0.3) is to its left.
    d, a = _sense([(-1.0, -0.3)], theta=math.pi)
    assert a[0] == pytest.approx(math.atan2(0.3, 1.0), abs=1e-6)


def test_sensor_edge_distance_and_presence_mask() -> None:
    d, _ = _sense([(2.0, 0.0), (1.0, 0.0)], radius=[0.5, 1.5], present=[True, True])
    assert d[:2].tolist() == pytest.approx([0.0, 1.5])  # edge distance, floored at 0
    d, _ = _sense([(2.0, 0.0), (1.0, 0.0)], present=[True, False])
    assert d[:2].tolist() == pytest.approx([2.0, SENTINEL_DIST])
    # An obstacle whose centre is 3.2 m away but whose edge is 2.9 m away is within range.
    d, _ = _sense([(3.2, 0.0)], radius=[0.3])
    assert d[0] == pytest.approx(2.9, abs=1e-6)


def test_sensor_handles_no_objects() -> None:
    d, a = frustum_sensor(
        np.zeros(3), np.zeros(3), np.ones(3), np.zeros(3), np.zeros((0, 3)), np.zeros((0, 3)),
        np.zeros((0, 3), bool), 3.0, FOV, 5,
    )  # fmt: skip
    assert d.shape == (5, 3) and np.all(d == SENTINEL_DIST) and np.all(a == SENTINEL_ANGLE)
