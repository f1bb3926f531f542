"""A conv as matmuls over patch matrices: im2col, im2col by region of the output map, and grouped convs by one
patch matrix per group (`grouped_im2col_conv`: XLA:CPU's own grouped convolution is 30-65x slower).

On the small maps of a ResNet's last stages (8x8 and below at 32 px inputs), XLA:CPU's convolution spends most
of its time on the padding and one matmul of the patch matrix is the faster form (`resnet_jax.conv_forms`).
Both forms here skip products that can only be zero:

* `im2col_conv` drops the kernel taps that read nothing but padding at every output position (a 3x3 conv over
  a 1x1 map is a matmul with its centre tap);
* `region_im2col_conv` also drops the padding that some positions read and others do not. A 3x3 conv over a
  2x2 map reads 9 taps per output, 4 of them real: im2col multiplies 36 inputs per output channel and image,
  20 of them zeros. The output positions fall into regions (corners, edges, interior) that read the same real
  taps; one matmul per region over just those taps multiplies 16. That is 2.25x fewer at 2x2 maps, 1.44x at
  4x4 (100 against 144), 1.19x at 8x8.

Both compute the same sums as `lax.conv_general_dilated` (the dropped products are exact zeros), in another
order: float32 rounding apart (tests/test_im2col.py, tests/test_conv.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Padding = Sequence[tuple[int, int]]


def output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    """Output positions along one axis of a conv with this kernel size, stride and (before, after) padding."""
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def live_offsets(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> list[int]:
    """Kernel offsets along one axis that read at least one real (non-padding) input position."""
    out = output_size(size, kernel, stride, pad)
    return [
        k for k in range(kernel) if any(0 <= k - pad[0] + stride * o < size for o in range(out))
    ]


def tap_input(
    x_padded: jax.Array, i: int, j: int, strides: tuple[int, int], out_hw: tuple[int, int]
) -> jax.Array:
    """The input positions that kernel tap (i, j) multiplies, for every output position: (N, Ho, Wo, C).

    (Every stride-th position from (i, j): also a region's tap, with (i, j) offset to where the region
    starts in the unpadded input.)
    """
    (sh, sw), (ho, wo) = strides, out_hw
    return x_padded[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]


def pad_map(x: jax.Array, padding: Padding) -> jax.Array:
    """`x` (N, H, W, C) with zero padding ((top, bottom), (left, right)) around its map."""
    if not any(p for pair in padding for p in pair):
        return x
    return jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))


def flat_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """(N, H, W, K) @ (K, O) -> (N, H, W, O), as a 2-D (N*H*W, K) @ (K, O) matmul.

    Flattened first on purpose: with the 4-D `dot_general`, XLA:CPU gives the kernel gradient (a contraction
    over N, H, W) a transposed copy of one operand, and in a train step computes the BatchNorm backward that
    produces the output gradient twice, once transposed for that dot. The 2-D form's kernel gradient is one
    dot contracting both operands' leading dimension, with no copy (resnet50 at 128 px: +18-22% images/s,
    benchmarks/README.md).
    """
    n, h, w_, k = x.shape
    return jnp.dot(x.reshape(n * h * w_, k), w).reshape(n, h, w_, w.shape[-1])


def live_taps(
    x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int], padding: Padding
) -> tuple[tuple[int, int], list[int], list[int]]:
    """The output map's (height, width), and the kernel rows and columns that read some real input."""
    (h, w), (kh, kw) = x_shape[1:3], kernel_shape[:2]
    out_hw = (
        output_size(h, kh, strides[0], padding[0]),
        output_size(w, kw, strides[1], padding[1]),
    )
    rows = live_offsets(h, kh, strides[0], padding[0])
    cols = live_offsets(w, kw, strides[1], padding[1])
    return out_hw, rows, cols


def _is_contiguous(offsets: list[int]) -> bool:
    return offsets == list(range(offsets[0], offsets[-1] + 1))


