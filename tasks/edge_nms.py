"""Non-maximum suppression of an edge probability map, the one of the structured edge toolbox that SEISM's
contour reader applies to every prediction before thresholding it.

Sources: P. Dollar and C. L. Zitnick, "Fast Edge Detection Using Structured Forests", TPAMI 2015, and its
toolbox (github.com/pdollar/edges: ``private/edgesNmsMex.cpp`` for the suppression, ``edgesDetect.m`` for
the orientation; ``convTri`` and ``gradient2`` of Piotr's image toolbox for the smoothing and the
derivatives); SEISM (github.com/jponttuset/seism, ``src/io/read_one_cont_png.m``) runs it on each
predicted map with the parameters below (``NMS_RADIUS``, ``NMS_BORDER``, ``NMS_MULTIPLIER``) and an
orientation from the map smoothed by a triangle filter of radius ``ORIENTATION_RADIUS``. This is an
implementation of the published algorithm, written from its description, vectorized with torch (any
device, float32 like the toolbox):

1. orientation: S = the map convolved with the separable triangle filter of radius 4 (1-D taps
   1, 2, .., r + 1, .., 2, 1 over (r + 1)^2, symmetric border: the image mirrored including its edge
   pixel); first derivatives (Sx, Sy) and from them Sxx = d/dx Sx, Sxy = d/dx Sy, Syy = d/dy Sy, each a
   central difference (a[i + 1] - a[i - 1]) / 2 inside and a one-sided difference on the first and last
   row or column; O = atan(Syy * sign(-Sxy) / (Sxx + 1e-5)) taken modulo pi. x runs along a row
   (columns), y down a column (rows); O is the direction of the edge normal.
2. suppression: a pixel of value e > 0 is set to 0 when m * e < E(p + d * (cos O, sin O)) for some
   d in -r .. r, d != 0, the neighbour being interpolated bilinearly in the original map at the point
   (x + d cos O, y + d sin O), whose coordinates are first clamped to [0, W - 1.001] and [0, H - 1.001].
3. border: with s' = min(s, W // 2, H // 2), the values of column x are multiplied by x / s' for the
   s' first columns (x = 0 .. s' - 1) and likewise (W - 1 - x) / s' for the last ones, then the rows the
   same way: a linear ramp to 0 at the image border (nothing happens when s' = 0).

Properties of the toolbox's formula kept here: where Sxy is exactly 0, sign gives 0 and O = 0 (a normal
along x), so a ridge that is exactly constant along each row (a perfectly horizontal one) is compared
along its own length and not thinned; a plateau is not thinned either (its pixels are not below 1.01
times their equal neighbours). Where Sxx + 1e-5 and the numerator are both exactly 0 (0 / 0, undefined
in the toolbox), O = 0 here. A map with fewer than 2 rows or columns is returned unchanged (the toolbox's
interpolation needs two).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: r: the neighbours compared along the normal are at distances 1 .. r on each side
NMS_RADIUS = 1
#: s: the width in pixels of the border ramp to 0
NMS_BORDER = 5
#: m: a pixel is suppressed only when a neighbour exceeds m times its value (conservative suppression)
NMS_MULTIPLIER = 1.01
#: the radius of the triangle filter smoothing the map before the orientation is taken
ORIENTATION_RADIUS = 4
#: added to Sxx in the orientation's denominator
_ORIENTATION_EPS = 1e-5


def triangle_kernel(radius: int) -> Tensor:
    """The 1-D triangle filter of integer ``radius`` r: 1, 2, .., r + 1, .., 2, 1, divided by (r + 1)^2."""
    if radius < 0 or radius != int(radius):
        raise ValueError(f"triangle filter: the radius must be an integer >= 0, got {radius!r}")
    ramp = torch.arange(1, radius + 2, dtype=torch.float32)
    return torch.cat([ramp, ramp[:-1].flip(0)]) / (radius + 1) ** 2


def symmetric_index(size: int, pad: int, device: torch.device | None = None) -> Tensor:
    """Indices 0 .. size - 1 extended by ``pad`` on both sides with the symmetric border (the edge
    element repeated: .., 1, 0 | 0, 1, .., size - 1 | size - 1, size - 2, ..), periodic beyond one
    reflection like MATLAB's ``padarray(.., 'symmetric')``."""
    index = torch.arange(-pad, size + pad, device=device).remainder(2 * size)
    return torch.where(index >= size, 2 * size - 1 - index, index)


def conv_tri(values: Tensor, radius: int) -> Tensor:
    """A 2-D map convolved with the separable triangle filter of ``radius`` (``triangle_kernel``), the
    map extended by its symmetric border; radius 0 returns the map."""
    if values.ndim != 2:
        raise ValueError(f"conv_tri: expected a 2-D map, got shape {tuple(values.shape)}")
    if radius == 0:
        return values
    kernel = triangle_kernel(radius).to(values.device, values.dtype)
    height, width = values.shape
    rows = symmetric_index(height, radius, values.device)
    columns = symmetric_index(width, radius, values.device)
    padded = values[rows][:, columns][None, None]
    smoothed = F.conv2d(padded, kernel.view(1, 1, -1, 1))
    return F.conv2d(smoothed, kernel.view(1, 1, 1, -1))[0, 0]


