"""Image/label transforms of the official STEGO pipeline (torchvision semantics on NumPy arrays).

Geometry follows torchvision on PIL images: `Resize(res, NEAREST)` then `CenterCrop(res)`, for images too.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

FIVE_CROP_NAMES = ("tl", "tr", "bl", "br", "center")


def normalize(images: np.ndarray) -> np.ndarray:
    """ImageNet-normalize uint8 RGB images.

    Args:
      images: uint8 `[..., H, W, 3]`.
    Returns:
      float32 `[..., H, W, 3]`: `(images / 255 - mean) / std`, as `ToTensor` + `Normalize`.
    """
    images = np.asarray(images)
    if images.shape[-1] != 3:
        raise ValueError(f"normalize expects channels-last RGB [..., H, W, 3], got shape {images.shape}")
    return ((images.astype(np.float32) / 255.0) - IMAGENET_MEAN) / IMAGENET_STD


def resized_short_side_size(height: int, width: int, res: int) -> tuple[int, int]:
    """Output `(height, width)` of torchvision `Resize(res)` with an int size.

    The short side becomes `res`, the long side `int(res * long / short)` (truncation, as torchvision).
    """
    if res <= 0:
        raise ValueError(f"resize target must be positive, got {res}")
    if width <= height:
        return int(res * height / width), res
    return res, int(res * width / height)


@functools.lru_cache(maxsize=1024)
def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    # PIL's own nearest mapping (fixed-point details included): resize a 1-pixel-high "I" image holding
    # 0..n_in-1. PIL's affine nearest is separable for a pure scale, so one axis at a time is exact.
    ramp = Image.fromarray(np.arange(n_in, dtype=np.int32)[None, :], mode="I")
    idx = np.array(ramp.resize((n_out, 1), Image.NEAREST), dtype=np.intp)[0]
    idx.flags.writeable = False  # shared through the cache
    return idx


def resize_nearest(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize with PIL's `Image.resize(..., NEAREST)` semantics, for any dtype.

    Args:
      img: `[H, W]` or `[H, W, C]` array (uint8 image, int32 label with -1, ...).
    Returns:
      `[height, width(, C)]` array of the same dtype.
    """
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    rows = _nearest_indices(h, height)
    cols = _nearest_indices(w, width)
    # two 1-D takes are ~4x faster than one broadcast fancy index
    return np.take(np.take(img, rows, axis=0), cols, axis=1)


def resize_short_nearest(img: np.ndarray, res: int) -> np.ndarray:
    """torchvision `T.Resize(res, InterpolationMode.NEAREST)` on a PIL image, as an array op.

    Args:
      img: `[H, W]` or `[H, W, C]`.
      res: target length of the shorter side.
    Returns:
      the resized array; the long side is `int(res * long / short)`.
    """
    h, w = img.shape[:2]
    return resize_nearest(img, *resized_short_side_size(h, w, res))


def crop(img: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """`img[top:top+height, left:left+width]`, refusing windows that leave the image."""
    h, w = img.shape[:2]
    if top < 0 or left < 0 or top + height > h or left + width > w:
        raise ValueError(f"crop window (top={top}, left={left}, {height}x{width}) leaves the {h}x{w} image")
    return img[top : top + height, left : left + width]


def center_crop(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """torchvision `CenterCrop(size)`: `top = int(round((h - th) / 2.0))`, `left` likewise.

    Unlike torchvision this does not zero-pad a crop larger than the image (the official pipeline never
    needs it after `Resize(res)`, and zero is a real class id for labels): it raises instead.
    """
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = img.shape[:2]
    if th > h or tw > w:
        raise ValueError(f"center crop {th}x{tw} is larger than the {h}x{w} image")
    return crop(img, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)


def five_crop_boxes(height: int, width: int, ratio: float = 0.5) -> list[tuple[int, int, int, int]]:
    """The five `(top, left, h, w)` windows of the official five-crop, order tl, tr, bl, br, center.

    Crop size is `(int(H * ratio), int(W * ratio))` (official `crop_datasets.py`); the centre window uses
    `center_crop`'s rounding (torchvision `five_crop`).
    """
    ch, cw = int(height * ratio), int(width * ratio)
    if not (0 < ch <= height and 0 < cw <= width):
        raise ValueError(f"five-crop ratio {ratio} gives an empty or oversized crop for a {height}x{width} image")
    return [
        (0, 0, ch, cw),
        (0, width - cw, ch, cw),
        (height - ch, 0, ch, cw),
        (height - ch, width - cw, ch, cw),
        (int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0)), ch, cw),
    ]


