"""Vectorised 2D geometry for the Lunabotics env: pure numpy functions over (arenas, objects).

Conventions: world x to the right, y up, angles counter-clockwise from +x in radians. The rover is
an oriented rectangle (centre, heading, half-extents); obstacles and orbs are circles. Every
function works on any number of arenas (rows) so the batched env and its single-arena view run
the same arithmetic element by element, which keeps their trajectories bit-identical.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TWO_PI = 2.0 * np.pi

# Sensor padding for an empty slot: no real reading has a negative distance.
SENTINEL_DIST = -1.0
SENTINEL_ANGLE = 0.0

# Object selection packs a float32 distance's bit pattern with the object index in its low 6 bits
# into one uint32, so a plain min over the object axis yields both the nearest object and its index
# (numpy's argmin over a short axis loops per column and is slow). Hence at most 64 objects of a
# kind per arena. Unseen objects get KEY_INVALID or-ed in: above the bits of every finite float32.
# (np.where and boolean-mask assignment are avoided on big arrays: numpy runs them element by
# element with a branch each, ~20x slower than arithmetic.)
INDEX_BITS = 6
MAX_OBJECTS = 1 << INDEX_BITS
KEY_INVALID = np.uint32(0x7FFFFFC0)
KEY_NONE = KEY_INVALID  # pads missing slots (object index bits 0)
_MANTISSA_MASK = np.uint32(0xFFFFFFFF & ~(MAX_OBJECTS - 1))

# arctan on [0, 1] as x * P(x^2), |error| < 2e-8 (Abramowitz & Stegun 4.4.49).
_ATAN_COEFFS = (
    0.0028662257,
    -0.0161657367,
    0.0429096138,
    -0.0752896400,
    0.1065626393,
    -0.1420889944,
    0.1999355085,
    -0.3333314528,
    1.0,
)


def clip(a: np.ndarray, low: float | np.ndarray, high: float | np.ndarray) -> np.ndarray:
    """np.clip without its Python-level wrapper (which costs more than the arithmetic on small
    arrays)."""
    return np.minimum(np.maximum(a, low), high)


def any_true(mask: np.ndarray) -> bool:
    return bool(np.count_nonzero(mask))


def all_true(mask: np.ndarray) -> bool:
    return bool(np.count_nonzero(mask) == mask.size)


def wrap_angle(angle: np.ndarray) -> np.ndarray:
    """Wrap angles to [-pi, pi)."""
    return (angle + np.pi) % TWO_PI - np.pi


def fast_atan2(
    y: np.ndarray, x: np.ndarray, out: np.ndarray | None = None, work: list[np.ndarray] | None = None
) -> np.ndarray:
    """arctan2 in [-pi, pi] to within ~1e-7 rad, in the inputs' dtype (numpy's own arctan2 runs
    scalar libm code and would cost more than the rest of a step). `out` and `work` (four float
    and two bool arrays shaped like `x`) are optional preallocated buffers."""
    if out is None:
        out = np.empty_like(x)
    if work is None:
        work = [np.empty_like(x) for _ in range(4)] + [np.empty(x.shape, bool) for _ in range(2)]
    a, b, c, d, swap, neg = work
    dt = out.dtype.type
    ax = np.abs(x, out=a)
    ay = np.abs(y, out=b)
    np.greater(ay, ax, out=swap)
    np.less(x, 0, out=neg)
    big = np.maximum(ax, ay, out=c)
    ratio = np.minimum(ax, ay, out=d)
    np.maximum(big, dt(np.finfo(out.dtype).tiny), out=big)
    ratio /= big
    sq = np.multiply(ratio, ratio, out=c)
    angle = np.multiply(sq, dt(_ATAN_COEFFS[0]), out=out)
    for coeff in _ATAN_COEFFS[1:-1]:
        angle += dt(coeff)
        angle *= sq
    angle += dt(_ATAN_COEFFS[-1])
    angle *= ratio
    # Octant fix-ups as arithmetic on 0/1 masks (no np.where): angle -> pi/2 - angle where
    # |y| > |x|, then -> pi - angle where x < 0, then the sign of y.
    for mask, offset in ((swap, dt(np.pi / 2)), (neg, dt(np.pi))):
        fix = np.multiply(angle, dt(-2.0), out=a)
        fix += offset
        fix *= mask
        angle += fix
    return np.copysign(angle, y, out=angle)


def zone_of(x: np.ndarray, y: np.ndarray, rects: list[tuple[int, float, float, float, float]]) -> np.ndarray:
    """Zone id of each point; `rects` is (id, x0, y0, x1, y1) in precedence order (first wins),
    a point in no rectangle is zone 0. Bounds are inclusive."""
    zone = np.zeros(x.shape, dtype=np.int8)
    for zid, x0, y0, x1, y1 in reversed(rects):
        inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        zone += inside * (np.int8(zid) - zone)
    return zone


def distance_to_rect(x: np.ndarray, y: np.ndarray, rect: tuple[float, float, float, float]) -> np.ndarray:
    """Euclidean distance from each point to an axis-aligned rectangle (0 inside it)."""
    x0, y0, x1, y1 = rect
    dx = np.maximum(np.maximum(x0 - x, x - x1), 0.0)
    dy = np.maximum(np.maximum(y0 - y, y - y1), 0.0)
    return np.sqrt(dx * dx + dy * dy)


def rect_circle_penetration(
    px: np.ndarray,
    py: np.ndarray,
    cos_t: np.ndarray,
    sin_t: np.ndarray,
    half_length: float,
    half_width: float,
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overlap of oriented rectangles (rover pose arrays) with circles, element by element (the
    arrays broadcast together).

    Returns (depth, nx, ny): depth > 0 means overlap by that many metres, depth <= 0 is minus the
    gap; (nx, ny) is the unit world normal pointing from the rover towards the circle, so the rover
    leaves the overlap by moving -depth * n.
    """
    dx = cx - px
    dy = cy - py
    # Circle centre in the rover frame (x forward, y to the left).
    lx = dx * cos_t + dy * sin_t
    ly = dy * cos_t - dx * sin_t
    ex = lx - clip(lx, -half_length, half_length)
    ey = ly - clip(ly, -half_width, half_width)
    dist = np.sqrt(ex * ex + ey * ey)
    inside = dist <= 0.0
    safe = np.where(inside, 1.0, dist)
    nlx = ex / safe
    nly = ey / safe
    depth = radius - dist
    if any_true(inside):
        # Centre inside the rectangle: leave along the face with the least penetration.
        room_x = half_length - np.abs(lx)
        room_y = half_width - np.abs(ly)
        along_x = room_x <= room_y
        sx = np.where(lx >= 0.0, 1.0, -1.0)
        sy = np.where(ly >= 0.0, 1.0, -1.0)
        nlx = np.where(inside, np.where(along_x, sx, 0.0), nlx)
        nly = np.where(inside, np.where(along_x, 0.0, sy), nly)
        depth = np.where(inside, radius + np.where(along_x, room_x, room_y), depth)
    nx = nlx * cos_t - nly * sin_t
    ny = nlx * sin_t + nly * cos_t
    return depth, nx, ny


