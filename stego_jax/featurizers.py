"""Frozen featurizers: image batch -> patch-feature map. DINO ViTs for real work, a fixed patch
descriptor for the offline demo. A registry, so a new backbone is an entry, not an `if`."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from stego_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from stego_jax.models import build_backbone, patch_feature_map
from stego_jax.weights import load_backbone
from stego_jax.weights.registry import is_registered

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Featurizer:
    """A frozen feature extractor.

    `apply(params, images [B,H,W,3] float32 ImageNet-normalized) -> feats [B,h,w,C] float32`.
    `params` are passed explicitly (not closed over) so jitted steps take them as arguments
    instead of baking hundreds of MB of constants into the compiled program.
    """

    name: str
    apply: Callable[[Any, Array], Array]
    params: Any
    patch_size: int
    dim: int
    description: str

    def __call__(self, images: Array) -> Array:
        return self.apply(self.params, images)


def params_sha256(params: Any) -> str:
    """sha256 over a featurizer's parameter tree (paths, dtypes, shapes, bytes): what its outputs
    depend on, not only the backbone's name (a weights file can be overwritten under the same
    name). Keys the feature cache and the k-NN tables."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# DINO ViT
# ----------------------------------------------------------------------------------------

def _dtype(name: str):
    allowed = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in allowed:
        raise ValueError(f"config.model.dtype={name!r}; allowed values: {sorted(allowed)}")
    return allowed[name]


_FAMILY_NAMES = {"dino": "DINO", "dinov2": "DINOv2", "dinov3": "DINOv3"}


def build_dino(config) -> Featurizer:
    """DINO, DINOv2 or DINOv3 ViT from a registry name or a checkpoint path
    (`config.model.backbone`).

    The features are the final-norm patch tokens; CLS and any DINOv2 register or DINOv3 storage
    tokens are dropped.
    """
    backbone = str(config.model.backbone)
    vit_config, params = load_backbone(
        backbone, num_heads=int(config.model.get("num_heads", 0)) or None
    )
    # A short name for file names (k-NN tables, caches): the registry name or the file's stem.
    name = backbone if is_registered(backbone) else os.path.splitext(os.path.basename(backbone))[0]
    model = build_backbone(vit_config, dtype=_dtype(config.model.get("dtype", "float32")))
    p = vit_config.patch_size
    family = getattr(vit_config, "family", "dino")

    def apply(params, images):
        tokens = model.apply({"params": params}, images)
        h, w = images.shape[1] // p, images.shape[2] // p
        return patch_feature_map(tokens, vit_config, (h, w)).astype(jnp.float32)

    params = jax.tree_util.tree_map(jnp.asarray, params)
    return Featurizer(
        name=name,
        apply=apply,
        params=params,
        patch_size=p,
        dim=vit_config.embed_dim,
        description=(
            f"frozen {_FAMILY_NAMES.get(family, 'DINO')} ViT ({backbone}, patch {p}, "
            f"dim {vit_config.embed_dim})"
        ),
    )


# ----------------------------------------------------------------------------------------
# Fixed patch descriptor (offline demo)
# ----------------------------------------------------------------------------------------

def patch_descriptor(images: Array, patch_size: int) -> Array:
    """Per-patch colour mean/std and |FFT| of the grey patch.

    images [B,H,W,3] float32 (ImageNet-normalized; un-normalized here to [0,1] RGB)
    -> [B, H//p, W//p, 6 + p*(p//2+1)] float32 (46 channels for p=8).
    Not learned and needs no weights: a ViT with random weights gives features without the
    semantic structure STEGO distils, so the offline demo uses this instead (docs/demo.md).
    """
    p = patch_size
    rgb = images * jnp.asarray(IMAGENET_STD, images.dtype) + jnp.asarray(IMAGENET_MEAN, images.dtype)
    b, H, W, _ = rgb.shape
    h, w = H // p, W // p
    x = rgb[:, : h * p, : w * p].reshape(b, h, p, w, p, 3).transpose(0, 1, 3, 2, 4, 5)
    mean = x.mean(axis=(3, 4))
    std = x.std(axis=(3, 4))
    grey = x.mean(axis=-1)
    spectrum = jnp.abs(jnp.fft.rfft2(grey, axes=(3, 4))).reshape(b, h, w, -1)
    return jnp.concatenate([mean, std, spectrum], axis=-1).astype(jnp.float32)


def fit_descriptor_stats(images: np.ndarray, patch_size: int, batch: int = 256) -> dict:
    """Per-channel mean/std of the descriptor over a set of normalized images [N,H,W,3]."""
    fn = jax.jit(lambda x: patch_descriptor(x, patch_size))
    s = s2 = 0.0
    n = 0
    for i in range(0, len(images), batch):
        d = np.asarray(fn(jnp.asarray(images[i : i + batch]))).astype(np.float64)
        d = d.reshape(-1, d.shape[-1])
        s = s + d.sum(0)
        s2 = s2 + (d**2).sum(0)
        n += len(d)
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    return {"mean": mean.astype(np.float32), "std": np.maximum(std, 1e-6).astype(np.float32)}


def build_descriptor(config, fit_images: np.ndarray | None = None, stats: dict | None = None) -> Featurizer:
    """The demo featurizer; z-scored with statistics fitted once on the training images."""
    p = int(config.model.get("patch_size", 8))
    if stats is None:
        if fit_images is None:
            raise ValueError(
                "the 'descriptor' featurizer needs its z-score statistics: pass the training "
                "images (fit_images=) or the saved statistics (stats=) from the run's workdir"
            )
        stats = fit_descriptor_stats(fit_images, p)

    def apply(params, images):
        d = patch_descriptor(images, p)
        return (d - params["mean"]) / params["std"]

    params = {k: jnp.asarray(v) for k, v in stats.items()}
    return Featurizer(
        name="descriptor",
        apply=apply,
        params=params,
        patch_size=p,
        dim=6 + p * (p // 2 + 1),
        description=(
            f"fixed patch descriptor (colour mean/std + |FFT| of {p}x{p} patches, z-scored); "
            "NOT a learned backbone: it stands in for DINO offline"
        ),
    )


FEATURIZERS: dict[str, Callable[..., Featurizer]] = {
    "dino": build_dino,
    "descriptor": build_descriptor,
}


def build_featurizer(config, **kwargs) -> Featurizer:
    """Build `config.model.featurizer` (one of FEATURIZERS)."""
    name = config.model.featurizer
    if name not in FEATURIZERS:
        raise ValueError(
            f"config.model.featurizer={name!r} is unknown; allowed values: {sorted(FEATURIZERS)}"
        )
    builder = FEATURIZERS[name]
    if name == "dino":
        return builder(config)
    return builder(config, **kwargs)
