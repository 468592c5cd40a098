"""SYNTH_MT rendering: ray casting a sampled scene, Lambertian shading with hard shadows, and the exact
per-pixel targets (semseg, parts, depth, normals, edges, saliency) of one view."""

from __future__ import annotations

import numpy as np

from rcm_nddr.data.synthetic_scene import (
    _ROOM_CLASSES,
    _ROOM_INSTANCE_CLASS,
    CLASSES,
    Scene,
    _dot,
    _Material,
    _put,
    _sample_camera,
    _sample_lights,
    _sample_material,
    _sample_objects,
    _take,
)

# Two 4-neighbours p (the nearer) and q form a depth discontinuity when q's depth differs from the depth
# of p's tangent plane along q's ray by more than this fraction of p's depth. The tangent plane makes the
# rule exact on planes however slanted, where a plain relative jump would fire at grazing angles.
DEPTH_EDGE_THRESHOLD = 0.1
# linear intensity -> 8-bit sRGB-like value (gamma 2.2); a table lookup is much faster than a power
_GAMMA = (255.0 * np.linspace(0.0, 1.0, 4096) ** (1 / 2.2) + 0.5).astype(np.uint8)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        h, w = size
        ok = all(not isinstance(s, bool) and isinstance(s, (int, np.integer)) and s >= 16 for s in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"SYNTH_MT: size must be a pair of integers (H, W), each >= 16, got {size!r}")
    return int(h), int(w)


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