def rover_extent(
    cos_t: np.ndarray, sin_t: np.ndarray, half_length: float, half_width: float
) -> tuple[np.ndarray, np.ndarray]:
    """Half-size of the rover's axis-aligned bounding box (x, y)."""
    ac = np.abs(cos_t)
    as_ = np.abs(sin_t)
    return half_length * ac + half_width * as_, half_length * as_ + half_width * ac


def pack_keys(dist: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """uint32 keys that order objects by float32 distance, then object index.

    `dist` is (K, M) float32 and >= +0.0, objects along axis 0. The index replaces the low
    INDEX_BITS mantissa bits, so distances within ~1e-5 (relative) of each other count as equal and
    are ordered by index. Keys are unique per column; invalid entries are >= KEY_INVALID.
    """
    k = dist.shape[0]
    if k > MAX_OBJECTS:
        raise ValueError(f"at most {MAX_OBJECTS} objects per kind, got {k}")
    keys = np.bitwise_and(np.asarray(dist, np.float32).view(np.uint32), _MANTISSA_MASK)
    keys |= np.arange(k, dtype=np.uint32)[:, None]
    keys |= np.multiply(~valid, KEY_INVALID, dtype=np.uint32)
    return keys


def smallest_keys(keys: np.ndarray, count: int) -> np.ndarray:
    """The `count` smallest keys of each column of (K, M) uint32 `keys` (unique per column),
    ascending, as (count, M); rows past K are KEY_NONE. A key is valid when < KEY_INVALID."""
    out = np.full((count, keys.shape[1]), KEY_NONE, dtype=np.uint32)
    if keys.shape[0] == 0 or keys.shape[1] == 0:
        return out
    best = keys.min(axis=0)
    out[0] = best
    for j in range(1, min(count, keys.shape[0])):
        if all_true(best >= KEY_INVALID):
            break
        # Next larger key: subtract best + 1 with uint32 wrap-around, so keys <= best become huge.
        base = best + np.uint32(1)
        best = (keys - base).min(axis=0)
        best += base
        out[j] = best
    return out


class FrustumSensor:
    """Nearest `slots` objects of one kind inside a forward cone, sorted by distance, for up to
    `capacity` rovers at once, computed in float32 in preallocated buffers.

    An object is seen when its centre lies in the cone (bearing within +-fov/2, tested as
    forward >= |d| cos(fov/2), so no arctan is needed) and its distance is <= max_range. The
    distance is centre to centre, or to the object's edge (floored at 0) when radii are given. The
    angle is the bearing relative to the heading in [-pi, pi], positive to the left. Empty slots
    hold SENTINEL_DIST / SENTINEL_ANGLE. Order is by distance; see `pack_keys` for near-ties.
    """

    def __init__(self, num_objects: int, capacity: int, slots: int, max_range: float, fov: float) -> None:
        if num_objects > MAX_OBJECTS:
            raise ValueError(f"at most {MAX_OBJECTS} objects per kind, got {num_objects}")
        self.k = num_objects
        self.capacity = capacity
        self.slots = slots
        self.max_range = np.float32(max_range)
        self.cos_half_fov = np.float32(math.cos(fov / 2.0))
        size = max(num_objects, 1) * capacity
        f32 = np.float32
        self._dx, self._dy, self._fwd, self._dist, self._tmp = (np.empty(size, f32) for _ in range(5))
        self._seen, self._tmpb = np.empty(size, bool), np.empty(size, bool)
        self._keys, self._tmpu = np.empty(size, np.uint32), np.empty(size, np.uint32)
        self._index = np.arange(num_objects, dtype=np.uint32)[:, None]
        small = slots * capacity
        self._best = np.empty(small, np.uint32)
        self._flat = np.empty(small, np.intp)
        self._sel = [np.empty(small, f32) for _ in range(6)]
        self._work = [np.empty(small, f32) for _ in range(4)] + [np.empty(small, bool) for _ in range(2)]
        self._valid = np.empty(small, bool)
        self._arange = np.arange(capacity, dtype=np.intp)
        self._views: dict[int, dict[str, Any]] = {}

    def _views_for(self, m: int) -> dict[str, Any]:
        """Contiguous (rows, m) views of the flat buffers, cached per batch width m."""
        views = self._views.get(m)
        if views is None:
            if len(self._views) > 8:
                self._views.clear()
            k, slots = self.k, self.slots

            def view(buf: np.ndarray, rows: int) -> np.ndarray:
                return buf[: rows * m].reshape(rows, m)

            views = {
                "dx": view(self._dx, k), "dy": view(self._dy, k), "fwd": view(self._fwd, k),
                "dist": view(self._dist, k), "tmp": view(self._tmp, k), "seen": view(self._seen, k),
                "tmpb": view(self._tmpb, k), "keys": view(self._keys, k), "tmpu": view(self._tmpu, k),
                "best": view(self._best, slots), "flat": view(self._flat, slots),
                "valid": view(self._valid, slots), "sel": [view(b, slots) for b in self._sel],
                "work": [view(b, slots) for b in self._work], "arange": self._arange[:m],
            }  # fmt: skip
            self._views[m] = views
        return views

    def __call__(
        self,
        px: np.ndarray,
        py: np.ndarray,
        cos_t: np.ndarray,
        sin_t: np.ndarray,
        cx: np.ndarray,
        cy: np.ndarray,
        present: np.ndarray | None = None,
        radius: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rover arrays are (M,) with M <= capacity; object arrays are (K, M) float32, objects along
        axis 0; `present` optionally masks objects that exist (the env instead parks absent objects
        far outside the field, which the range test drops for free). Returns (dist, angle), each
        (slots, M) float32 views into internal buffers, valid until the next call."""
        f32 = np.float32
        m, k, slots = px.shape[0], self.k, self.slots
        if m > self.capacity:
            raise ValueError(f"{m} rovers for a sensor sized for {self.capacity}")

        v = self._views_for(m)
        sx, sy, fw, lf, dist_out, angle_out = v["sel"]
        if k == 0 or m == 0:
            dist_out.fill(SENTINEL_DIST)
            angle_out.fill(SENTINEL_ANGLE)
            return dist_out, angle_out
        c = cos_t.astype(f32)
        s = sin_t.astype(f32)
        dx = np.subtract(cx, px.astype(f32), out=v["dx"])
        dy = np.subtract(cy, py.astype(f32), out=v["dy"])
        tmp = v["tmp"]
        fwd = np.multiply(dx, c, out=v["fwd"])
        fwd += np.multiply(dy, s, out=tmp)
        dist = np.multiply(dx, dx, out=v["dist"])
        dist += np.multiply(dy, dy, out=tmp)
        np.sqrt(dist, out=dist)
        seen = np.greater_equal(fwd, np.multiply(dist, self.cos_half_fov, out=tmp), out=v["seen"])
        if radius is not None:
            # centre - radius is never -0.0 (centre >= +0, radius >= +0), and maximum maps
            # negatives to +0.0: keys compare bit patterns, so the sign bit must stay clear.
            dist -= radius
            np.maximum(dist, f32(0.0), out=dist)
        tmpb = v["tmpb"]
        seen &= np.less_equal(dist, self.max_range, out=tmpb)
        if present is not None:
            seen &= present
        # Keys: distance bits | object index | KEY_INVALID for unseen objects.
        keys = np.bitwise_and(dist.view(np.uint32), _MANTISSA_MASK, out=v["keys"])
        keys |= self._index
        tmpu = v["tmpu"]
        keys |= np.multiply(np.logical_not(seen, out=tmpb), KEY_INVALID, out=tmpu)
        best = v["best"]
        best.fill(KEY_NONE)
        keys.min(axis=0, out=best[0])
        for j in range(1, min(slots, k)):
            if all_true(best[j - 1] >= KEY_INVALID):
                break
            # Next larger key: subtract best + 1 with uint32 wrap-around, so keys <= best become huge.
            base = best[j - 1] + np.uint32(1)
            np.subtract(keys, base, out=tmpu).min(axis=0, out=best[j])
            best[j] += base
        valid = np.less(best, KEY_INVALID, out=v["valid"])
        if not any_true(valid[0]):
            dist_out.fill(SENTINEL_DIST)
            angle_out.fill(SENTINEL_ANGLE)
            return dist_out, angle_out
        flat = v["flat"]
        np.bitwise_and(best, np.uint32(MAX_OBJECTS - 1), out=flat, casting="unsafe")
        flat *= m
        flat += v["arange"]
        dx.ravel().take(flat, out=sx)
        dy.ravel().take(flat, out=sy)
        np.multiply(sx, c, out=fw)
        fw += np.multiply(sy, s, out=lf)
        np.multiply(sy, c, out=lf)
        lf -= np.multiply(sx, s, out=dist_out)
        fast_atan2(lf, fw, out=angle_out, work=v["work"])
        # Sentinels without np.where: dist * 1 + 0 or dist * 0 - 1; angle * 1 or * 0 (exact).
        dist.ravel().take(flat, out=dist_out)
        on = np.multiply(valid, f32(1.0), out=sx)
        dist_out *= on
        on -= f32(1.0)
        dist_out += on
        angle_out *= valid
        return dist_out, angle_out


def frustum_sensor(
    px: np.ndarray,
    py: np.ndarray,
    cos_t: np.ndarray,
    sin_t: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    present: np.ndarray,
    max_range: float,
    fov: float,
    slots: int,
    radius: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One-off `FrustumSensor` call (allocates its buffers; the env keeps a sensor instead)."""
    sensor = FrustumSensor(cx.shape[0], px.shape[0], slots, max_range, fov)
    f32 = np.float32
    d, a = sensor(
        px, py, cos_t, sin_t, np.asarray(cx, f32), np.asarray(cy, f32), present,
        None if radius is None else np.asarray(radius, f32),
    )  # fmt: skip
    return d.copy(), a.copy()
