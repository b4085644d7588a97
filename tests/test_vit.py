"""Tests for the DINO ViT backbone against an independent NumPy forward pass written here."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from stego_jax.models import vit

TINY8 = vit.ViTConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)  # G = 4
# Stored grid (64 / 16 = 4) differs from every input's grid below, so interpolation always runs.
TINY16 = vit.ViTConfig(patch_size=16, embed_dim=48, depth=2, num_heads=3, img_size=64)


# ----------------------------------------------------------------------------------------------
# NumPy reference (float64), following the torch DINO code step by step


def _keys_cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1.0:
        return (a + 2.0) * x**3 - (a + 3.0) * x**2 + 1.0
    if x < 2.0:
        return a * x**3 - 5.0 * a * x**2 + 8.0 * a * x - 4.0 * a
    return 0.0


def _bicubic_loops(grid: np.ndarray, scale_hw: tuple[float, float]) -> np.ndarray:
    """torch bicubic (scale_factor given, align_corners=False) on [G, G, D], one pixel at a time."""
    g_h, g_w, _ = grid.shape
    out_h, out_w = int(g_h * scale_hw[0]), int(g_w * scale_hw[1])
    out = np.zeros((out_h, out_w, grid.shape[2]))
    for i in range(out_h):
        sy = (i + 0.5) / scale_hw[0] - 0.5
        fy = math.floor(sy)
        for j in range(out_w):
            sx = (j + 0.5) / scale_hw[1] - 0.5
            fx = math.floor(sx)
            acc = np.zeros(grid.shape[2])
            for m in range(fy - 1, fy + 3):
                for n in range(fx - 1, fx + 3):
                    wgt = _keys_cubic(sy - m) * _keys_cubic(sx - n)
                    acc += wgt * grid[min(max(m, 0), g_h - 1), min(max(n, 0), g_w - 1)]
            out[i, j] = acc
    return out


def _pos_embed_ref(pos: np.ndarray, h: int, w: int, image_hw: tuple[int, int]) -> np.ndarray:
    n = pos.shape[1] - 1
    if n == h * w and image_hw[0] == image_hw[1]:
        return pos
    g = int(round(math.sqrt(n)))
    grid = pos[0, 1:].reshape(g, g, -1)
    res = _bicubic_loops(grid, ((h + 0.1) / g, (w + 0.1) / g))
    assert res.shape[:2] == (h, w)
    return np.concatenate([pos[:, :1], res.reshape(1, h * w, -1)], axis=1)


def _layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _linear(x, p):
    return x @ p["kernel"] + p["bias"]


def _numpy_vit(params, x: np.ndarray, cfg: vit.ViTConfig):
    """Returns (tokens [B, 1+hw, D], last-block attention [B, heads, 1+hw, 1+hw])."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    b, hh, ww, _ = x.shape
    p, d, nh = cfg.patch_size, cfg.embed_dim, cfg.num_heads
    h, w = hh // p, ww // p
    # Patch embedding as an explicit matmul over non-overlapping patches (torch's stride-p conv).
    patches = x[:, : h * p, : w * p].reshape(b, h, p, w, p, 3).transpose(0, 1, 3, 2, 4, 5)
    pe = params["patch_embed"]
    tok = patches.reshape(b, h * w, p * p * 3) @ pe["kernel"].reshape(p * p * 3, d) + pe["bias"]
    cls = np.broadcast_to(params["cls_token"], (b, 1, d))
    tok = np.concatenate([cls, tok], axis=1) + _pos_embed_ref(params["pos_embed"], h, w, (hh, ww))
    n = tok.shape[1]
    attn = None
    for i in range(cfg.depth):
        blk = params[f"blocks_{i}"]
        y = _layer_norm(tok, blk["norm1"], cfg.norm_eps)
        qkv = _linear(y, blk["attn"]["qkv"]).reshape(b, n, 3, nh, d // nh).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, hd]
        logits = q @ k.transpose(0, 1, 3, 2) * (d // nh) ** -0.5
        e = np.exp(logits - logits.max(-1, keepdims=True))
        attn = e / e.sum(-1, keepdims=True)
        y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        tok = tok + _linear(y, blk["attn"]["proj"])
        y = _linear(_layer_norm(tok, blk["norm2"], cfg.norm_eps), blk["mlp"]["fc1"])
        y = 0.5 * y * (1.0 + erf(y / math.sqrt(2.0)))
        tok = tok + _linear(y, blk["mlp"]["fc2"])
    return _layer_norm(tok, params["norm"], cfg.norm_eps), attn


# ----------------------------------------------------------------------------------------------
# Helpers


def _random_params(cfg: vit.ViTConfig, seed: int):
    """Model-shaped parameters with O(1) activations and non-trivial biases/norm scales."""
    model = vit.VisionTransformer(cfg)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, cfg.img_size, cfg.img_size, 3))
    )["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            fan_in = int(np.prod(leaf.shape[:-1]))
            a = rng.normal(0.0, 1.0 / math.sqrt(fan_in), leaf.shape)
        elif name.endswith("['scale']"):
            a = 1.0 + 0.2 * rng.normal(size=leaf.shape)
        else:  # biases, cls_token, pos_embed
            a = 0.3 * rng.normal(size=leaf.shape)
        return jnp.asarray(a, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _apply(cfg, params, x, return_attention, dtype=jnp.float32):
    model = vit.VisionTransformer(cfg, dtype=dtype)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, return_attention=return_attention))
    return fn(params, jnp.asarray(x))