def im2col_conv(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding
) -> jax.Array:
    """The conv as one matmul of the patch matrix with the kernel, taps wholly in padding skipped."""
    out_hw, rows, cols = live_taps(x.shape, kernel.shape, strides, padding)
    if not rows or not cols:  # every output position reads only padding
        return jnp.zeros((x.shape[0], *out_hw, kernel.shape[-1]), jnp.result_type(x, kernel))
    x_padded = pad_map(x, padding)
    patches = [tap_input(x_padded, i, j, strides, out_hw) for i in rows for j in cols]
    if _is_contiguous(rows) and _is_contiguous(cols):
        # The live taps are one block of the kernel, in the patches' (row, column, channel) order: a
        # reshape, with no copy where every tap is live. Concatenating the taps' slices instead made XLA:CPU
        # copy each tap and then the whole matrix (and the same in the gradient): about 2 ms per 3x3 conv of
        # resnet18's 2x2-map stage at 32 px, 7% of the step on an AMD EPYC Zen 4.
        weights = kernel[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].reshape(
            -1, kernel.shape[-1]
        )
    else:  # a gap in the live offsets (a stride above the input size, with wide padding)
        weights = jnp.concatenate([kernel[i, j] for i in rows for j in cols], axis=0)
    if len(patches) == 1:
        return flat_matmul(patches[0], weights)
    return flat_matmul(jnp.concatenate(patches, axis=-1), weights)


