"""DINO-compatible Vision Transformer backbone in flax.linen.

Owns the architecture (any patch size, width, depth), position-embedding interpolation for any
input size (bit-for-bit the official coordinate mapping), and the optional last-block attention.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

__all__ = [
    "ViTConfig",
    "VIT_VARIANTS",
    "vit_config",
    "VisionTransformer",
    "torch_bicubic_matrix",
    "interpolate_pos_embed",
    "patch_tokens_to_map",
    "grid_size",
]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a DINO ViT.

    `img_size // patch_size` is the side G of the stored square position-embedding grid, so
    `pos_embed` has `1 + G*G` rows (CLS first).
    """

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    img_size: int = 224

    @property
    def pos_grid(self) -> int:
        """Side G of the stored position-embedding grid."""
        return self.img_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        # torch's Block uses int(dim * mlp_ratio).
        return int(self.embed_dim * self.mlp_ratio)


VIT_VARIANTS: dict[str, ViTConfig] = {
    "vitt16": ViTConfig(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vits16": ViTConfig(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vits8": ViTConfig(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "vitb16": ViTConfig(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vitb8": ViTConfig(patch_size=8, embed_dim=768, depth=12, num_heads=12),
}


def vit_config(name: str) -> ViTConfig:
    """Look up a named variant ("vits8", "vitb8", ...) in `VIT_VARIANTS`."""
    try:
        return VIT_VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown ViT variant {name!r}; allowed: {', '.join(sorted(VIT_VARIANTS))}"
        ) from None


def grid_size(image_hw: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch-grid (rows, cols) for an image of `image_hw` pixels; trailing pixels are dropped."""
    return image_hw[0] // patch_size, image_hw[1] // patch_size


def patch_tokens_to_map(tokens: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Drop the CLS token and lay patch tokens out as a map.

    Args:
      tokens: `[B, 1 + h*w, D]`, CLS first, patches in row-major order.
      grid_hw: `(h, w)`.
    Returns:
      `[B, h, w, D]`.
    """
    h, w = grid_hw
    if tokens.shape[1] != 1 + h * w:
        raise ValueError(f"tokens have {tokens.shape[1]} rows, expected 1 + {h}*{w}")
    return rearrange(tokens[:, 1:], "b (h w) d -> b h w d", h=h, w=w)


# ----------------------------------------------------------------------------------------------
# Position-embedding interpolation


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(src)."""
    d = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=-1)  # distances to the four taps
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0  # |d| <= 1
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a  # 1 < |d| < 2
    return np.where(d <= 1.0, near, far)


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, scale: float) -> np.ndarray:
    """One-axis matrix of torch `F.interpolate(mode='bicubic', scale_factor=scale)`.

    torch, given a scale factor (not a size), outputs `floor(in_size * scale)` samples and maps
    output index i to source coordinate `(i + 0.5) / scale - 0.5` with the *given* scale, then uses
    the A = -0.75 cubic on taps clamped to the border (align_corners=False).

    Returns:
      `[out_size, in_size]` float64 matrix M with `out = M @ in`.
    """
    out_size = math.floor(in_size * scale)
    src = (np.arange(out_size, dtype=np.float64) + 0.5) / scale - 0.5
    base = np.floor(src)
    weights = _cubic_weights(src - base)  # [out, 4]
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    # Border clamping makes several taps land on the same source pixel: accumulate, don't assign.
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


def interpolate_pos_embed(
    pos_embed: jax.Array, grid_hw: tuple[int, int], image_hw: tuple[int, int]
) -> jax.Array:
    """Adapt a stored `[1, 1 + G*G, D]` position embedding to an `h x w` patch grid.

    Mirrors DINO's `interpolate_pos_encoding`: unchanged when the token count matches and the
    image (in pixels) is square; otherwise the patch part is bicubic-resized with
    `scale_factor = ((h + 0.1) / G, (w + 0.1) / G)` (the +0.1 guards the floor of the output
    size). Shapes are static, so the resampling matrices are built in NumPy at trace time.

    Args:
      pos_embed: `[1, 1 + G*G, D]`.
      grid_hw: `(h, w)` patch-grid rows and cols of the input.
      image_hw: `(H, W)` input size in pixels (only used for the official fast-path test).
    Returns:
      `[1, 1 + h*w, D]`, same dtype as `pos_embed`.
    """
    h, w = grid_hw
    n_stored = pos_embed.shape[1] - 1
    g = math.isqrt(n_stored)
    if g * g != n_stored:
        raise ValueError(f"pos_embed has {n_stored} patch rows, not a square grid")
    # The official test compares pixel sizes, so e.g. a 224x230 image at p=16 (grid 14x14) is
    # still resampled (by scale 14.1/14, which is not the identity).
    if h * w == n_stored and image_hw[0] == image_hw[1]:
        return pos_embed
    rows = torch_bicubic_matrix(g, (h + 0.1) / g)
    cols = torch_bicubic_matrix(g, (w + 0.1) / g)
    if rows.shape[0] != h or cols.shape[0] != w:  # the official code asserts the same
        raise ValueError(f"bicubic output {rows.shape[0]}x{cols.shape[0]} != grid {h}x{w}")
    grid = rearrange(pos_embed[0, 1:], "(i j) d -> i j d", i=g, j=g)
    resized = jnp.einsum(
        "hi,wj,ijd->hwd",
        jnp.asarray(rows, pos_embed.dtype),
        jnp.asarray(cols, pos_embed.dtype),
        grid,
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.concatenate([pos_embed[:, :1], rearrange(resized, "h w d -> 1 (h w) d")], axis=1)


# ----------------------------------------------------------------------------------------------
# Modules

_dense_init = nn.initializers.truncated_normal(stddev=0.02)


def check_images(x: jax.Array, patch_size: int) -> tuple[int, int]:
    """The `(h, w)` patch grid of images `x` `[B, H, W, 3]`; raises on another shape or an image
    smaller than one patch."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got shape {x.shape}")
    image_hw = (x.shape[1], x.shape[2])
    h, w = grid_size(image_hw, patch_size)
    if h < 1 or w < 1:
        raise ValueError(f"image {image_hw} is smaller than the patch size {patch_size}")
    return h, w


def embed_patches(x: jax.Array, patch_size: int, embed_dim: int, dtype: Any) -> jax.Array:
    """Patch embedding (a stride-p convolution named `patch_embed`, inside the calling compact
    module) of images `[B, H, W, 3]` -> tokens `[B, h*w, D]` in row-major order."""
    p = patch_size
    tokens = nn.Conv(
        embed_dim,
        kernel_size=(p, p),
        strides=(p, p),
        padding="VALID",
        dtype=dtype,
        param_dtype=jnp.float32,
        name="patch_embed",
    )(x.astype(dtype))
    return rearrange(tokens, "b h w d -> b (h w) d")


def split_heads(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fused qkv `[B, N, 3D]` in torch's layout (q|k|v, head, head_dim) -> q, k, v, each
    `[B, N, heads, head_dim]`."""
    qkv = rearrange(qkv, "b n (three heads hd) -> b n three heads hd", three=3, heads=num_heads)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _explicit(q, k, v, scale):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(scale, q.dtype)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", attn.astype(v.dtype), v), attn


def attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, return_attention: bool):
    """Softmax(q·kᵀ·scale)·v over `[B, N, heads, hd]` inputs -> (`[B, N, heads, hd]`, weights).

    The weights (float32 `[B, heads, N, N]`) are returned when `return_attention`, else None.
    On CPU the attention is computed step by step one image at a time (`lax.map` over the batch):
    the same numbers bit for bit as the whole batch at once, but one image's `[heads, N, N]`
    weights stay in cache; for a DINOv2 ViT-B/14 at 322 px (530 tokens, batch 4, 2-core CPU) one
    attention took 58 ms against 61 ms for the whole batch step by step and 110 ms for
    `dot_product_attention`, and it was the fastest of the three from 197 to 1601 tokens. On other
    backends `dot_product_attention` (fused kernels) unless the weights are wanted.
    """
    if jax.default_backend() == "cpu":
        def per_image(t):
            out, attn = _explicit(*(y[None] for y in t), scale)
            return (out[0], attn[0]) if return_attention else out[0]

        mapped = jax.lax.map(per_image, (q, k, v))
        return mapped if return_attention else (mapped, None)
    if return_attention:
        return _explicit(q, k, v, scale)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=None), None


def final_norm(tokens: jax.Array, eps: float, dtype: Any, attn, return_attention: bool):
    """The final LayerNorm (named `norm`, inside the calling compact module), as float32; with
    `return_attention`, `(tokens, attn)` with attn as float32."""
    tokens = nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name="norm")(tokens)
    tokens = tokens.astype(jnp.float32)
    if return_attention:
        return tokens, attn.astype(jnp.float32)
    return tokens


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (torch layout: (3, heads, hd))."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, return_attention: bool = False):
        cfg = self.config
        _, n, d = x.shape
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init
        )
        qkv = dense(3 * d, use_bias=cfg.qkv_bias, name="qkv")(x)
        q, k, v = split_heads(qkv, cfg.num_heads)  # each [B, N, heads, hd]
        scale = cfg.head_dim**-0.5
        out, attn = attend(q, k, v, scale, return_attention)
        out = dense(d, name="proj")(rearrange(out, "b n heads hd -> b n (heads hd)"))
        return out, attn


class Mlp(nn.Module):
    """Dense -> exact (erf) GELU -> Dense, as torch's `nn.GELU()` default."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init
        )
        x = dense(self.config.mlp_dim, name="fc1")(x)
        x = jax.nn.gelu(x, approximate=False)
        return dense(self.config.embed_dim, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, return_attention: bool = False):
        norm = functools.partial(
            nn.LayerNorm, epsilon=self.config.norm_eps, dtype=self.dtype, param_dtype=jnp.float32
        )
        y, attn = Attention(self.config, self.dtype, name="attn")(
            norm(name="norm1")(x), return_attention
        )
        x = x + y
        x = x + Mlp(self.config, self.dtype, name="mlp")(norm(name="norm2")(x))
        return x, attn


class VisionTransformer(nn.Module):
    """DINO ViT returning all tokens after the final LayerNorm.

    Attributes:
      config: the architecture.
      dtype: compute dtype (e.g. `jnp.bfloat16`); parameters are always float32.
    """

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, return_attention: bool = False):
        """Run the backbone.

        Args:
          x: `[B, H, W, 3]` float32 ImageNet-normalized images, any H, W >= patch size;
            trailing pixels beyond a multiple of the patch size are ignored (as torch's conv).
          return_attention: also return the last block's softmax attention.
        Returns:
          tokens `[B, 1 + h*w, D]` float32 (CLS first, patches row-major, h = H // p,
          w = W // p); with `return_attention`, `(tokens, attn)` where attn is
          `[B, heads, 1 + h*w, 1 + h*w]` float32.
        """
        cfg = self.config
        h, w = check_images(x, cfg.patch_size)
        image_hw = (x.shape[1], x.shape[2])
        tokens = embed_patches(x, cfg.patch_size, cfg.embed_dim, self.dtype)
        b = tokens.shape[0]

        init = nn.initializers.truncated_normal(stddev=0.02)
        cls_token = self.param("cls_token", init, (1, 1, cfg.embed_dim), jnp.float32)
        g = cfg.pos_grid
        pos_embed = self.param("pos_embed", init, (1, 1 + g * g, cfg.embed_dim), jnp.float32)

        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, cfg.embed_dim))
        tokens = jnp.concatenate([cls, tokens], axis=1)
        # Interpolate in float32 (the stored parameters), then add in the compute dtype.
        tokens = tokens + interpolate_pos_embed(pos_embed, (h, w), image_hw).astype(self.dtype)

        attn = None
        for i in range(cfg.depth):
            want = return_attention and i == cfg.depth - 1
            tokens, attn = Block(cfg, self.dtype, name=f"blocks_{i}")(tokens, want)
        return final_norm(tokens, cfg.norm_eps, self.dtype, attn, return_attention)
