"""SYNTH_MT generator: procedural rooms with textured primitives, ray-cast with a pinhole camera into an
image and exact dense targets (semseg, parts, depth, normals, edges, saliency), written to disk."""

from __future__ import annotations

import colorsys
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"

CLASSES: list[str] = ["floor", "wall", "ceiling", "sphere", "box", "cylinder", "cone"]
PART_CLASSES: list[str] = [
    "background",
    "sphere upper half",
    "sphere lower half",
    "box top",
    "box side",
    "cylinder top",
    "cylinder side",
    "cone top",
    "cone side",
]
# The semseg class each part belongs to; None for the room ("background" covers floor, walls, ceiling).
PART_SEMSEG: list[str | None] = [None, "sphere", "sphere", "box", "box", "cylinder", "cylinder", "cone", "cone"]

# Two 4-neighbours p (the nearer) and q form a depth discontinuity when q's depth differs from the depth
# of p's tangent plane along q's ray by more than this fraction of p's depth. The tangent plane makes the
# rule exact on planes however slanted, where a plain relative jump would fire at grazing angles.
DEPTH_EDGE_THRESHOLD = 0.1

_ROOM_CLASSES = ("floor", "wall", "ceiling")
_OBJECT_KINDS = ("sphere", "box", "cylinder", "cone")
# Room instances: the floor, the ceiling, then the walls x = 0, x = X, z = 0, z = Z. Objects follow.
_ROOM_INSTANCE_CLASS = ("floor", "ceiling", "wall", "wall", "wall", "wall")
_EPS = 1e-9
# linear intensity -> 8-bit sRGB-like value (gamma 2.2); a table lookup is much faster than a power
_GAMMA = (255.0 * np.linspace(0.0, 1.0, 4096) ** (1 / 2.2) + 0.5).astype(np.uint8)


@dataclass
class Scene:
    """One rendered view: the image and its exact per-pixel targets (H x W)."""

    image: np.ndarray  # uint8 H x W x 3
    semseg: np.ndarray  # int64 H x W, index into CLASSES
    parts: np.ndarray  # int64 H x W, index into PART_CLASSES
    depth: np.ndarray  # float32 H x W, z-depth in metres
    normals: np.ndarray  # float32 H x W x 3, camera frame (x right, y down, z forward), facing the camera
    edge: np.ndarray  # bool H x W, see _edges: instance boundaries and depth discontinuities
    sal: np.ndarray  # bool H x W, True on objects
    instance: np.ndarray  # int32 H x W: 0 floor, 1 ceiling, 2-5 walls, 6+ objects
    intrinsics: tuple[float, float, float, float]  # fx, fy, cx, cy in pixels; pixel centres at integers


# ----------------------------------------------------------------------------------------------------
# Primitives. Vectors are 3 x M arrays, one contiguous row per coordinate, which numpy handles several
# times faster than M x 3. Each ``hit(o, d)`` casts rays with origins o (3 x 1 or 3 x M) and directions
# d (3 x M) that start outside the primitive, and returns the ray parameter of the first hit (inf on a
# miss), the outward unit normal (3 x M) and the part index. Objects rest on the floor (y = 0, y is up),
# so their bottom faces can neither be seen nor cast a shadow and are left out.


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


# numpy's generic fancy indexing of 3 x M arrays is several times slower than these two
def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take(a, idx, axis=1)


def _put(a: np.ndarray, idx: np.ndarray, values: np.ndarray) -> None:
    for row, value in zip(a, values, strict=True):
        row[idx] = value


@dataclass(frozen=True)
class _Sphere:
    center: np.ndarray
    radius: float
    kind: ClassVar[str] = "sphere"

    @property
    def bound(self) -> tuple[np.ndarray, float]:
        return self.center, self.radius

    @property
    def footprint(self) -> float:
        return self.radius

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        oc = o - self.center[:, None]
        a = _dot(d, d)
        b = _dot(oc, d)
        c = _dot(oc, oc) - self.radius**2
        disc = b * b - a * c
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
        p = o + np.where(np.isfinite(t), t, 0.0) * d
        n = (p - self.center[:, None]) / self.radius
        upper = PART_CLASSES.index("sphere upper half")
        return t, n, np.where(p[1] >= self.center[1], upper, upper + 1)


