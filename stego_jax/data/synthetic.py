"""Synthetic textured-scene segmentation dataset for the offline demo (described in docs/demo.md).

Class 0 is a smoothly textured background; classes 1..4 are objects told apart by texture more than colour.
"""

from __future__ import annotations

import numpy as np

# Class colour means in [0, 1]: 1~2 reddish and 3~4 bluish in close pairs so colour alone is a poor cue.
CLASS_COLORS = np.array(
    [
        [0.48, 0.52, 0.44],  # 0 background
        [0.72, 0.36, 0.32],  # 1 horizontal stripes
        [0.68, 0.40, 0.34],  # 2 checker
        [0.32, 0.40, 0.72],  # 3 pixel noise
        [0.36, 0.38, 0.68],  # 4 diagonal stripes
    ],
    dtype=np.float32,
)
CLASS_NAMES = ("background", "h-stripes", "checker", "noise", "diag-stripes")

_TEXTURE_AMPLITUDE = 0.22  # luminance swing of an object texture at amplitude factor 1
_COLOR_JITTER = 0.09
_BACKGROUND_JITTER_SCALE = 1.3
_PIXEL_NOISE = 0.03


def _texture(cls: int, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture of class `cls` in [-1, 1] over the pixel grid, with per-image period/angle/phase."""
    if cls == 3:
        return np.clip(rng.standard_normal(xx.shape, dtype=np.float32) * 0.6, -1.0, 1.0)
    angle = rng.uniform(-0.25, 0.25)
    c, s = np.cos(angle), np.sin(angle)
    u = c * xx + s * yy  # rotated coordinates
    v = -s * xx + c * yy
    scale = rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 2 * np.pi)
    if cls == 1:
        return np.sign(np.sin(2 * np.pi * v / (4.0 * scale) + phase))
    if cls == 2:
        cell = 4.0 * scale
        return np.sign(np.sin(np.pi * u / cell + phase) * np.sin(np.pi * v / cell + rng.uniform(0, 2 * np.pi)))
    if cls == 4:
        return np.sin(2 * np.pi * (u + v) / (np.sqrt(2.0) * 6.0 * scale) + phase)
    raise ValueError(f"no texture for class {cls}")


def _shape_mask(kind: int, xx: np.ndarray, yy: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of an ellipse (0), rotated rectangle (1) or blob (2) of radius about 13-31 px at 96 px."""
    k = size / 96.0
    margin = 8 * k
    cx, cy = rng.uniform(margin, size - margin, size=2)
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    dx, dy = xx - cx, yy - cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == 0:
        a, b = rng.uniform(13, 31, size=2) * k
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == 1:
        a, b = rng.uniform(11, 26, size=2) * k
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    r0 = rng.uniform(14, 28) * k
    phi = np.arctan2(dy, dx)
    radius = r0 * (1 + sum(rng.uniform(-0.18, 0.18) * np.cos(m * phi + rng.uniform(0, 2 * np.pi)) for m in (2, 3, 5)))
    return np.hypot(dx, dy) <= radius


def _one_image(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, n_classes: int
               ) -> tuple[np.ndarray, np.ndarray]:
    size = xx.shape[0]
    labels = np.zeros((size, size), np.int32)
    # Background: a smooth random field from a few low-frequency waves.
    field = np.zeros((size, size), np.float32)
    for _ in range(4):
        fx, fy = rng.uniform(-2.5, 2.5, size=2) / size
        field += np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
    colors = CLASS_COLORS[0] + rng.normal(0, _COLOR_JITTER * _BACKGROUND_JITTER_SCALE, 3).astype(np.float32)
    img = colors[None, None, :] + 0.06 * field[..., None] * rng.uniform(0.7, 1.3)
    for _ in range(rng.integers(2, 4)):
        cls = int(rng.integers(1, n_classes))
        mask = _shape_mask(int(rng.integers(0, 3)), xx, yy, size, rng)
        tex = _texture(1 + (cls - 1) % 4, xx, yy, rng) * (_TEXTURE_AMPLITUDE * rng.uniform(0.7, 1.3))
        base = CLASS_COLORS[1 + (cls - 1) % 4] + rng.normal(0, _COLOR_JITTER, 3).astype(np.float32)
        # Later objects occlude earlier ones.
        img[mask] = base[None, :] + tex[mask][:, None]
        labels[mask] = cls
    img = img * rng.uniform(0.8, 1.2) + _PIXEL_NOISE * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8), labels


def generate(n: int, seed: int, *, size: int = 96, n_classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Generate the synthetic textured-scene dataset.

    Image `i` depends only on `(seed, i, size, n_classes)`, so `generate(m, s)` is a prefix of
    `generate(n, s)` for `m <= n`.

    Args:
      n: number of images.
      seed: integer seed.
      size: image side in pixels (object radii scale with `size / 96`).
      n_classes: classes including background (0); objects take classes 1..n_classes-1, whose textures
        cycle through the four of `_texture` when n_classes > 5.
    Returns:
      images uint8 `[n, size, size, 3]`, labels int32 `[n, size, size]` with values in [0, n_classes).
    """
    if n < 0 or size < 16 or n_classes < 2:
        raise ValueError(f"generate needs n >= 0, size >= 16 and n_classes >= 2; got n={n}, size={size}, "
                         f"n_classes={n_classes}")
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, size, size), np.int32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        images[i], labels[i] = _one_image(np.random.default_rng([seed, i]), xx, yy, n_classes)
    return images, labels