def five_crop(img: np.ndarray, ratio: float = 0.5) -> list[np.ndarray]:
    """Five crops of `img` (`[H, W(, C)]`) in torchvision order tl, tr, bl, br, center."""
    return [crop(img, *box) for box in five_crop_boxes(img.shape[0], img.shape[1], ratio)]


def photometric_augment(img: np.ndarray, rng: np.random.Generator, *, brightness: float = 0.3,
                        contrast: float = 0.3, saturation: float = 0.3, hue: float = 0.1,
                        p_grayscale: float = 0.2, p_blur: float = 0.5) -> np.ndarray:
    """Photometric augmentation in the spirit of the official `img_aug` branch (off by default).

    Colour jitter (brightness, contrast, saturation factors in `[1-x, 1+x]`, a hue rotation of up to
    `hue` turns in YIQ space), random grayscale, and a 5x5 Gaussian blur with sigma in [0.1, 2.0].
    The official code applies these to the already-normalized tensor; we apply them to the uint8 image,
    which is what the parameters were designed for.

    Args:
      img: uint8 `[H, W, 3]`.
      rng: NumPy Generator; the result is a pure function of its state.
    Returns:
      uint8 `[H, W, 3]`.
    """
    x = img.astype(np.float32) / 255.0
    gray_w = np.array([0.299, 0.587, 0.114], np.float32)
    # torchvision's ColorJitter applies the four in a random order.
    for op in rng.permutation(4):
        if op == 0:
            x = x * rng.uniform(1 - brightness, 1 + brightness)
        elif op == 1:
            x = (x - (x @ gray_w).mean()) * rng.uniform(1 - contrast, 1 + contrast) + (x @ gray_w).mean()
        elif op == 2:
            g = (x @ gray_w)[..., None]
            x = (x - g) * rng.uniform(1 - saturation, 1 + saturation) + g
        else:
            theta = 2 * np.pi * rng.uniform(-hue, hue)
            to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
            c, s = np.cos(theta), np.sin(theta)
            rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
            x = x @ (np.linalg.inv(to_yiq) @ rot @ to_yiq).T.astype(np.float32)
        x = np.clip(x, 0.0, 1.0)
    if rng.uniform() < p_grayscale:
        x = np.repeat((x @ gray_w)[..., None], 3, axis=-1)
    if rng.uniform() < p_blur:
        sigma = rng.uniform(0.1, 2.0)
        k = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2).astype(np.float32)
        k /= k.sum()
        h, w = x.shape[:2]
        rows = np.pad(x, ((2, 2), (0, 0), (0, 0)), mode="reflect")
        x = sum(k[i] * rows[i : i + h] for i in range(5))
        cols = np.pad(x, ((0, 0), (2, 2), (0, 0)), mode="reflect")
        x = sum(k[i] * cols[:, i : i + w] for i in range(5))
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def official_transform(img: np.ndarray, res: int, is_label: bool, *, augment: bool = False,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """The official `get_transform(res, is_label, "center")` geometry: Resize(res, NEAREST) + CenterCrop(res).

    Nearest-neighbour is used for images too, as the official code does. Normalization is left to the
    model boundary (`normalize`). `augment=True` adds `photometric_augment` to images (never to labels).

    Args:
      img: uint8 `[H, W, 3]` image or int32 `[H, W]` label.
    Returns:
      `[res, res(, 3)]` array of the input dtype.
    """
    h, w = img.shape[:2]
    new_h, new_w = resized_short_side_size(h, w, res)
    top, left = int(round((new_h - res) / 2.0)), int(round((new_w - res) / 2.0))
    # Crop the nearest-neighbour index vectors instead of the resized image: same pixels, less copying.
    rows = _nearest_indices(h, new_h)[top: top + res] if new_h != h else np.arange(top, top + res)
    cols = _nearest_indices(w, new_w)[left: left + res] if new_w != w else np.arange(left, left + res)
    out = np.take(np.take(img, rows, axis=0), cols, axis=1)
    if augment and not is_label:
        if rng is None:
            raise ValueError("official_transform(augment=True) needs a numpy Generator `rng` for determinism")
        out = photometric_augment(out, rng)
    return out