@dataclass(frozen=True)
class _Box:
    center: np.ndarray  # the bottom face lies on the floor
    half: np.ndarray  # half extents along the box's own axes
    yaw: float  # rotation about the vertical axis
    kind: ClassVar[str] = "box"

    @property
    def bound(self) -> tuple[np.ndarray, float]:
        return self.center, float(np.linalg.norm(self.half))

    @property
    def footprint(self) -> float:
        return float(np.hypot(self.half[0], self.half[2]))

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        to_world = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
        ol = to_world.T @ (o - self.center[:, None])
        dl = to_world.T @ d
        half = self.half[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):  # slabs parallel to a ray give +-inf
            inv = 1.0 / dl
            t1 = (-half - ol) * inv
            t2 = (half - ol) * inv
        near = np.minimum(t1, t2)
        t_near = near.max(axis=0)
        t_far = np.maximum(t1, t2).min(axis=0)
        t = np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf)
        axis = near.argmax(axis=0)
        nl = np.where(axis == np.arange(3)[:, None], -np.sign(dl), 0.0)
        top = PART_CLASSES.index("box top")
        return t, to_world @ nl, np.where(nl[1] > 0, top, top + 1)


@dataclass(frozen=True)
class _Frustum:
    """A vertical capped cone frustum standing on the floor; a cylinder when both radii are equal."""

    kind: str  # "cylinder" or "cone"
    x: float
    z: float
    r_base: float
    r_top: float  # 0 for a pointed cone
    height: float

    @property
    def bound(self) -> tuple[np.ndarray, float]:
        return np.array([self.x, self.height / 2, self.z]), float(np.hypot(self.r_base, self.height / 2))

    @property
    def footprint(self) -> float:
        return self.r_base

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Side: x'^2 + z'^2 = (r_base - k y)^2 with 0 <= y <= height, a quadratic in t.
        k = (self.r_base - self.r_top) / self.height
        ox, oy, oz = o[0] - self.x, o[1], o[2] - self.z
        dx, dy, dz = d
        rho0 = self.r_base - k * oy
        a = dx * dx + dz * dz - k * k * dy * dy
        b = 2.0 * (ox * dx + oz * dz + k * dy * rho0)
        c = ox * ox + oz * oz - rho0 * rho0
        disc = b * b - 4.0 * a * c
        sq = np.sqrt(np.maximum(disc, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            linear = np.abs(a) < 1e-12  # ray parallel to a generatrix: a single root
            r1 = np.where(linear, -c / b, (-b - sq) / (2.0 * a))
            r2 = np.where(linear, np.inf, (-b + sq) / (2.0 * a))
        t_side = np.full(len(dx), np.inf)
        for root in (np.maximum(r1, r2), np.minimum(r1, r2)):  # the nearer valid root wins
            y = oy + root * dy
            ok = (disc >= 0) & (root > _EPS) & (y >= 0) & (y <= self.height)
            t_side = np.where(ok, root, t_side)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_cap = (self.height - oy) / dy
            cap_x, cap_z = ox + t_cap * dx, oz + t_cap * dz
        cap_ok = (t_cap > _EPS) & (cap_x * cap_x + cap_z * cap_z <= self.r_top**2)
        t_cap = np.where(cap_ok, t_cap, np.inf)
        on_cap = t_cap < t_side
        t = np.minimum(t_side, t_cap)

        tt = np.where(np.isfinite(t), t, 0.0)
        px, pz = ox + tt * dx, oz + tt * dz
        rho = np.maximum(np.hypot(px, pz), 1e-12)
        scale = 1.0 / np.hypot(1.0, k)
        n = np.stack([px / rho * scale, np.full_like(px, k * scale), pz / rho * scale])
        n = np.where(on_cap, np.array([[0.0], [1.0], [0.0]]), n)
        top = PART_CLASSES.index(f"{self.kind} top")
        return t, n, np.where(on_cap, top, top + 1)


# ----------------------------------------------------------------------------------------------------
# Scene sampling.


@dataclass(frozen=True)
class _Material:
    pattern: str  # "plain", "checkers", "stripes" or "noise"
    color_a: np.ndarray
    color_b: np.ndarray
    scale: float  # metres per checker, stripe period or noise cell
    direction: np.ndarray  # of the stripes
    origin: np.ndarray  # texture coordinates are positions relative to this point


@dataclass(frozen=True)
class _Light:
    directional: bool
    vector: np.ndarray  # direction towards the light (directional) or its position (point)
    color: np.ndarray  # intensity per channel


def _random_color(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]):
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb)


