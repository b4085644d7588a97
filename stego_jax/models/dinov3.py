"""DINOv3 Vision Transformer (ViT-S/16, S+/16, B/16, L/16) in flax.linen, inference semantics.

Follows facebookresearch/dinov3 (`DinoVisionTransformer` as built by the torch.hub builders of
`dinov3/hub/backbones.py`): patch 16, no absolute position embedding but 2-D rotary embeddings
(RoPE) on the patch tokens' queries and keys, CLS then 4 storage tokens before the patches,
LayerScale on both residual branches, LayerNorm eps 1e-5 (the hub's "layernormbf16"), an MLP
(exact GELU) or unfused SwiGLU feed-forward, and a qkv projection whose key bias is masked out
(`LinearKMaskedBias`: bias * bias_mask, the mask zero over the key third).

RoPE, as the official `RopePositionEmbedding` at eval (`normalize_coords="separate"`, the hub's
`pos_embed_rope_dtype="fp32"`): patch centres (i + 0.5) / h and (j + 0.5) / w mapped to [-1, 1],
angles 2π·coord / period for D_head/4 periods per axis (rows' then columns'), tiled twice to
D_head, applied as x·cos + rotate_half(x)·sin in float32. The periods are a parameter
(`rope_embed/periods`, the official persistent buffer): loaded from the checkpoint, initialised
to base ** (2i / (D_head/2)) with the hub's base 100. The training-time coordinate shift,
jitter and rescale augmentations are not applied (the official model skips them at eval).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from stego_jax.models.dinov2 import Block
from stego_jax.models.vit import (
    attend,
    check_images,
    embed_patches,
    final_norm,
    split_heads,
)

__all__ = [
    "DinoV3Config",
    "DINOV3_VARIANTS",
    "dinov3_config",
    "DinoV3VisionTransformer",
    "rope_periods",
    "rope_sincos",
    "swiglu_hidden",
]


def swiglu_hidden(hidden: int, align_to: int = 8) -> int:
    """Hidden width of the official `SwiGLUFFN`: int(hidden * 2/3) rounded up to `align_to`
    (1536 for ViT-S+/16: D 384, ratio 6)."""
    d = int(hidden * 2 / 3)
    return d + (-d % align_to)


@dataclasses.dataclass(frozen=True)
class DinoV3Config:
    """Architecture of a DINOv3 ViT (the hub's settings by default).

    `ffn` is "mlp" (fc1 -> GELU -> fc2) or "swiglu" (w1, w2 -> silu(w1 x) * w2 x -> w3, hidden
    width `swiglu_hidden(int(D * ffn_ratio))`). `mask_k_bias` zeroes the key third of the qkv
    bias as the official `bias_mask` does. `rope_base` only sets the initial periods; loaded
    models use the checkpoint's.
    """

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    ffn_ratio: float = 4.0
    ffn: str = "mlp"
    num_storage_tokens: int = 4
    layer_scale: bool = True
    qkv_bias: bool = True
    mask_k_bias: bool = True
    norm_eps: float = 1e-5
    rope_base: float = 100.0

    family = "dinov3"

    def __post_init__(self) -> None:
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn={self.ffn!r}; allowed: 'mlp', 'swiglu'")
        if self.num_storage_tokens < 0:
            raise ValueError(f"num_storage_tokens={self.num_storage_tokens} must be >= 0")
        if self.embed_dim % (4 * self.num_heads):
            # The official RopePositionEmbedding asserts the same.
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by 4 * {self.num_heads} heads (RoPE)"
            )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        """Hidden width of the feed-forward (per branch for SwiGLU)."""
        hidden = int(self.embed_dim * self.ffn_ratio)
        return swiglu_hidden(hidden) if self.ffn == "swiglu" else hidden

    @property
    def num_register_tokens(self) -> int:
        """The storage tokens (DINOv3's name for registers)."""
        return self.num_storage_tokens

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS and the storage tokens."""
        return 1 + self.num_storage_tokens


def _hub(embed_dim: int, depth: int, heads: int, ffn_ratio: float = 4.0, ffn: str = "mlp"):
    # dinov3/hub/backbones.py: patch 16, rope base 100 "separate" fp32, layerscale_init 1e-5,
    # norm "layernormbf16" (eps 1e-5), 4 storage tokens, mask_k_bias=True, every bias on.
    return DinoV3Config(
        patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=heads, ffn_ratio=ffn_ratio,
        ffn=ffn,
    )


DINOV3_VARIANTS: dict[str, DinoV3Config] = {
    "dinov3_vits16": _hub(384, 12, 6),
    "dinov3_vits16plus": _hub(384, 12, 6, 6.0, "swiglu"),
    "dinov3_vitb16": _hub(768, 12, 12),
    "dinov3_vitl16": _hub(1024, 24, 16),
}


def dinov3_config(name: str) -> DinoV3Config:
    """The official hub configuration of `name` ("dinov3_vitb16", ...)."""
    try:
        return DINOV3_VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown DINOv3 variant {name!r}; allowed: {', '.join(sorted(DINOV3_VARIANTS))}"
        ) from None


def rope_periods(head_dim: int, base: float = 100.0) -> np.ndarray:
    """The official initial periods, base ** (2i / (D_head/2)) for i < D_head/4, in float32."""
    exponents = 2 * np.arange(head_dim // 4, dtype=np.float32) / np.float32(head_dim // 2)
    return np.power(np.float32(base), exponents, dtype=np.float32)


def rope_sincos(periods: jax.Array, grid_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """(sin, cos), each `[h*w, D_head]` float32, of the official eval-time RoPE on an h x w grid
    (per-axis normalised patch centres in [-1, 1], row-major patches)."""
    h, w = grid_hw
    periods = periods.astype(jnp.float32)
    coords_h = jnp.arange(0.5, h, dtype=jnp.float32) / jnp.float32(h)
    coords_w = jnp.arange(0.5, w, dtype=jnp.float32) / jnp.float32(w)
    coords = jnp.stack(jnp.meshgrid(coords_h, coords_w, indexing="ij"), axis=-1)
    coords = 2.0 * coords.reshape(h * w, 2) - 1.0
    angles = (2 * np.pi) * coords[:, :, None] / periods[None, None, :]  # [hw, 2, D/4]
    angles = jnp.tile(angles.reshape(h * w, -1), (1, 2))  # [hw, D]
    return jnp.sin(angles), jnp.cos(angles)


def _rope_apply(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


# ----------------------------------------------------------------------------------------------
# Modules

_dense_init = nn.initializers.truncated_normal(stddev=0.02)


class RopeEmbed(nn.Module):
    """Holds the periods (the official `rope_embed.periods` buffer) and returns (sin, cos)."""

    config: DinoV3Config

    @nn.compact
    def __call__(self, grid_hw: tuple[int, int]):
        cfg = self.config
        periods = self.param(
            "periods",
            lambda *_: jnp.asarray(rope_periods(cfg.head_dim, cfg.rope_base)),
        )
        return rope_sincos(periods, grid_hw)


class QKV(nn.Module):
    """The fused qkv projection (`kernel`, `bias` as nn.Dense), the key third of the bias
    zeroed when `mask_k_bias` (the official LinearKMaskedBias with its bias_mask)."""

    config: DinoV3Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        d = x.shape[-1]
        kernel = self.param("kernel", _dense_init, (d, 3 * d), jnp.float32)
        y = jnp.einsum("bnd,de->bne", x.astype(self.dtype), kernel.astype(self.dtype))
        if cfg.qkv_bias:
            bias = self.param("bias", nn.initializers.zeros, (3 * d,), jnp.float32)
            if cfg.mask_k_bias:
                bias = bias * jnp.repeat(jnp.asarray([1.0, 0.0, 1.0], jnp.float32), d)
            y = y + bias.astype(self.dtype)
        return y


class Attention(nn.Module):
    """Self-attention with RoPE on the patch tokens' q and k (not on CLS/storage tokens)."""

    config: DinoV3Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, rope, n_prefix: int, return_attention: bool = False):
        cfg = self.config
        _, n, d = x.shape
        qkv = QKV(cfg, self.dtype, name="qkv")(x)
        q, k, v = split_heads(qkv, cfg.num_heads)  # [B, N, heads, hd]
        sin, cos = rope  # [hw, hd]
        sin, cos = sin[:, None, :], cos[:, None, :]

        def rotate(t):
            t32 = t.astype(jnp.float32)
            rotated = _rope_apply(t32[:, n_prefix:], sin, cos)
            return jnp.concatenate([t32[:, :n_prefix], rotated], axis=1).astype(t.dtype)

        q, k = rotate(q), rotate(k)
        scale = cfg.head_dim**-0.5
        out, attn = attend(q, k, v, scale, return_attention)
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init
        )
        out = dense(d, name="proj")(rearrange(out, "b n heads hd -> b n (heads hd)"))
        return out, attn


