"""DINOv2 Vision Transformer (with or without register tokens) in flax.linen.

Follows facebookresearch/dinov2 (`DinoVisionTransformer` as built by the torch.hub builders of
`dinov2/hub/backbones.py`): patch 14, LayerNorm eps 1e-6, LayerScale on both residual branches,
an MLP (exact GELU) or fused SwiGLU feed-forward, optional register tokens inserted after CLS
(after the position embedding was added, so registers carry none), and the official
`interpolate_pos_encoding` of the stored 37x37 grid with each variant's offset and antialias.
Without xFormers the official attention is plain softmax(q·kᵀ/sqrt(hd))·v, as here.
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

from stego_jax.models.vit import (
    Attention,
    Mlp,
    check_images,
    embed_patches,
    final_norm,
    torch_bicubic_matrix,
)

__all__ = [
    "DinoV2Config",
    "DINOV2_VARIANTS",
    "dinov2_config",
    "DinoV2VisionTransformer",
    "bicubic_matrix",
    "interpolate_pos_embed",
    "swiglu_hidden",
]


def swiglu_hidden(embed_dim: int, mlp_ratio: float) -> int:
    """Hidden width of the official `SwiGLUFFNFused`: the MLP width int(D * ratio), taken to
    2/3 and rounded up to a multiple of 8 (4096 for ViT-g: D 1536, ratio 4)."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
    """Architecture of a DINOv2 ViT.

    `img_size // patch_size` is the side G of the stored square position-embedding grid (37 for
    the hub's 518-pixel models). `ffn` is "mlp" (fc1 -> GELU -> fc2) or "swiglu" (the fused
    SwiGLU of ViT-g). `interpolate_offset`/`interpolate_antialias` are the official
    `DinoVisionTransformer` arguments: 0.1/False for the hub's original models, 0.0/True for its
    `_reg` models.
    """

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    ffn: str = "mlp"
    num_register_tokens: int = 0
    layer_scale: bool = True
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    img_size: int = 518
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    family = "dinov2"

    def __post_init__(self) -> None:
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn={self.ffn!r}; allowed: 'mlp', 'swiglu'")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens={self.num_register_tokens} must be >= 0")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by {self.num_heads} heads"
            )

    @property
    def pos_grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        """Hidden width of the feed-forward (per branch for SwiGLU)."""
        if self.ffn == "swiglu":
            return swiglu_hidden(self.embed_dim, self.mlp_ratio)
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS and the registers."""
        return 1 + self.num_register_tokens


def _hub(embed_dim: int, depth: int, heads: int, ffn: str = "mlp", reg: bool = False):
    # dinov2/hub/backbones.py: img_size 518, patch 14, init_values 1.0 (LayerScale); the `_reg`
    # builders add 4 registers, interpolate_antialias=True, interpolate_offset=0.0.
    return DinoV2Config(
        patch_size=14,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=heads,
        ffn=ffn,
        num_register_tokens=4 if reg else 0,
        interpolate_offset=0.0 if reg else 0.1,
        interpolate_antialias=reg,
    )


DINOV2_VARIANTS: dict[str, DinoV2Config] = {}
for _reg in (False, True):
    for _name, _args in {
        "dinov2_vits14": (384, 12, 6),
        "dinov2_vitb14": (768, 12, 12),
        "dinov2_vitl14": (1024, 24, 16),
        "dinov2_vitg14": (1536, 40, 24, "swiglu"),
    }.items():
        DINOV2_VARIANTS[_name + ("_reg" if _reg else "")] = _hub(*_args, reg=_reg)


def dinov2_config(name: str) -> DinoV2Config:
    """The official hub configuration of `name` ("dinov2_vitb14", "dinov2_vitb14_reg", ...)."""
    try:
        return DINOV2_VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown DINOv2 variant {name!r}; allowed: {', '.join(sorted(DINOV2_VARIANTS))}"
        ) from None


# ----------------------------------------------------------------------------------------------
# Position-embedding interpolation


def _pil_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """The cubic of torch's antialiased bicubic (Keys with a = -0.5, as PIL), zero beyond 2."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def _antialias_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """One axis of torch `F.interpolate(mode='bicubic', antialias=True, align_corners=False)`.

    `scale` is torch's source/destination ratio (1/scale_factor when a scale factor is given,
    in/out otherwise). Output i is centred at scale*(i+0.5) in source pixels; when downsampling
    the cubic is stretched by `scale` (support 2*scale); taps outside the input are dropped and
    the remaining weights normalised to sum to one (PIL's resampling filter).
    """
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax)
        w = _pil_cubic((taps - center + 0.5) * invscale)
        total = w.sum()
        matrix[i, xmin:xmax] = w / total if total != 0.0 else w
    return matrix


@functools.lru_cache(maxsize=64)
def _size_matrix(in_size: int, out_size: int) -> np.ndarray:
    """torch bicubic (a = -0.75, clamped border taps) given an output size, not a scale."""
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(src)
    t = src - base
    d = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=-1)
    a = -0.75
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    weights = np.where(d <= 1.0, near, far)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix


def bicubic_matrix(in_size: int, out_size: int, offset: float, antialias: bool) -> np.ndarray:
    """`[out_size, in_size]` matrix of one axis of the official `interpolate_pos_encoding`.

    A non-zero `offset` passes `scale_factor = (out_size + offset) / in_size` to torch (which then
    maps coordinates with that factor and outputs floor(in_size * factor) samples); a zero offset
    passes `size=out_size`. `antialias` selects torch's antialiased bicubic, which leaves an
    axis whose size does not change untouched.
    """
    if offset:
        factor = (out_size + offset) / in_size
        if not antialias:
            matrix = torch_bicubic_matrix(in_size, factor)
        elif math.floor(in_size * factor) == in_size:
            # torch's antialiased kernel copies an axis whose size does not change, whatever
            # the scale factor says.
            matrix = np.eye(in_size)
        else:
            matrix = _antialias_matrix(in_size, math.floor(in_size * factor), 1.0 / factor)
    elif antialias:
        matrix = _antialias_matrix(in_size, out_size, in_size / out_size)
    else:
        matrix = _size_matrix(in_size, out_size)
    if matrix.shape[0] != out_size:  # the official code asserts the same
        raise ValueError(f"bicubic output {matrix.shape[0]} != grid {out_size} (offset {offset})")
    return matrix


def interpolate_pos_embed(
    pos_embed: jax.Array,
    grid_hw: tuple[int, int],
    offset: float,
    antialias: bool,
) -> jax.Array:
    """Adapt a stored `[1, 1 + G*G, D]` position embedding to an `h x w` patch grid.

    As DINOv2's `interpolate_pos_encoding`: unchanged when h*w == G*G and the (patch-multiple)
    image is square, i.e. h == w; else the patch part is resampled in float32 with the variant's
    offset and antialias (`bicubic_matrix`), rows then columns.
    """
    h, w = grid_hw
    n_stored = pos_embed.shape[1] - 1
    g = math.isqrt(n_stored)
    if g * g != n_stored:
        raise ValueError(f"pos_embed has {n_stored} patch rows, not a square grid")
    if h * w == n_stored and h == w:
        return pos_embed
    rows = bicubic_matrix(g, h, offset, antialias)
    cols = bicubic_matrix(g, w, offset, antialias)
    grid = rearrange(pos_embed[0, 1:], "(i j) d -> i j d", i=g, j=g)
    resized = jnp.einsum(
        "hi,wj,ijd->hwd",
        jnp.asarray(rows, jnp.float32),
        jnp.asarray(cols, jnp.float32),
        grid.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    ).astype(pos_embed.dtype)
    return jnp.concatenate([pos_embed[:, :1], rearrange(resized, "h w d -> 1 (h w) d")], axis=1)


# ----------------------------------------------------------------------------------------------
# Modules

_dense_init = nn.initializers.truncated_normal(stddev=0.02)


class LayerScale(nn.Module):
    """x * gamma (per channel), the official LayerScale (gamma initialised to 1.0 by the hub)."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.ones, (self.dim,), jnp.float32)
        return x * gamma.astype(self.dtype)


class SwiGLU(nn.Module):
    """The official SwiGLUFFN: w12 -> (x1, x2) halves -> silu(x1) * x2 -> w3."""

    config: DinoV2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(
            nn.Dense, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_dense_init
        )
        x12 = dense(2 * self.config.mlp_dim, name="w12")(x)
        x1, x2 = jnp.split(x12, 2, axis=-1)
        return dense(self.config.embed_dim, name="w3")(jax.nn.silu(x1) * x2)


class Block(nn.Module):
    """x + ls1(attn(norm1(x), *context)), then x + ls2(ffn(norm2(x))): the pre-norm LayerScale block
    of DINOv2 and DINOv3, which differ only in the attention (`attention`, called with the block's
    extra arguments, e.g. DINOv3's RoPE) and the SwiGLU variant (`swiglu`)."""

    config: Any
    dtype: Any = jnp.float32
    attention: Any = Attention
    swiglu: Any = None  # default: this module's fused SwiGLU

    @nn.compact
    def __call__(self, x: jax.Array, *context, return_attention: bool = False):
        cfg = self.config
        norm = functools.partial(
            nn.LayerNorm, epsilon=cfg.norm_eps, dtype=self.dtype, param_dtype=jnp.float32
        )
        y, attn = self.attention(cfg, self.dtype, name="attn")(norm(name="norm1")(x), *context,
                                                               return_attention)
        if cfg.layer_scale:
            y = LayerScale(cfg.embed_dim, self.dtype, name="ls1")(y)
        x = x + y
        ffn = (self.swiglu or SwiGLU) if cfg.ffn == "swiglu" else Mlp
        y = ffn(cfg, self.dtype, name="mlp")(norm(name="norm2")(x))
        if cfg.layer_scale:
            y = LayerScale(cfg.embed_dim, self.dtype, name="ls2")(y)
        return x + y, attn


class DinoV2VisionTransformer(nn.Module):
    """DINOv2 ViT returning all tokens after the final LayerNorm.

    Attributes:
      config: the architecture.
      dtype: compute dtype (e.g. `jnp.bfloat16`); parameters are always float32.
    """

    config: DinoV2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, return_attention: bool = False):
        """Run the backbone.

        Args:
          x: `[B, H, W, 3]` float32 ImageNet-normalized images, H, W >= patch size. The official
            code asserts H and W are multiples of the patch size; trailing pixels beyond a
            multiple are ignored here, so the result is the official one on the cropped image.
          return_attention: also return the last block's softmax attention.
        Returns:
          tokens `[B, 1 + R + h*w, D]` float32: CLS, the R registers, then the patches in
          row-major order; with `return_attention`, `(tokens, attn)`, attn
          `[B, heads, N, N]` float32 with N = 1 + R + h*w.
        """
        cfg = self.config
        p = cfg.patch_size
        h, w = check_images(x, p)
        tokens = embed_patches(x[:, : h * p, : w * p], p, cfg.embed_dim, self.dtype)
        b, d = tokens.shape[0], cfg.embed_dim

        init = nn.initializers.truncated_normal(stddev=0.02)
        cls_token = self.param("cls_token", init, (1, 1, d), jnp.float32)
        g = cfg.pos_grid
        pos_embed = self.param("pos_embed", init, (1, 1 + g * g, d), jnp.float32)
        tokens = jnp.concatenate(
            [jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, d)), tokens], axis=1
        )
        pos = interpolate_pos_embed(
            pos_embed, (h, w), cfg.interpolate_offset, cfg.interpolate_antialias
        )
        tokens = tokens + pos.astype(self.dtype)
        if cfg.num_register_tokens:
            registers = self.param(
                "register_tokens", init, (1, cfg.num_register_tokens, d), jnp.float32
            )
            registers = jnp.broadcast_to(
                registers.astype(self.dtype), (b, cfg.num_register_tokens, d)
            )
            tokens = jnp.concatenate([tokens[:, :1], registers, tokens[:, 1:]], axis=1)

        attn = None
        for i in range(cfg.depth):
            want = return_attention and i == cfg.depth - 1
            tokens, attn = Block(cfg, self.dtype, name=f"blocks_{i}")(tokens, return_attention=want)
        return final_norm(tokens, cfg.norm_eps, self.dtype, attn, return_attention)