def _derivative(values: Tensor, dim: int) -> Tensor:
    """Central differences along ``dim`` inside, one-sided ones at both ends; 0 along a side of length 1."""
    size = values.shape[dim]
    result = torch.zeros_like(values)
    if size < 2:
        return result
    result.narrow(dim, 1, size - 2).copy_((values.narrow(dim, 2, size - 2) - values.narrow(dim, 0, size - 2)) * 0.5)
    result.narrow(dim, 0, 1).copy_(values.narrow(dim, 1, 1) - values.narrow(dim, 0, 1))
    result.narrow(dim, size - 1, 1).copy_(values.narrow(dim, size - 1, 1) - values.narrow(dim, size - 2, 1))
    return result


def gradient(values: Tensor) -> tuple[Tensor, Tensor]:
    """(d/dx, d/dy) of a 2-D map, x along a row and y down a column (``_derivative``)."""
    return _derivative(values, 1), _derivative(values, 0)


def edge_orientation(edges: Tensor, radius: int = ORIENTATION_RADIUS) -> Tensor:
    """The toolbox's edge normal orientation in [0, pi) of each pixel of a 2-D map (see the module doc)."""
    sx, sy = gradient(conv_tri(edges, radius))
    sxx, _ = gradient(sx)
    sxy, syy = gradient(sy)
    orientation = torch.atan(syy * torch.sign(-sxy) / (sxx + _ORIENTATION_EPS))
    orientation = torch.nan_to_num(orientation, nan=0.0)
    return orientation.remainder(math.pi)


def _interpolate(values: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``values`` (H x W) bilinearly interpolated at (x, y), the point first clamped to [0, W - 1.001] x
    [0, H - 1.001] (so the four pixels used always exist)."""
    height, width = values.shape
    x = x.clamp(min=0.0).clamp(max=width - 1.001)
    y = y.clamp(min=0.0).clamp(max=height - 1.001)
    x0, y0 = x.floor(), y.floor()
    dx0, dy0 = x - x0, y - y0
    dx1, dy1 = 1 - dx0, 1 - dy0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = x0 + 1, y0 + 1
    return (
        values[y0, x0] * dx1 * dy1
        + values[y0, x1] * dx0 * dy1
        + values[y1, x0] * dx1 * dy0
        + values[y1, x1] * dx0 * dy0
    )


def border_ramp(size: int, border: int) -> Tensor:
    """The factor of each of ``size`` rows (or columns) of the border ramp of width ``border`` (> 0):
    i / border for the first ones, (size - 1 - i) / border for the last ones, 1 elsewhere."""
    index = torch.arange(size)
    distance = torch.minimum(index, size - 1 - index).clamp(max=border)
    return distance.float() / border


def edge_nms(
    edges: Tensor,
    radius: int = NMS_RADIUS,
    border: int = NMS_BORDER,
    multiplier: float = NMS_MULTIPLIER,
    orientation_radius: int = ORIENTATION_RADIUS,
) -> Tensor:
    """The non-maximum suppressed copy (float32, on the same device) of the 2-D edge map ``edges`` (values
    >= 0, e.g. probabilities): ``radius`` r, ``border`` s and ``multiplier`` m as in the module doc, the
    orientation from ``edge_orientation(edges, orientation_radius)``."""
    if edges.ndim != 2:
        raise ValueError(f"edge NMS: expected a 2-D map, got shape {tuple(edges.shape)}")
    edges = edges.float()
    height, width = edges.shape
    if height < 2 or width < 2:
        return edges.clone()
    orientation = edge_orientation(edges, orientation_radius)
    cos, sin = torch.cos(orientation), torch.sin(orientation)
    y, x = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=edges.device),
        torch.arange(width, dtype=torch.float32, device=edges.device),
        indexing="ij",
    )
    scaled = edges * multiplier
    suppressed = torch.zeros_like(edges, dtype=torch.bool)
    for d in range(-radius, radius + 1):
        if d:
            suppressed |= scaled < _interpolate(edges, x + d * cos, y + d * sin)
    result = torch.where(suppressed & (edges != 0), torch.zeros((), device=edges.device), edges)
    ramp = min(border, width // 2, height // 2)
    if ramp > 0:
        result = result * border_ramp(width, ramp).to(edges.device)[None, :]
        result = result * border_ramp(height, ramp).to(edges.device)[:, None]
    return result


__all__ = [
    "NMS_BORDER",
    "NMS_MULTIPLIER",
    "NMS_RADIUS",
    "ORIENTATION_RADIUS",
    "border_ramp",
    "conv_tri",
    "edge_nms",
    "edge_orientation",
    "gradient",
    "symmetric_index",
    "triangle_kernel",
]
