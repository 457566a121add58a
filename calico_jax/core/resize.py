"""Torch-exact image / position-table resizing.

``jax.image.resize`` is not a drop-in for ``torch.nn.functional.interpolate``: its cubic kernel is
Keys a=-0.5 (torch's plain bicubic uses a=-0.75), it anti-aliases when downsampling by default,
and it cannot reproduce torch's ``scale_factor`` coordinate mapping (used by the original DINOv2).
Shapes are static under jit, so we build each axis's interpolation matrix on the host in float64,
exactly as ATen computes its taps, and apply the separable resize as two einsums.

Where a size is only known at run time (CALICO's per-image mask post-processing), :func:`bilinear_matrix`
builds the same bilinear rule (:func:`bilinear_weights`) from traced sizes in float32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("bilinear", "bicubic")


def _cubic_a(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def _source_scale(in_size: int, out_size: int, align_corners: bool, scale_factor: float | None) -> float:
    # ATen area_pixel_compute_scale
    if align_corners:
        return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    if scale_factor is not None and scale_factor > 0:
        return 1.0 / scale_factor
    return in_size / out_size


@functools.lru_cache(maxsize=256)
def interp_matrix(in_size: int, out_size: int, mode: str = "bicubic", *, antialias: bool = False,
                  align_corners: bool = False, scale_factor: float | None = None) -> np.ndarray:
    """The [out_size, in_size] float64 matrix torch's 1-D interpolation applies along one axis."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scale = _source_scale(in_size, out_size, align_corners, scale_factor)
    w = np.zeros((out_size, in_size), np.float64)
    if antialias and not align_corners:
        # ATen _compute_index_ranges_weights (separable AA path; bicubic there uses a=-0.5, PIL's).
        interp = 2 if mode == "bilinear" else 4
        filt = _triangle if mode == "bilinear" else functools.partial(_cubic_a, a=-0.5)
        support = interp * 0.5 * scale if scale >= 1.0 else interp * 0.5
        invscale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = filt((np.arange(lo, hi) - center + 0.5) * invscale)
            total = taps.sum()
            w[i, lo:hi] = taps / total if total != 0 else taps
        return w
    if mode == "bilinear":
        return bilinear_weights(np, in_size, scale, out_size, in_size, np.float64, align_corners=align_corners)
    for i in range(out_size):
        src = scale * i if align_corners else scale * (i + 0.5) - 0.5
        i0 = int(math.floor(src))
        t = src - i0
        taps = _cubic_a(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
        for off, tap in zip(range(-1, 3), taps):
            w[i, min(max(i0 + off, 0), in_size - 1)] += tap  # border replicate (clamped reads)
    return w


def bilinear_weights(xp, in_size, scale, out_len: int, src_len: int, dtype, *, align_corners: bool = False):
    """Torch's two-tap bilinear rule (``F.interpolate(mode="bilinear")`` without anti-aliasing): the
    [..., out_len, src_len] weights of outputs 0..out_len-1 over the first ``in_size`` of ``src_len``
    source pixels, ``scale`` source pixels per output (ATen ``area_pixel_compute_scale``).

    The one definition of the rule: ``xp=numpy`` with static sizes in float64 (:func:`interp_matrix`)
    or ``xp=jax.numpy`` with traced ``in_size``/``scale`` [..., 1] in float32 (:func:`bilinear_matrix`).
    The two precisions are kept on purpose (each caller's numerics are pinned by its tests), so the
    callers share the formula rather than one matrix."""
    i = xp.arange(out_len, dtype=dtype)
    src = i * scale if align_corners else (i + 0.5) * scale - 0.5
    src = xp.maximum(src, 0.0)
    i0 = xp.minimum(xp.floor(src).astype(xp.int32), in_size - 1)
    i1 = xp.minimum(i0 + 1, in_size - 1)
    lam = src - i0.astype(dtype)
    cols = xp.arange(src_len)
    # One-hot columns: products with exact 0/1 and sums with exact 0, so i0 == i1 (the clamped border)
    # accumulates (1 - lam) + lam exactly like a scatter-add would.
    return ((1.0 - lam)[..., None] * (i0[..., None] == cols).astype(dtype)
            + lam[..., None] * (i1[..., None] == cols).astype(dtype))


def bilinear_matrix(in_size: jax.Array, out_size: jax.Array, out_len: int, src_len: int) -> jax.Array:
    """Rows of torch's ``F.interpolate(bilinear, align_corners=False)`` from ``in_size`` source pixels
    (the first ``in_size`` of ``src_len``) to ``out_size`` outputs, padded with zero rows to ``out_len``.
    Sizes may be traced arrays [...] -> [..., out_len, src_len] (float32, under jit with static shapes)."""
    in_size = jnp.asarray(in_size, jnp.int32)[..., None]
    out_size = jnp.asarray(out_size, jnp.int32)[..., None]
    scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
    w = bilinear_weights(jnp, in_size, scale, out_len, src_len, jnp.float32)
    return jnp.where((jnp.arange(out_len) < out_size)[..., None], w, 0.0)


def resize_2d(x: jax.Array, out_hw: tuple[int, int], *, mode: str = "bicubic", antialias: bool = False,
              align_corners: bool = False, scale_factor: tuple[float, float] | None = None,
              axes: tuple[int, int] = (1, 2)) -> jax.Array:
    """``F.interpolate`` over two spatial ``axes`` of ``x`` (NHWC by default), computed in float32."""
    h_ax, w_ax = (a % x.ndim for a in axes)
    sh, sw = scale_factor if scale_factor is not None else (None, None)
    mh = interp_matrix(x.shape[h_ax], out_hw[0], mode, antialias=antialias, align_corners=align_corners,
                       scale_factor=sh)
    mw = interp_matrix(x.shape[w_ax], out_hw[1], mode, antialias=antialias, align_corners=align_corners,
                       scale_factor=sw)
    dtype = x.dtype
    x = x.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    x = jnp.moveaxis(jnp.tensordot(x, jnp.asarray(mh, jnp.float32), axes=([h_ax], [1]), precision=hp), -1, h_ax)
    x = jnp.moveaxis(jnp.tensordot(x, jnp.asarray(mw, jnp.float32), axes=([w_ax], [1]), precision=hp), -1, w_ax)
    return x.astype(dtype)