def _sample_material(rng: np.random.Generator, origin: np.ndarray, vivid: bool) -> _Material:
    saturation, value = ((0.45, 0.95), (0.45, 0.95)) if vivid else ((0.0, 0.35), (0.4, 0.9))
    color_a = _random_color(rng, saturation, value)
    if rng.uniform() < 0.5:
        color_b = color_a * rng.uniform(0.35, 0.75)  # same hue, darker
    else:
        color_b = _random_color(rng, saturation, value)
    direction = rng.normal(size=3)
    pattern = str(rng.choice(["plain", "checkers", "stripes", "noise"], p=[0.2, 0.3, 0.25, 0.25]))
    scale = rng.uniform(0.15, 0.6) if vivid else rng.uniform(0.3, 1.2)
    return _Material(pattern, color_a, color_b, scale, direction / np.linalg.norm(direction), origin)


def _sample_objects(rng: np.random.Generator, room: np.ndarray) -> list:
    """2-6 primitives on the floor, inside the room, whose footprints (plus a gap) do not overlap."""
    count = int(rng.integers(2, 7))
    objects: list = []
    for _ in range(50 * count):
        if len(objects) == count:
            break
        kind = _OBJECT_KINDS[int(rng.integers(len(_OBJECT_KINDS)))]
        x, z = rng.uniform(0.3, room[0] - 0.3), rng.uniform(0.3, room[2] - 0.3)
        if kind == "sphere":
            r = rng.uniform(0.2, 0.55)
            obj = _Sphere(np.array([x, r, z]), r)
        elif kind == "box":
            half = np.array([rng.uniform(0.15, 0.55), rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.55)])
            obj = _Box(np.array([x, half[1], z]), half, rng.uniform(0.0, np.pi))
        elif kind == "cylinder":
            r = rng.uniform(0.15, 0.45)
            obj = _Frustum("cylinder", x, z, r, r, rng.uniform(0.3, 1.4))
        else:
            r = rng.uniform(0.2, 0.55)
            r_top = 0.0 if rng.uniform() < 0.5 else r * rng.uniform(0.2, 0.6)
            obj = _Frustum("cone", x, z, r, r_top, rng.uniform(0.4, 1.4))
        f = obj.footprint
        inside = 0.05 + f <= x <= room[0] - 0.05 - f and 0.05 + f <= z <= room[2] - 0.05 - f
        apart = all(np.hypot(x - o.bound[0][0], z - o.bound[0][2]) > f + o.footprint + 0.1 for o in objects)
        if inside and apart:
            objects.append(obj)
    return objects


