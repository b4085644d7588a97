"""Small array operations shared by the losses, the head and inference: L2 normalisation and
bilinear resizing with the official (PyTorch) conventions. Both are compiled once per shape and
static option (`eps`, the target size)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("eps",))
def norm(t: Array, eps: float = 1e-10) -> Array:
    """L2-normalise the last axis, as `F.normalize`: ``t / max(||t||, eps)``.

    Args:
      t: ``[..., C]``.
      eps: lower bound on the norm (the official loss uses 1e-10, the cluster probe 1e-12).
    Returns:
      ``[..., C]``.
    """
    # sqrt(max(|t|^2, eps^2)) == max(|t|, eps) but keeps the gradient finite at t == 0
    # (the naive form multiplies 0 by the infinite derivative of sqrt at 0).
    sq = jnp.sum(jnp.square(t), axis=-1, keepdims=True)
    return t / jnp.sqrt(jnp.maximum(sq, eps * eps))


def upsample_bilinear(x: Array, hw: Sequence[int]) -> Array:
    """Bilinear resize, as ``F.interpolate(mode='bilinear', align_corners=False)``.

    Args:
      x: ``[B, h, w, C]``.
      hw: target ``(H, W)`` (static: Python or NumPy ints).
    Returns:
      ``[B, H, W, C]``.
    """
    return _upsample_bilinear(x, (int(hw[0]), int(hw[1])))


@functools.partial(jax.jit, static_argnames=("hw",))
def _upsample_bilinear(x: Array, hw: tuple[int, int]) -> Array:
    # antialias=False: torch's bilinear does not low-pass when shrinking, so neither do we.
    return jax.image.resize(x, (x.shape[0], hw[0], hw[1], x.shape[-1]), "linear", antialias=False)


@functools.lru_cache(maxsize=None)
def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``[n_out, n_in]`` float32 weights of the 1-D linear resize of `upsample_bilinear` (torch's
    ``align_corners=False``: half-pixel centres, source positions below 0 clamped to 0, no
    antialiasing): row ``i`` holds the two taps of output ``i``, summing to 1. A bilinear resize
    of ``x [h, w]`` is ``interp_matrix(H, h) @ x @ interp_matrix(W, w).T``."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        frac = src - i0
        m[i, i0] += 1.0 - frac
        m[i, min(i0 + 1, n_in - 1)] += frac
    return m.astype(np.float32)
