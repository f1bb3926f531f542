"""Winograd convolutions F(2x2, 3x3) and F(4x4, 3x3) for 3x3 stride-1 convs, written as GEMMs for XLA:CPU.

A 3x3 stride-1 conv computed on m x m output tiles needs (m + 2)^2 multiplies per tile and channel pair instead
of 9 m^2: 2.25x fewer for m = 2, 4x fewer for m = 4 (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2015). Each step is a matmul XLA runs on its fast dot path:

* input transform: the overlapping (m + 2) x (m + 2) input tiles, transformed by one GEMM with
  kron(B^T, B^T) (tile-position axis leading, as the notes in ../shared/notes/cpu-conv.md found fastest);
* kernel transform: one GEMM with kron(G, G);
* the products: (m + 2)^2 independent (tiles x C) @ (C x O) matmuls, as batched `dot_general`s;
* output transform: one GEMM with kron(A^T, A^T), then the tiles laid back into the map.

After the tile gather, the tile positions go through the transforms and products in `PRODUCT_PARTS`
independent groups whose outputs are summed: YNNPACK runs a batched matmul on one thread when each matrix in it
is small (a (36, 1024, 64) x (36, 64, 64) product used 1.00 CPU-second per second on 2 cores, one (36864, 64) x
(64, 64) matmul 1.9), and XLA runs independent groups on separate cores at once (forward + gradients on the
2-core Zen 4: 0.52-0.97x the one-group time for F(4x4) over ten ResNet shapes; train steps at 128 px 1.13-1.19x
faster, at 32 px level; benchmarks/README.md).

Every step is linear, so autodiff gives both gradients as the transposed steps: the kernel gradient becomes
(m + 2)^2 matmuls contracting over the tiles, 4x fewer multiplies than XLA's for m = 4. Tiles are gathered by
reshaping the padded input into m-row blocks and appending the first two rows of the next block, so the
gather's transpose is one pad + add (an element-wise gather's backward became a chain of pad + add).

Numerics (float32, against `lax.conv_general_dilated`): F(2x2) agrees to a few ulp of the output scale, F(4x4)
loses about one more decimal digit (its transform matrices hold 1/24 and 8); tests/test_winograd.py states the
tolerances.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Padding = Sequence[tuple[int, int]]

# (B^T, G, A^T) of F(m x m, 3 x 3), interpolation points 0, +-1 (m = 2) and 0, +-1, +-2 (m = 4), plus infinity.
_TRANSFORMS = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}

TILE_SIZES = tuple(_TRANSFORMS)
# Independent groups of tile positions (module docstring). Two occupy both cores of the machines measured;
# more would each re-read the whole tile matrix and add another partial output.
PRODUCT_PARTS = 2


def _kron_transforms(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kron(B^T, B^T) (t^2, t^2), kron(G, G) (t^2, 9), kron(A^T, A^T) (m^2, t^2), float64 numpy."""
    b_t, g, a_t = (np.asarray(matrix, np.float64) for matrix in _TRANSFORMS[m])
    return np.kron(b_t, b_t), np.kron(g, g), np.kron(a_t, a_t)


def supports(kernel_shape: Sequence[int], strides: Sequence[int], padding: Padding | str) -> bool:
    """Whether `winograd_conv` computes this conv: 3x3 kernel, stride 1, explicit non-negative padding."""
    if isinstance(padding, str):
        return False
    return (
        tuple(kernel_shape[:2]) == (3, 3)
        and tuple(strides) == (1, 1)
        and all(p >= 0 for pair in padding for p in pair)
    )


def _tiles(x: jax.Array, m: int, tiles_h: int, tiles_w: int) -> jax.Array:
    """(N, (tiles_h + 1) m, (tiles_w + 1) m, C) -> (N, tiles_h, m + 2, tiles_w, m + 2, C), tiles overlapping by 2."""
    n, _, _, c = x.shape
    blocks = x.reshape(n, tiles_h + 1, m, tiles_w + 1, m, c)
    rows = jnp.concatenate([blocks[:, :tiles_h], blocks[:, 1:, :2]], axis=2)
    return jnp.concatenate([rows[:, :, :, :tiles_w], rows[:, :, :, 1:, :2]], axis=4)


def winograd_conv(
    x: jax.Array,
    kernel: jax.Array,
    padding: Padding,
    tile: int = 4,
    feature_group_count: int = 1,
) -> jax.Array:
    """The 3x3 stride-1 conv of NHWC `x` with HWIO `kernel` by Winograd F(tile x tile, 3 x 3).

    Computes what `lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO',
    'NHWC'), feature_group_count=...)` computes, to float32 rounding of the transforms.
    """
    if not supports(kernel.shape, (1, 1), padding):
        raise ValueError(
            f"Winograd needs a 3x3 kernel, stride 1 and explicit padding, got {padding!r}"
        )
    m, t = tile, tile + 2
    n, h, w, c = x.shape
    groups = feature_group_count
    (top, bottom), (left, right) = padding
    out_h, out_w = h + top + bottom - 2, w + left + right - 2
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    # One spare block of rows and columns, so every tile's last two rows exist (zeros past the real padding
    # only feed outputs that are cropped).
    x = jnp.pad(
        x,
        ((0, 0), (top, (tiles_h + 1) * m - h - top), (left, (tiles_w + 1) * m - w - left), (0, 0)),
    )
    kron_b, kron_g, kron_a = (jnp.asarray(k, x.dtype) for k in _kron_transforms(m))

    tiles = _tiles(x, m, tiles_h, tiles_w)  # (N, th, t, tw, t, C)
    num_tiles = n * tiles_h * tiles_w
    tiles = tiles.transpose(2, 4, 0, 1, 3, 5).reshape(t * t, num_tiles * c)
    o = kernel.shape[-1]
    kernel_taps = kernel.reshape(9, -1)

    y = None
    bounds = np.linspace(0, t * t, min(PRODUCT_PARTS, t * t) + 1).astype(int)
    for first, end in zip(bounds[:-1], bounds[1:], strict=True):
        positions = end - first
        v = (kron_b[first:end] @ tiles).reshape(positions, num_tiles, groups, c // groups)
        v = v.transpose(0, 2, 1, 3).reshape(positions * groups, num_tiles, c // groups)
        u = (kron_g[first:end] @ kernel_taps).reshape(positions, c // groups, groups, o // groups)
        u = u.transpose(0, 2, 1, 3).reshape(positions * groups, c // groups, o // groups)
        # One batched matmul over (tile position, group) pairs, contracting the channels within a group: a
        # single batch axis (with one group the transposes are free), which XLA:CPU ran faster than batch
        # axes for positions and groups apart (16x8x8x256: 16-23 against 25-34 ms, forward + gradients).
        products = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))  # (positions * G, P, O/G)
        products = products.reshape(positions, groups, num_tiles, o // groups)
        part = kron_a[:, first:end] @ products.transpose(0, 2, 1, 3).reshape(positions, -1)
        y = part if y is None else y + part
    y = y.reshape(m, m, n, tiles_h, tiles_w, o)
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, tiles_h * m, tiles_w * m, o)
    return y[:, :out_h, :out_w, :]
