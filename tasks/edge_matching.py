"""Boundary-benchmark machinery of the edge metric, on CPU numpy: thinning of binary maps to
one-pixel-wide lines, and one-to-one matching of predicted to ground-truth edge pixels within a
distance tolerance, counted at many thresholds at once."""

from __future__ import annotations

import math

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

#: the eight neighbours of a pixel as (dy, dx), counter-clockwise from the east one; neighbour i is
#: bit i of a neighbourhood code
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _guo_hall_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two sub-iterations of Guo & Hall's thinning (algorithm A1, 1989), indexed
    by the 8-neighbourhood code of a foreground pixel.

    With x1 .. x8 the neighbours counter-clockwise from the east one (x9 = x1), a pixel is deleted when
    G1: exactly one of the four pairs (x1, x2 | x3), (x3, x4 | x5), (x5, x6 | x7), (x7, x8 | x9) has
    its first pixel off and one of the other two on (the crossing number is 1);
    G2: 2 <= min(N1, N2) <= 3 with N1 = sum_k (x_{2k-1} | x_{2k}) and N2 = sum_k (x_{2k} | x_{2k+1});
    G3: (x2 | x3 | ~x8) & x1 is false in the first sub-iteration, and its 180-degree rotation
    (x6 | x7 | ~x4) & x5 is false in the second.
    """
    code = np.arange(256)
    x = [None] + [(code >> i) & 1 for i in range(8)]  # x[1] .. x[8]
    x.append(x[1])  # x9 = x1
    crossing = sum((1 - x[2 * k - 1]) & (x[2 * k] | x[2 * k + 1]) for k in range(1, 5))
    n1 = sum(x[2 * k - 1] | x[2 * k] for k in range(1, 5))
    n2 = sum(x[2 * k] | x[2 * k + 1] for k in range(1, 5))
    smallest = np.minimum(n1, n2)
    common = (crossing == 1) & (smallest >= 2) & (smallest <= 3)
    first = ((x[2] | x[3] | (1 - x[8])) & x[1]) == 0
    second = ((x[6] | x[7] | (1 - x[4])) & x[5]) == 0
    return common & first, common & second


_DELETE = _guo_hall_tables()


def _distinct(indices: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """``indices`` without repeats, in no particular order, in linear time: each position writes its
    number into ``scratch`` at its index, and exactly one position per index reads its own back."""
    order = np.arange(len(indices), dtype=scratch.dtype)
    scratch[indices] = order
    return indices[scratch[indices] == order]


def thin(mask: np.ndarray) -> np.ndarray:
    """Thin a 2-D boolean map to one-pixel-wide, 8-connected lines (to convergence).

    Guo & Hall's two-sub-iteration parallel thinning, the algorithm of MATLAB's ``bwmorph(BW, 'thin',
    Inf)`` and of ``skimage.morphology.thin``, with the same result as the latter (pixels outside the
    map are background). Each sub-iteration decides for all pixels at once from the map as it was at
    its start, but only pixels whose neighbourhood changed since their last look-up under the same
    table are looked up again, so the work follows the pixels removed, not iterations x map size.
    """
    if mask.ndim != 2:
        raise ValueError(f"thin: expected a 2-D map, got shape {mask.shape}")
    height, width = mask.shape
    stride = width + 2
    image = np.zeros((height + 2, stride), dtype=np.uint8)
    image[1:-1, 1:-1] = mask
    image = image.ravel()
    scratch = np.empty(image.size, dtype=np.int64)
    offsets = np.array([dy * stride + dx for dy, dx in _NEIGHBOURS], dtype=np.intp)
    # pending[s]: foreground pixels whose neighbourhood changed since their last look-up in table s.
    # At the start only pixels with a 4-neighbour in the background: the others have crossing number
    # 0 and are kept by both tables until a neighbour is deleted.
    grid = image.reshape(height + 2, stride)
    interior = grid[1:-1, 2:] & grid[:-2, 1:-1] & grid[1:-1, :-2] & grid[2:, 1:-1]
    border = np.zeros_like(grid)
    border[1:-1, 1:-1] = grid[1:-1, 1:-1] & (1 - interior)
    start = np.flatnonzero(border)
    pending = [start, start]
    step = 0
    while len(pending[0]) or len(pending[1]):
        table, active = step % 2, pending[step % 2]
        pending[table] = active[:0]
        if len(active):
            neighbourhood = image[active[:, None] + offsets]
            code = np.packbits(neighbourhood, axis=1, bitorder="little")[:, 0]
            deleted = active[_DELETE[table][code]]
            if len(deleted):
                image[deleted] = 0
                touched = (deleted[:, None] + offsets).ravel()
                touched = _distinct(touched[image[touched] == 1], scratch)
                pending[table] = touched
                other = pending[1 - table]
                other = np.concatenate([other[image[other] == 1], touched])
                pending[1 - table] = _distinct(other, scratch)
        step += 1
    return image.reshape(height + 2, stride)[1:-1, 1:-1].astype(bool)


def disk_offsets(radius: float) -> np.ndarray:
    """The (dy, dx) integer offsets with dy^2 + dx^2 <= radius^2, as an N x 2 array."""
    reach = math.floor(radius)
    steps = np.arange(-reach, reach + 1)
    dy, dx = np.meshgrid(steps, steps, indexing="ij")
    inside = dy * dy + dx * dx <= radius * radius
    return np.stack([dy[inside], dx[inside]], axis=1)


def candidate_pairs(candidates: np.ndarray, truth: np.ndarray, radius: float) -> tuple[np.ndarray, csr_matrix]:
    """All (candidate pixel, ground-truth pixel) pairs at Euclidean distance <= ``radius``.

    ``candidates`` and ``truth`` are H x W boolean maps. Returns ``row_of_pixel`` (H x W int64: the
    graph row of each candidate pixel with at least one ground-truth pixel in reach, numbered in raster
    order, -1 elsewhere) and the rows x (ground-truth pixels in raster order) biadjacency matrix. The
    pairs are found from the ground-truth side, one vectorized look-up per disk offset.
    """
    height, width = truth.shape
    gy, gx = np.nonzero(truth)
    candidate = candidates.ravel()
    pixels, columns = [], []
    for dy, dx in disk_offsets(radius):
        y, x = gy + dy, gx + dx
        inside = np.flatnonzero((y >= 0) & (y < height) & (x >= 0) & (x < width))
        pixel = y[inside] * width + x[inside]
        hit = candidate[pixel]
        pixels.append(pixel[hit])
        columns.append(inside[hit])
    pixel = np.concatenate(pixels)
    column = np.concatenate(columns)
    paired = np.zeros(truth.size, dtype=bool)
    paired[pixel] = True
    row_of_pixel = np.where(paired, np.cumsum(paired) - 1, -1)
    shape = (int(paired.sum()), len(gy))
    graph = csr_matrix((np.ones(len(pixel), dtype=np.int32), (row_of_pixel[pixel], column)), shape=shape)
    return row_of_pixel.reshape(truth.shape), graph


def maximum_matching_size(graph: csr_matrix) -> int:
    """Size of a maximum matching of the bipartite graph with biadjacency matrix ``graph`` (R x C).

    Solved as a unit-capacity maximum flow source -> rows -> columns -> sink with Dinic's algorithm
    (``scipy.sparse.csgraph.maximum_flow``), O(E sqrt(V)) like Hopcroft-Karp. ``scipy``'s
    ``maximum_bipartite_matching`` gives the same size but was seen to take minutes on the dense
    candidate graphs of blurred edge maps, where this takes milliseconds.
    """
    n_rows, n_columns = graph.shape
    if not graph.nnz:
        return 0
    nodes = n_rows + n_columns + 2  # 0: source, 1 .. R: rows, R + 1 .. R + C: columns, last: sink
    sink = nodes - 1
    out_degree = np.concatenate([[n_rows], np.diff(graph.indptr), np.ones(n_columns, np.int64), [0]])
    indptr = np.concatenate([[0], np.cumsum(out_degree)])
    indices = np.concatenate([np.arange(1, n_rows + 1), graph.indices + n_rows + 1, np.full(n_columns, sink)])
    capacity = np.ones(len(indices), dtype=np.int32)
    network = csr_matrix((capacity, indices, indptr), shape=(nodes, nodes))
    return int(maximum_flow(network, 0, sink, method="dinic").flow_value)


def bipartite_counts(
    scores: np.ndarray, valid: np.ndarray, truth: np.ndarray, thresholds: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Matched and predicted edge pixels of one image at each of the increasing ``thresholds``.

    At threshold t the valid pixels with score >= t are thinned, and the thinned pixels are matched
    one to one to the ground-truth pixels (``truth``, already restricted to valid pixels) at distance
    <= ``radius`` by a maximum-cardinality bipartite matching. Returns two int64 arrays of length K:
    the number of matches (matched predicted = matched ground-truth pixels) and of thinned pixels.

    The candidate pairs are found once, for the pixels at or above the lowest threshold; each threshold
    then thins its binary map (thinned maps are not nested across thresholds) and keeps the rows of its
    thinned pixels. A threshold whose binary map equals the previous one reuses its counts.
    """
    k = len(thresholds)
    matched = np.zeros(k, dtype=np.int64)
    predicted = np.zeros(k, dtype=np.int64)
    scores = np.where(valid, scores, -np.inf)
    buckets = np.searchsorted(thresholds, scores, side="right")  # thresholds at or below each score
    if not (buckets > 0).any():
        return matched, predicted
    row_of_pixel, graph = candidate_pairs(buckets > 0, truth, radius)
    row_of_pixel = row_of_pixel.ravel()
    # the binary map at threshold j differs from the one at j - 1 only if some score lies in between
    changes = np.bincount(buckets.ravel(), minlength=k + 1)
    for j in range(k):
        if j > 0 and changes[j] == 0:
            matched[j], predicted[j] = matched[j - 1], predicted[j - 1]
            continue
        pixel = np.flatnonzero(thin(buckets > j))
        if not len(pixel):
            break  # thinning keeps a pixel of every component: the map is empty here and above
        predicted[j] = len(pixel)
        rows = row_of_pixel[pixel]
        matched[j] = maximum_matching_size(graph[rows[rows >= 0]])
    return matched, predicted