@pytest.fixture(scope="module")
def params8():
    return _random_params(TINY8, 1)


@pytest.fixture(scope="module")
def params16():
    return _random_params(TINY16, 2)


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize(
    "g, h, w",
    [(4, 5, 3), (4, 3, 2), (4, 4, 6), (3, 7, 1), (5, 2, 2), (14, 20, 17)],
)
def test_interpolate_pos_embed_matches_loop_reference(g, h, w):
    rng = np.random.default_rng(g * 100 + h * 10 + w)
    pos = rng.normal(size=(1, 1 + g * g, 5)).astype(np.float32)
    got = vit.interpolate_pos_embed(jnp.asarray(pos), (h, w), (h * 8, w * 8))
    want = _pos_embed_ref(pos.astype(np.float64), h, w, (h * 8, w * 8))
    assert got.shape == (1, 1 + h * w, 5)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=0)


def test_bicubic_matrix_closed_forms():
    m = vit.torch_bicubic_matrix(10, 1.7)
    assert m.shape == (17, 10)  # floor(10 * 1.7)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)  # partition of unity, border included
    # Scale 1/2: source points 2i + 0.5 sit halfway between pixels, where the A = -0.75 cubic
    # gives weights (-3/32, 19/32, 19/32, -3/32); rows 0 and 3 clamp a tap onto the border pixel.
    half = vit.torch_bicubic_matrix(8, 0.5)
    want = np.zeros((4, 8))
    for i in range(4):
        for tap, wgt in zip(range(2 * i - 1, 2 * i + 3), (-3 / 32, 19 / 32, 19 / 32, -3 / 32)):
            want[i, min(max(tap, 0), 7)] += wgt
    np.testing.assert_allclose(half, want, atol=1e-12)
    # Scale 1/3: source points 3i + 1 are pixel centres, and the cubic interpolates exactly.
    np.testing.assert_allclose(vit.torch_bicubic_matrix(9, 1 / 3), np.eye(9)[[1, 4, 7]], atol=1e-9)


def test_fast_path_returns_stored_embedding_only_for_square_pixels():
    pos = jnp.asarray(np.random.default_rng(0).normal(size=(1, 17, 3)), jnp.float32)
    assert vit.interpolate_pos_embed(pos, (4, 4), (32, 32)) is pos
    # Same 4x4 grid but a non-square image (32x34 pixels at p=8): the official code still
    # resamples, with scale 4.1/4, which is not the identity.
    other = vit.interpolate_pos_embed(pos, (4, 4), (32, 34))
    assert np.abs(np.asarray(other) - np.asarray(pos)).max() > 1e-3
    want = _pos_embed_ref(np.asarray(pos, np.float64), 4, 4, (32, 34))
    np.testing.assert_allclose(np.asarray(other), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "which, hw",
    [
        ("p8", (32, 32)),  # stored grid, no interpolation
        ("p8", (40, 24)),  # non-square, 5x3 grid
        ("p8", (35, 27)),  # trailing pixels dropped -> 4x3 grid
        ("p16", (48, 80)),  # 3x5 grid from a stored 4x4 grid
    ],
)
def test_forward_and_attention_match_numpy(which, hw, params8, params16):
    cfg, params = (TINY8, params8) if which == "p8" else (TINY16, params16)
    x = np.random.default_rng(sum(hw)).normal(size=(2, *hw, 3)).astype(np.float32)
    tokens, attn = _apply(cfg, params, x, return_attention=True)
    ref_tokens, ref_attn = _numpy_vit(params, x.astype(np.float64), cfg)
    h, w = vit.grid_size(hw, cfg.patch_size)
    assert tokens.dtype == jnp.float32 and attn.dtype == jnp.float32
    assert tokens.shape == (2, 1 + h * w, cfg.embed_dim)
    assert attn.shape == (2, cfg.num_heads, 1 + h * w, 1 + h * w)
    np.testing.assert_allclose(np.asarray(tokens), ref_tokens, atol=3e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(attn), ref_attn, atol=1e-5, rtol=0)


def test_fused_attention_path_matches_numpy(params16):
    # Without return_attention every block, including the last, takes jax.nn.dot_product_attention
    # (9 tokens: below the CPU threshold of the explicit path).
    x = np.random.default_rng(7).normal(size=(1, 48, 48, 3)).astype(np.float32)
    tokens = _apply(TINY16, params16, x, return_attention=False)
    ref_tokens, _ = _numpy_vit(params16, x.astype(np.float64), TINY16)
    np.testing.assert_allclose(np.asarray(tokens), ref_tokens, atol=3e-5, rtol=0)
    fmap = vit.patch_tokens_to_map(tokens, (3, 3))
    assert fmap.shape == (1, 3, 3, 48)
    np.testing.assert_array_equal(np.asarray(fmap[0, 1, 2]), np.asarray(tokens[0, 1 + 1 * 3 + 2]))


