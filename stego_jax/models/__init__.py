"""Flax models: the frozen backbones (DINO ViT, DINOv2 ViT, DINOv3 ViT), the STEGO head and probes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange

from stego_jax.models.dinov2 import DinoV2Config, DinoV2VisionTransformer
from stego_jax.models.dinov3 import DinoV3Config, DinoV3VisionTransformer
from stego_jax.models.vit import ViTConfig, VisionTransformer

__all__ = ["build_backbone", "num_prefix_tokens", "patch_feature_map"]


def build_backbone(cfg: ViTConfig | DinoV2Config | DinoV3Config, dtype: Any = jnp.float32):
    """The Flax module of a backbone config (as `stego_jax.weights.load_backbone` returns it).

    Every backbone has one contract: `apply({"params": p}, x [B,H,W,3] float32,
    return_attention=True) -> (tokens, attn)`, tokens `[B, 1+R+h*w, D]` after the final norm
    (CLS, the R register/storage tokens, the patches row-major), attn the last block's attention
    probabilities `[B, heads, N, N]`; without `return_attention`, the tokens alone.
    """
    if isinstance(cfg, DinoV3Config):
        return DinoV3VisionTransformer(cfg, dtype=dtype)
    if isinstance(cfg, DinoV2Config):
        return DinoV2VisionTransformer(cfg, dtype=dtype)
    if isinstance(cfg, ViTConfig):
        return VisionTransformer(cfg, dtype=dtype)
    raise TypeError(f"no backbone for a config of type {type(cfg).__name__}")


def num_prefix_tokens(cfg: ViTConfig | DinoV2Config | DinoV3Config) -> int:
    """Tokens before the patches: CLS, plus DINOv2's registers or DINOv3's storage tokens."""
    return 1 + int(getattr(cfg, "num_register_tokens", 0))


def patch_feature_map(
    tokens: jax.Array, cfg: ViTConfig | DinoV2Config | DinoV3Config, grid_hw: tuple[int, int]
) -> jax.Array:
    """Backbone tokens `[B, 1+R+h*w, D]` -> patch features `[B, h, w, D]` (CLS and
    register/storage tokens dropped)."""
    h, w = grid_hw
    skip = num_prefix_tokens(cfg)
    if tokens.shape[1] != skip + h * w:
        raise ValueError(f"tokens have {tokens.shape[1]} rows, expected {skip} + {h}*{w}")
    return rearrange(tokens[:, skip:], "b (h w) d -> b h w d", h=h, w=w)
