"""Realistic inputs for tests and benchmarks of the dense CRF.

`sample_photo` gives a real photograph (one of scikit-image's bundled sample images, so nothing is
downloaded) at any size; `stego_like_logits` gives per-pixel class scores shaped like those of
STEGO's cluster probe for it. The CRF tests and `experiments/benchmarks/` use both, so the
benchmarks time the inputs the tests check.

Needs scikit-image (the `test` extra) for `sample_photo`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def sample_photo(name: str, h: int, w: int) -> np.ndarray:
    """The largest centred crop of `skimage.data.<name>()` with aspect h:w, resized to
    [h, w, 3] uint8.

    Grey images are repeated over the three channels; an alpha channel is dropped.
    """
    from skimage import data, transform

    im = getattr(data, name)()
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    im = im[..., :3]
    ih, iw = im.shape[:2]
    s = min(ih / h, iw / w)
    ch, cw = int(h * s), int(w * s)
    y0, x0 = (ih - ch) // 2, (iw - cw) // 2
    im = transform.resize(im[y0 : y0 + ch, x0 : x0 + cw], (h, w), anti_aliasing=True)
    return (im * 255).round().astype(np.uint8)


def stego_like_logits(image: np.ndarray, k: int, seed: int) -> np.ndarray:
    """[h, w, k] float32 logits `2·cos(pixel embedding, centroid) + smooth noise` for an
    [h, w, 3] uint8 image.

    As STEGO's cluster probe gives (temperature 2 on cosine similarities): each pixel is embedded
    from its blurred colour (Gaussian, σ 2 px) and position by a random tanh layer,
    `k` centroids are the embeddings of random pixels, and spatially smooth noise (Gaussian,
    σ 6 px; 0.3 standard deviations) keeps the unaries from being a pure function of
    colour. Deterministic in `seed`.
    """
    rng = np.random.default_rng(seed)
    h, w, _ = image.shape
    col = ndimage.gaussian_filter(image.astype(np.float32) / 255, (2, 2, 0))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    pixels = np.concatenate([col, 0.5 * yy[..., None], 0.5 * xx[..., None]], -1)
    emb = np.tanh(pixels @ rng.normal(size=(5, 16)) * 2)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    cent = emb.reshape(-1, 16)[rng.choice(h * w, k, replace=False)]
    noise = ndimage.gaussian_filter(rng.normal(size=(h, w, k)), (6, 6, 0))
    return (2 * emb @ cent.T + 0.3 * noise / noise.std()).astype(np.float32)
