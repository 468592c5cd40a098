"""SYNTH_MT scene description: the class lists, the primitives (sphere, box, frustum) with their ray
intersections, and the random sampling of a room, its objects, materials, lights and camera."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

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

_ROOM_CLASSES = ("floor", "wall", "ceiling")
_OBJECT_KINDS = ("sphere", "box", "cylinder", "cone")
# Room instances: the floor, the ceiling, then the walls x = 0, x = X, z = 0, z = Z. Objects follow.
_ROOM_INSTANCE_CLASS = ("floor", "ceiling", "wall", "wall", "wall", "wall")
_EPS = 1e-9


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