def output_regions(
    size: int, kernel: int, stride: int, pad: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Along one axis: runs of consecutive output positions that read real input at the same kernel offsets.

    Each run is (first position, end position, first offset, end offset); an output position reads real
    input at offsets k with 0 <= position * stride - pad_before + k < size, one interval of k. A run with
    no such offset (padding wider than the kernel) has first offset == end offset.
    """
    runs: list[tuple[int, int, int, int]] = []
    for position in range(output_size(size, kernel, stride, pad)):
        start = position * stride - pad[0]  # the input index that offset 0 reads
        first, end = max(0, -start), min(kernel, size - start)
        first, end = (first, end) if first < end else (0, 0)
        if runs and runs[-1][1] == position and runs[-1][2:] == (first, end):
            runs[-1] = (runs[-1][0], position + 1, first, end)
        else:
            runs.append((position, position + 1, first, end))
    return runs


def region_products(
    x_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int], padding: Padding
) -> tuple[int, int]:
    """Input-weight products per image and channel pair: (region_im2col_conv's, im2col_conv's)."""
    region, dense = 1, 1
    for size, kernel, stride, pad in zip(x_hw, kernel_hw, strides, padding, strict=True):
        runs = output_regions(size, kernel, stride, pad)
        region *= sum((stop - start) * (end - first) for start, stop, first, end in runs)
        dense *= output_size(size, kernel, stride, pad) * len(
            live_offsets(size, kernel, stride, pad)
        )
    return region, dense


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def kernel_blocks(
    kernel: jax.Array, blocks: tuple[tuple[int, int, int, int], ...]
) -> tuple[jax.Array, ...]:
    """The blocks `kernel[dy0:dy1, dx0:dx1]` of an HWIO kernel, each as a (taps * C, O) weight matrix.

    Its gradient is assembled tap by tap (the sum of the blocks' rows for each tap, stacked), where autodiff
    would pad each block's gradient to the whole kernel and add the pads. The two are equal; the difference
    is what XLA:CPU makes of them in a train step: it wrote each pad out in full (four 2.4 MB kernels per 3x3
    conv of resnet18's 2x2-map stage at 32 px) to feed the per-tap sums of `optim.gradient_norm`, where a
    slice of the stacked taps is just that tap.
    """
    return _blocks(kernel, blocks)


def _blocks(kernel, blocks):
    return tuple(kernel[a:b, c:d].reshape(-1, kernel.shape[-1]) for a, b, c, d in blocks)


def _kernel_blocks_fwd(kernel, blocks):
    # The slices themselves, not `kernel_blocks`: a custom_vjp function called here would refuse the
    # forward-mode pass of `jax.jvp(jax.grad(...))` (Hessian-vector products) over this rule.
    return _blocks(kernel, blocks), kernel.shape


def _kernel_blocks_bwd(blocks, kernel_shape, grads):
    kh, kw, cin, cout = kernel_shape
    taps = []
    for i in range(kh):
        for j in range(kw):
            parts = [
                grad.reshape(b - a, d - c, cin, cout)[i - a, j - c]
                for (a, b, c, d), grad in zip(blocks, grads, strict=True)
                if a <= i < b and c <= j < d
            ]
            taps.append(
                sum(parts[1:], parts[0]) if parts else jnp.zeros((cin, cout), grads[0].dtype)
            )
    return (jnp.stack(taps).reshape(kernel_shape),)


kernel_blocks.defvjp(_kernel_blocks_fwd, _kernel_blocks_bwd)


def region_im2col_conv(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding
) -> jax.Array:
    """The conv as one matmul per region of output positions, each over only the taps it reads real input at.

    A region of one position (every region at 2x2 maps) reads a block of the input map: its patch row is that
    block reshaped (at 2x2 maps the whole map, with no copy). Larger regions gather their taps as strided
    slices, as im2col does.
    """
    n, h, w, _ = x.shape
    kh, kw, _, features = kernel.shape
    (sh, sw), ((top, _), (left, _)) = strides, padding
    row_runs = output_regions(h, kh, sh, padding[0])
    col_runs = output_regions(w, kw, sw, padding[1])
    # The kernel block each region reads; regions reading only padding have none.
    blocks = tuple(
        dict.fromkeys(
            (dy0, dy1, dx0, dx1)
            for _, _, dy0, dy1 in row_runs
            for _, _, dx0, dx1 in col_runs
            if dy0 < dy1 and dx0 < dx1
        )
    )
    weights = dict(zip(blocks, kernel_blocks(kernel, blocks), strict=True)) if blocks else {}
    bands = []
    for row0, row1, dy0, dy1 in row_runs:
        outputs = []
        for col0, col1, dx0, dx1 in col_runs:
            rows, cols = row1 - row0, col1 - col0
            if dy0 == dy1 or dx0 == dx1:  # reads only padding
                outputs.append(jnp.zeros((n, rows, cols, features), x.dtype))
                continue
            y0, x0 = row0 * sh - top, col0 * sw - left  # input indices that tap (0, 0) reads
            if rows == cols == 1:
                patches = x[:, y0 + dy0 : y0 + dy1, x0 + dx0 : x0 + dx1, :].reshape(n, 1, 1, -1)
            else:
                taps = [
                    tap_input(x, y0 + dy, x0 + dx, strides, (rows, cols))
                    for dy in range(dy0, dy1)
                    for dx in range(dx0, dx1)
                ]
                patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
            outputs.append(flat_matmul(patches, weights[(dy0, dy1, dx0, dx1)]))
        bands.append(outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=2))
    return bands[0] if len(bands) == 1 else jnp.concatenate(bands, axis=1)


def grouped_im2col_conv(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, groups: int
) -> jax.Array:
    """A grouped conv (ResNeXt's 32 groups) as one matmul of each group's patch matrix, batched over the groups.

    XLA:CPU's own grouped convolution is the slow path of its one Eigen routine: forward + gradients of
    ResNeXt-50's 3x3 convs at 64 px, batch 32, took 0.4-5.3 s each on an AMD EPYC Zen 4, 30-65x the time of
    the forms here (benchmarks/README.md). The live taps' inputs are stacked per group, (M, G, taps * Cg), and
    multiplied by each group's (taps * Cg, Og) weights in one dot batched over G: no product mixes groups, and
    the taps are summed inside the dot. (One dot per tap, summed after, left nine outputs that XLA read back
    with a group-major stride in whatever consumed the sum: 1.2-2.4x slower per conv, 23% slower ResNeXt-50
    step on an AMD EPYC Zen 5.)
    """
    _, _, group_in, out = kernel.shape
    n = x.shape[0]
    dtype = jnp.result_type(x, kernel)
    out_hw, rows, cols = live_taps(x.shape, kernel.shape, strides, padding)
    if not rows or not cols:  # every output position reads only padding
        return jnp.zeros((n, *out_hw, out), dtype)
    x_padded = pad_map(x, padding)
    positions, taps = n * out_hw[0] * out_hw[1], len(rows) * len(cols)
    patches = jnp.stack(
        [
            tap_input(x_padded, i, j, strides, out_hw).reshape(positions, groups, group_in)
            for i in rows
            for j in cols
        ],
        axis=2,
    ).reshape(positions, groups, taps * group_in)
    weights = jnp.stack([kernel[i, j] for i in rows for j in cols])  # (taps, Cg, G * Og)
    weights = weights.reshape(taps, group_in, groups, out // groups).transpose(2, 0, 1, 3)
    weights = weights.reshape(groups, taps * group_in, out // groups)
    # Products and sums in float32 at least: a bf16 sum of the taps had twice lax.conv's error, and XLA:CPU's
    # batched dot has no bf16 x bf16 -> float32 kernel ("Unsupported element type for DotThunk").
    accumulate = jnp.promote_types(dtype, jnp.float32)
    y = jnp.einsum("mgk,gko->mgo", patches.astype(accumulate), weights.astype(accumulate))
    return y.astype(dtype).reshape(n, *out_hw, out)