def _camera_axes(position: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right, down and forward unit vectors (... x 3) of level cameras at ``position`` looking at ``target``."""
    forward = target - position
    forward = forward / np.linalg.norm(forward, axis=-1, keepdims=True)
    right = np.stack([-forward[..., 2], np.zeros_like(forward[..., 0]), forward[..., 0]], axis=-1)
    right = right / np.linalg.norm(right, axis=-1, keepdims=True)
    return right, np.cross(forward, right), forward


def _sample_camera(
    rng: np.random.Generator, room: np.ndarray, objects: list, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """A pinhole camera inside the room looking roughly at the objects: among random positions, the
    one that frames the most object centres from a comfortable distance. Returns the position, the
    camera-to-world rotation (columns: x right, y down, z forward) and the intrinsics."""
    h, w = size
    fov = np.deg2rad(rng.uniform(50.0, 80.0))  # across the larger image side
    f = max(h, w) / 2 / np.tan(fov / 2)
    intrinsics = (float(f), float(f), (w - 1) / 2, (h - 1) / 2)

    centers = np.stack([o.bound[0] for o in objects])
    footprints = np.array([o.footprint for o in objects])
    target = centers.mean(axis=0) + rng.normal(0.0, 0.25, size=3)
    target[1] = rng.uniform(0.1, 0.7)
    low, high = np.array([0.3, 0.9, 0.3]), room - np.array([0.3, 0.5, 0.3])
    positions = rng.uniform(low, high, size=(24, 3))
    clearance = np.hypot(*(positions[:, None, [0, 2]] - centers[None, :, [0, 2]]).transpose(2, 0, 1))
    distance = np.hypot(*(positions[:, [0, 2]] - target[[0, 2]]).T)
    right, down, forward = _camera_axes(positions, target)
    rel = centers[None] - positions[:, None]
    x, y, z = (np.einsum("kni,ki->kn", rel, axis) for axis in (right, down, forward))
    framed = (z > 0.3) & (np.abs(x) * f < 0.45 * w * z) & (np.abs(y) * f < 0.45 * h * z)
    score = framed.sum(axis=1) + 0.5 * ((distance >= 1.5) & (distance <= 5.0))
    margin = (clearance - footprints).min(axis=1)
    score = np.where((margin > 0.3) & (distance >= 1.0), score, -np.inf)
    # in a crowded room no candidate may qualify: then take the one farthest from every object
    position = positions[np.argmax(score) if np.isfinite(score.max()) else np.argmax(margin)]
    right, down, forward = _camera_axes(position, target)
    roll = np.deg2rad(rng.uniform(-6.0, 6.0))
    c, s = np.cos(roll), np.sin(roll)
    rotation = np.stack([c * right + s * down, -s * right + c * down, forward], axis=1)
    return position, rotation, intrinsics


def _sample_lights(rng: np.random.Generator, room: np.ndarray) -> tuple[float, list[_Light]]:
    ambient = rng.uniform(0.15, 0.3)
    lights = []
    for _ in range(int(rng.integers(1, 3))):
        tint = 1.0 - rng.uniform(0.0, 0.15, size=3)
        if rng.uniform() < 0.5:
            azimuth, elevation = rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(35.0, 80.0))
            vector = np.array([
                np.cos(elevation) * np.cos(azimuth), np.sin(elevation), np.cos(elevation) * np.sin(azimuth)
            ])
            lights.append(_Light(True, vector, tint * rng.uniform(0.6, 0.95)))
        else:
            position = np.array([
                rng.uniform(0.3, room[0] - 0.3), room[1] - rng.uniform(0.2, 0.5), rng.uniform(0.3, room[2] - 0.3)
            ])
            lights.append(_Light(False, position, tint * rng.uniform(0.9, 1.4)))
    return ambient, lights


# ----------------------------------------------------------------------------------------------------
# Ray casting and shading.


def _hit_room(o: np.ndarray, d: np.ndarray, room: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rays from o inside the closed room [0, X] x [0, Y] x [0, Z]: ray parameter, inward normal, instance."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_axes = np.where(d > 0, (room - o)[:, None] / d, -o[:, None] / d)
    t_axes[d == 0] = np.inf
    axis = t_axes.argmin(axis=0)
    hit_axis = axis == np.arange(3)[:, None]
    n = np.where(hit_axis, -np.sign(d), 0.0)
    positive = (hit_axis & (d > 0)).any(axis=0)
    # axis 0 -> walls 2 / 3, axis 1 -> floor 0 / ceiling 1, axis 2 -> walls 4 / 5
    instance = np.array([2, 0, 4], dtype=np.int32)[axis] + positive
    return t_axes.min(axis=0), n, instance


def _bound_candidates(o: np.ndarray, d: np.ndarray, dd: np.ndarray, obj, t_max: np.ndarray) -> np.ndarray:
    """Indices of the rays that may hit ``obj`` before ``t_max``: a cheap bounding-sphere test.
    ``dd`` holds the rays' squared lengths."""
    center, radius = obj.bound
    oc = o - center[:, None]
    b = _dot(oc, d)
    disc = b * b - dd * (_dot(oc, oc) - radius**2)
    sq = np.sqrt(np.maximum(disc, 0.0))
    return np.flatnonzero((disc >= 0) & (sq > b) & (-b - sq < t_max * dd))


def _cast(o: np.ndarray, d: np.ndarray, room: np.ndarray, objects: list):
    """First hit of rays from the camera at o: ray parameter, unit normal, instance id and part index."""
    t, n, instance = _hit_room(o, d, room)
    part = np.zeros(len(t), dtype=np.int64)
    o = o[:, None]
    dd = _dot(d, d)
    order = np.argsort([np.linalg.norm(obj.bound[0] - o[:, 0]) for obj in objects])  # near first culls more
    for k in order:
        idx = _bound_candidates(o, d, dd, objects[k], t)
        if len(idx) == 0:
            continue
        tk, nk, pk = objects[k].hit(o, _take(d, idx))
        closer = np.flatnonzero(tk < t[idx])
        idx = idx[closer]
        t[idx], part[idx] = tk[closer], pk[closer]
        _put(n, idx, _take(nk, closer))
        instance[idx] = len(_ROOM_INSTANCE_CLASS) + k
    return t, n, instance, part


def _in_shadow(points: np.ndarray, to_light: np.ndarray, t_max: np.ndarray, objects: list, owner: np.ndarray):
    """Whether the segment from each point towards its light is blocked by an object. A point's own
    object is skipped: a convex solid cannot shadow its lit side."""
    blocked = np.zeros(points.shape[1], dtype=bool)
    dd = _dot(to_light, to_light)
    for k, obj in enumerate(objects):
        idx = _bound_candidates(points, to_light, dd, obj, t_max)
        idx = idx[~blocked[idx] & (owner[idx] != k)]
        if len(idx) == 0:
            continue
        tk, _, _ = obj.hit(_take(points, idx), _take(to_light, idx))
        blocked[idx[tk < t_max[idx]]] = True
    return blocked


def _value_noise(p: np.ndarray, lattice: np.ndarray) -> np.ndarray:
    """Smooth 3D value noise in [0, 1]: a periodic random lattice interpolated with smoothstep weights."""
    size = lattice.shape[0]
    cell = np.floor(p)
    frac = p - cell
    w = frac * frac * (3.0 - 2.0 * frac)
    lo = cell.astype(np.int64) % size
    hi = (lo + 1) % size
    flat = lattice.ravel()
    out = np.zeros(p.shape[1])
    for cx in (0, 1):
        ix, wx = (hi[0], w[0]) if cx else (lo[0], 1 - w[0])
        for cy in (0, 1):
            iy, wy = (hi[1], w[1]) if cy else (lo[1], 1 - w[1])
            for cz in (0, 1):
                iz, wz = (hi[2], w[2]) if cz else (lo[2], 1 - w[2])
                out += flat[(ix * size + iy) * size + iz] * (wx * wy * wz)
    return out


def _albedo(points: np.ndarray, material: _Material, lattice: np.ndarray) -> np.ndarray:
    """Solid (3D) procedural texture, so one formula serves planes and curved primitives alike."""
    q = (points - material.origin[:, None]) / material.scale
    if material.pattern == "plain":
        mix = np.zeros(q.shape[1])
    elif material.pattern == "checkers":
        # the offset keeps surfaces lying exactly on a cell boundary (the floor at y = 0) off it
        mix = (np.floor(q + 1e-3).sum(axis=0) % 2).astype(np.float64)
    elif material.pattern == "stripes":
        mix = (np.sin(2 * np.pi * (material.direction @ q)) > 0).astype(np.float64)
    else:
        mix = 0.65 * _value_noise(q, lattice) + 0.35 * _value_noise(2.3 * q, lattice)
        mix = np.clip((mix - 0.3) / 0.4, 0.0, 1.0)
    return material.color_a[:, None] + mix * (material.color_b - material.color_a)[:, None]


def _shade(points, normals, instance, materials, lights, ambient, objects, lattice) -> np.ndarray:
    """Gamma-encoded Lambertian shading with hard shadows cast by the objects, 3 x N uint8."""
    # texture each instance on a contiguous run of pixels: two gathers instead of two per instance
    order = np.argsort(instance.astype(np.uint8), kind="stable")  # radix sort: < 256 instances
    sorted_points = _take(points, order)
    starts = np.searchsorted(instance[order], np.arange(len(materials) + 1))
    sorted_albedo = np.empty_like(points)
    for k, material in enumerate(materials):
        if starts[k] < starts[k + 1]:
            run = slice(starts[k], starts[k + 1])
            sorted_albedo[:, run] = _albedo(sorted_points[:, run], material, lattice)
    albedo = np.empty_like(points)
    _put(albedo, order, sorted_albedo)
    irradiance = np.full_like(points, ambient)
    offset = points + 1e-6 * normals
    owner = instance.astype(np.int64) - len(_ROOM_INSTANCE_CLASS)  # object index, negative in the room
    for light in lights:
        if light.directional:
            to_light = np.repeat(light.vector[:, None], points.shape[1], axis=1)
            falloff = 1.0
            t_max = np.full(points.shape[1], np.inf)
        else:
            to_light = light.vector[:, None] - points
            t_max = np.sqrt(_dot(to_light, to_light))
            to_light = to_light / t_max
            falloff = 1.0 / (1.0 + (t_max / 3.0) ** 2)
        cosine = np.maximum(_dot(normals, to_light), 0.0)
        lit = np.flatnonzero(cosine > 0)
        shadow = _in_shadow(_take(offset, lit), _take(to_light, lit), t_max[lit], objects, owner[lit])
        cosine[lit[shadow]] = 0.0
        irradiance += (cosine * falloff) * light.color[:, None]
    linear = np.clip(albedo * irradiance, 0.0, 1.0)
    return _GAMMA[(linear * (len(_GAMMA) - 1) + 0.5).astype(np.intp)]


def _edges(instance: np.ndarray, depth: np.ndarray, normals: np.ndarray, rays: np.ndarray) -> np.ndarray:
    """Boundary pixels: for each pair of 4-neighbours that belong to different instances or straddle a
    depth discontinuity (see ``DEPTH_EDGE_THRESHOLD``), the nearer pixel (ties: the lower instance id).
    ``normals`` are H x W x 3, ``rays`` the camera-frame pixel rays (x, y, 1) as 3 x H x W."""
    z = depth.astype(np.float64)
    n = normals.astype(np.float64).transpose(2, 0, 1)
    edge = np.zeros(depth.shape, dtype=bool)
    for sl_p, sl_q in (
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),  # vertical pairs
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),  # horizontal pairs
    ):
        zp, zq, ip, iq = z[sl_p], z[sl_q], instance[sl_p], instance[sl_q]
        p_near = (zp < zq) | ((zp == zq) & (ip < iq))
        near, far = (slice(None), *sl_p), (slice(None), *sl_q)
        jump = np.where(
            p_near,
            _depth_jump(zp, zq, n[near], rays[near], rays[far]),
            _depth_jump(zq, zp, n[far], rays[far], rays[near]),
        )
        boundary = (ip != iq) | jump
        edge[sl_p] |= boundary & p_near
        edge[sl_q] |= boundary & ~p_near
    return edge