class SwiGLU(nn.Module):
    """The official (unfused) SwiGLUFFN: w3(silu(w1 x) * w2 x)."""

    config: DinoV3Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init
        )
        hidden = self.config.mlp_dim
        x1 = dense(hidden, name="w1")(x)
        x2 = dense(hidden, name="w2")(x)
        return dense(self.config.embed_dim, name="w3")(jax.nn.silu(x1) * x2)


class DinoV3VisionTransformer(nn.Module):
    """DINOv3 ViT returning all tokens after the final LayerNorm.

    Attributes:
      config: the architecture.
      dtype: compute dtype (e.g. `jnp.bfloat16`); parameters are always float32, and RoPE is
        applied in float32 whatever the dtype (as the official fp32 rope).
    """

    config: DinoV3Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, return_attention: bool = False):
        """Run the backbone.

        Args:
          x: `[B, H, W, 3]` float32 ImageNet-normalized images, H, W >= patch size; trailing
            pixels beyond a multiple of the patch size are ignored (the official stride-16
            convolution drops them too).
          return_attention: also return the last block's softmax attention.
        Returns:
          tokens `[B, 1 + R + h*w, D]` float32: CLS, the R storage tokens, then the patches in
          row-major order; with `return_attention`, `(tokens, attn)`, attn
          `[B, heads, N, N]` float32 with N = 1 + R + h*w (after RoPE).
        """
        cfg = self.config
        p = cfg.patch_size
        h, w = check_images(x, p)
        tokens = embed_patches(x[:, : h * p, : w * p], p, cfg.embed_dim, self.dtype)
        b, d = tokens.shape[0], cfg.embed_dim

        init = nn.initializers.normal(stddev=0.02)
        prefix = [jnp.broadcast_to(
            self.param("cls_token", init, (1, 1, d), jnp.float32).astype(self.dtype), (b, 1, d)
        )]
        if cfg.num_storage_tokens:
            storage = self.param(
                "storage_tokens", init, (1, cfg.num_storage_tokens, d), jnp.float32
            )
            prefix.append(
                jnp.broadcast_to(storage.astype(self.dtype), (b, cfg.num_storage_tokens, d))
            )
        tokens = jnp.concatenate([*prefix, tokens], axis=1)
        rope = RopeEmbed(cfg, name="rope_embed")((h, w))

        attn = None
        for i in range(cfg.depth):
            want = return_attention and i == cfg.depth - 1
            block = Block(cfg, self.dtype, attention=Attention, swiglu=SwiGLU, name=f"blocks_{i}")
            tokens, attn = block(tokens, rope, cfg.num_prefix_tokens, return_attention=want)
        return final_norm(tokens, cfg.norm_eps, self.dtype, attn, return_attention)