def test_cpu_per_image_attention_equals_batched_and_fused_paths(params16):
    # On CPU `attend` maps over the batch one image at a time; it must give what the whole batch
    # at once gives (the path of other backends when the weights are wanted) and what
    # dot_product_attention gives (their path otherwise), weights included.
    assert jax.default_backend() == "cpu"
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 37, 4, 16)), jnp.float32) for _ in range(3))
    scale = 16**-0.5
    out, attn = jax.jit(lambda q, k, v: vit.attend(q, k, v, scale, True))(q, k, v)
    only = jax.jit(lambda q, k, v: vit.attend(q, k, v, scale, False))(q, k, v)
    assert only[1] is None
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: vit.attend(q, k, v, scale, False))(q, k, v))
    assert "scan" in jaxpr or "while" in jaxpr  # one image at a time
    batched_out, batched_attn = jax.jit(lambda q, k, v: vit._explicit(q, k, v, scale))(q, k, v)
    fused = jax.nn.dot_product_attention(q, k, v, scale=scale)
    np.testing.assert_allclose(np.asarray(out), np.asarray(batched_out), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(attn), np.asarray(batched_attn), atol=1e-7, rtol=0)
    np.testing.assert_allclose(np.asarray(only[0]), np.asarray(out), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(fused), atol=1e-6, rtol=0)
    # the weights in closed form: softmax over keys of the scaled dot products, NumPy float64
    logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) * scale
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(attn), ref, atol=1e-6, rtol=0)
    # and a whole model on a batch of several images against the NumPy ViT
    x = rng.normal(size=(2, 48, 48, 3)).astype(np.float32)
    tokens = np.asarray(_apply(TINY16, params16, x, return_attention=False))
    np.testing.assert_allclose(tokens, _numpy_vit(params16, x.astype(np.float64), TINY16)[0], atol=3e-5, rtol=0)


def test_bfloat16_compute_keeps_float32_params_and_stays_close(params8):
    x = np.random.default_rng(3).normal(size=(2, 40, 24, 3)).astype(np.float32)
    ref = np.asarray(_apply(TINY8, params8, x, return_attention=False))
    model = vit.VisionTransformer(TINY8, dtype=jnp.bfloat16)
    fresh = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(fresh))
    got = np.asarray(_apply(TINY8, params8, x, return_attention=False, dtype=jnp.bfloat16))
    assert got.dtype == np.float32
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    # Non-zero: the compute really ran in bf16; small: it is the same function.
    assert 1e-4 < rel < 5e-2, rel


def test_param_tree_names_and_shapes():
    cfg = vit.ViTConfig(patch_size=4, embed_dim=12, depth=3, num_heads=3, img_size=20)
    shapes = jax.eval_shape(
        vit.VisionTransformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8, 12, 3))
    )["params"]
    assert set(shapes) == {"patch_embed", "cls_token", "pos_embed", "norm"} | {
        f"blocks_{i}" for i in range(3)
    }
    assert shapes["patch_embed"]["kernel"].shape == (4, 4, 3, 12)
    assert shapes["pos_embed"].shape == (1, 1 + 25, 12)  # from img_size, not the input size
    assert shapes["cls_token"].shape == (1, 1, 12)
    blk = jax.tree.map(lambda s: s.shape, shapes["blocks_2"])
    assert blk == {
        "norm1": {"scale": (12,), "bias": (12,)},
        "attn": {
            "qkv": {"kernel": (12, 36), "bias": (36,)},
            "proj": {"kernel": (12, 12), "bias": (12,)},
        },
        "norm2": {"scale": (12,), "bias": (12,)},
        "mlp": {
            "fc1": {"kernel": (12, 48), "bias": (48,)},
            "fc2": {"kernel": (48, 12), "bias": (12,)},
        },
    }


def test_variants_and_helpers():
    s8 = vit.vit_config("vits8")
    assert (s8.patch_size, s8.embed_dim, s8.depth, s8.num_heads) == (8, 384, 12, 6)
    b16 = vit.vit_config("vitb16")
    assert (b16.patch_size, b16.embed_dim, b16.depth, b16.num_heads) == (16, 768, 12, 12)
    assert vit.vit_config("vitt16").embed_dim == 192
    assert s8.pos_grid == 28 and b16.pos_grid == 14
    with pytest.raises(ValueError, match="vitb8"):
        vit.vit_config("vit_small")
    assert vit.grid_size((320, 321), 8) == (40, 40)
    assert vit.grid_size((224, 100), 16) == (14, 6)
    with pytest.raises(ValueError):
        vit.patch_tokens_to_map(jnp.zeros((1, 10, 4)), (3, 4))