def _depth_jump(z_near, z_far, n_near, r_near, r_far) -> np.ndarray:
    """Whether the far pixel leaves the near pixel's tangent plane by more than the threshold."""
    facing = _dot(n_near, r_far)
    with np.errstate(divide="ignore", invalid="ignore"):
        predicted = z_near * _dot(n_near, r_near) / facing
    return (facing >= 0) | (np.abs(z_far - predicted) > DEPTH_EDGE_THRESHOLD * z_near)


def render_scene(rng: np.random.Generator, size: tuple[int, int]) -> Scene:
    """Sample a random room with 2-6 textured primitives, lights and a camera, and ray-cast one view
    of ``size`` (H, W) pixels, each at least 16."""
    h, w = size = _check_size(size)
    room = np.array([rng.uniform(4.0, 8.0), rng.uniform(2.6, 3.4), rng.uniform(4.0, 8.0)])
    objects = _sample_objects(rng, room)
    position, rotation, intrinsics = _sample_camera(rng, room, objects, size)
    ambient, lights = _sample_lights(rng, room)
    materials = [_sample_material(rng, np.zeros(3), vivid=False) for _ in _ROOM_INSTANCE_CLASS]
    materials += [_sample_material(rng, obj.bound[0], vivid=True) for obj in objects]
    lattice = rng.uniform(size=(16, 16, 16))

    fx, fy, cx, cy = intrinsics
    v, u = np.mgrid[0:h, 0:w]
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones((h, w))])  # camera frame, z = 1
    d = rotation @ rays.reshape(3, -1)
    # z = 1 in the camera frame makes the ray parameter of a hit its z-depth
    # rays start outside every object, so the first hits' outward normals (inward for the room)
    # already face the camera
    t, n_world, instance, part = _cast(position, d, room, objects)
    points = position[:, None] + t * d
    image = _shade(points, n_world, instance, materials, lights, ambient, objects, lattice)

    semseg_of = [CLASSES.index(c) for c in _ROOM_INSTANCE_CLASS] + [CLASSES.index(o.kind) for o in objects]
    semseg = np.asarray(semseg_of, dtype=np.int64)[instance].reshape(h, w)
    depth = t.astype(np.float32).reshape(h, w)
    normals = rotation.T @ n_world
    normals = normals / np.sqrt(_dot(normals, normals))
    normals = np.ascontiguousarray(normals.reshape(3, h, w).transpose(1, 2, 0), dtype=np.float32)
    instance = instance.reshape(h, w)
    return Scene(
        image=np.ascontiguousarray(image.T.reshape(h, w, 3)),
        semseg=semseg,
        parts=part.reshape(h, w),
        depth=depth,
        normals=normals,
        edge=_edges(instance, depth, normals, rays),
        sal=semseg >= len(_ROOM_CLASSES),
        instance=instance,
        intrinsics=intrinsics,
    )


