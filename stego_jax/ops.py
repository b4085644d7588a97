"""Small array operations shared by the losses, the head and inference: L2 normalisation and
bilinear resizing with the official (PyTorch) conventions. Both are compiled once per shape and
static option (`eps`, the target size)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

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