# ----------------------------------------------------------------------------------------------------
# Writing a dataset.

_FILES = {
    "images": "<id>.png RGB uint8",
    "segmentation": "<id>.png uint8, 0 = ignore, k + 1 = classes.semseg[k]",
    "parts": "<id>.png uint8, 0 = ignore, k + 1 = classes.parts[k]",
    "depth": "<id>.npy float32 z-depth in metres, 0 = invalid",
    "normals": "<id>.npy float32 H x W x 3 unit normals in the camera frame facing the camera, 0 = invalid",
    "edge": "<id>.png uint8, 255 = edge (the nearer pixel of 4-neighbours on different objects or room planes, "
    "or across a depth discontinuity), 0 = no edge",
    "sal": "<id>.png uint8, 255 = salient (object), 0 = background (room)",
    "gt_sets": "<split>.txt one sample id per line",
    "cameras.json": "{id: {fx, fy, cx, cy}} pinhole intrinsics in pixels, pixel centres at integer coordinates",
}


def _meta(n_train: int, n_val: int, size: tuple[int, int], seed: int) -> dict:
    return {
        "name": "SYNTH_MT",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": [size[0], size[1]],
        "splits": {"train": n_train, "val": n_val},
        "classes": {"semseg": list(CLASSES), "parts": list(PART_CLASSES)},
        "depth_unit": "m",
        "normals_frame": "camera: x right, y down, z forward",
        "files": dict(_FILES),
    }


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = size
        ok = all(not isinstance(s, bool) and isinstance(s, (int, np.integer)) and s >= 16 for s in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"SYNTH_MT: size must be a pair of integers (H, W), each >= 16, got {size!r}")
    return int(h), int(w)


def _check_args(n_train: int, n_val: int, size: tuple[int, int], seed: int) -> tuple[int, int]:
    for name, value in (("n_train", n_train), ("n_val", n_val)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"SYNTH_MT: {name} must be an integer >= 0, got {value!r}")
    if n_train + n_val == 0:
        raise ValueError("SYNTH_MT: n_train + n_val must be > 0, got 0 samples in total")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"SYNTH_MT: seed must be an integer >= 0, got {seed!r}")
    return _check_size(size)


def _existing_meta(out: Path) -> dict | None:
    """The meta of a SYNTH_MT dataset at ``out``, None if ``out`` is missing or an empty directory."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"SYNTH_MT: output path {out} exists and is not a directory")
    if not any(out.iterdir()):
        return None
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("name") != "SYNTH_MT":
        raise FileExistsError(
            f"SYNTH_MT: output directory {out} is not empty and holds no SYNTH_MT dataset "
            f"(no valid meta.json with name SYNTH_MT); pick another directory"
        )
    return meta


def _check_same_dataset(meta: dict, wanted: dict, out: Path) -> None:
    keys = ("generator_version", "seed", "size", "splits")
    if all(meta.get(k) == wanted[k] for k in keys):
        return
    have = {k: meta.get(k) for k in keys}
    want = {k: wanted[k] for k in keys}
    raise FileExistsError(
        f"SYNTH_MT: {out} already holds a SYNTH_MT dataset made with {have}, not the requested {want}; "
        f"pick another directory or delete it"
    )


def _save_png(array: np.ndarray, mode: str, path: Path) -> None:
    # the fastest zlib level: files grow by a quarter, encoding is three times faster
    Image.fromarray(array, mode=mode).save(path, compress_level=1)


def _write_sample(root: Path, sample_id: str, scene: Scene) -> None:
    _save_png(scene.image, "RGB", root / "images" / f"{sample_id}.png")
    _save_png((scene.semseg + 1).astype(np.uint8), "L", root / "segmentation" / f"{sample_id}.png")
    _save_png((scene.parts + 1).astype(np.uint8), "L", root / "parts" / f"{sample_id}.png")
    _save_png(scene.edge.astype(np.uint8) * 255, "L", root / "edge" / f"{sample_id}.png")
    _save_png(scene.sal.astype(np.uint8) * 255, "L", root / "sal" / f"{sample_id}.png")
    np.save(root / "depth" / f"{sample_id}.npy", scene.depth)
    np.save(root / "normals" / f"{sample_id}.npy", scene.normals)


def _write_dataset(root: Path, meta: dict, n_train: int, n_val: int, size, seed: int, progress: bool) -> None:
    for folder in ("images", "segmentation", "parts", "depth", "normals", "edge", "sal", "gt_sets"):
        (root / folder).mkdir()
    ids = [f"{i:06d}" for i in range(n_train + n_val)]
    cameras = {}
    for i in tqdm(range(len(ids)), desc="SYNTH_MT", unit="sample", disable=not progress):
        scene = render_scene(np.random.default_rng([seed, i]), size)
        _write_sample(root, ids[i], scene)
        cameras[ids[i]] = dict(zip(("fx", "fy", "cx", "cy"), map(float, scene.intrinsics), strict=True))
    (root / "gt_sets" / "train.txt").write_text("".join(f"{i}\n" for i in ids[:n_train]))
    (root / "gt_sets" / "val.txt").write_text("".join(f"{i}\n" for i in ids[n_train:]))
    (root / "cameras.json").write_text(json.dumps(cameras, indent=1, sort_keys=True) + "\n")
    # meta.json last: its presence marks a complete dataset
    (root / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def generate(
    out: str | Path,
    n_train: int,
    n_val: int,
    size: tuple[int, int] = (128, 128),
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write a SYNTH_MT dataset of ``n_train`` + ``n_val`` samples of ``size`` (H, W) to ``out``.

    Sample i is rendered from ``numpy.random.default_rng([seed, i])``, so the same arguments give the
    same bytes. The dataset is written to a temporary sibling directory and renamed into place at the
    end. An ``out`` that already holds the same dataset is returned as is; a non-empty ``out`` holding
    anything else is refused.
    """
    size = _check_args(n_train, n_val, size, seed)
    out = Path(out)
    meta = _meta(int(n_train), int(n_val), size, int(seed))
    existing = _existing_meta(out)
    if existing is not None:
        _check_same_dataset(existing, meta, out)
        log.info("SYNTH_MT at %s already matches the requested dataset; reusing it", out)
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_dataset(tmp, meta, int(n_train), int(n_val), size, int(seed), progress)
        if out.is_dir():
            out.rmdir()  # empty: checked above
        try:
            tmp.rename(out)
        except OSError:
            # another process finished the same dataset first: keep theirs if it matches
            existing = _existing_meta(out)
            if existing is None:
                raise
            _check_same_dataset(existing, meta, out)
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("SYNTH_MT: wrote %d train + %d val samples of size %s to %s", n_train, n_val, size, out)
    return out
