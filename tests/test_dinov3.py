"""DINOv3 backbone: fidelity against fixtures written by the official facebookresearch/dinov3 code
(tests/fixtures/make_dinov3_fixtures.py), RoPE, architecture checks, the local-only registry,
the hub configurations (bf16, the featurizer and the STEGO pipeline on it: test_backbones_pipeline.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stego_jax.models import build_backbone, dinov3, num_prefix_tokens
from stego_jax.weights import DINOV3_REGISTRY, convert_dinov3, dinov3_dir, load_backbone
from stego_jax.weights.torch_pickle import load_torch_checkpoint

from .fixtures.fixture_inputs import fixed_input

FIX = Path(__file__).resolve().parent / "fixtures"

# Fixture name: (seed of its inputs, input sizes, batch), as make_dinov3_fixtures.MODELS.
MODELS = {
    "mlp": (0, [(64, 64), (48, 112), (96, 32), (16, 16), (70, 50)], 1),
    "swiglu": (1, [(64, 64), (32, 80), (112, 48)], 2),
}
TOL = 5e-5  # max abs error against the official float32 forward


@pytest.fixture(scope="module")
def loaded():
    return {name: load_backbone(FIX / f"dinov3_{name}.pth") for name in MODELS}


def _apply(cfg, params, x, dtype=jnp.float32, return_attention=True):
    model = build_backbone(cfg, dtype=dtype)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, return_attention=return_attention))
    return fn(params, jnp.asarray(x))


def _official(name: str) -> dict[str, np.ndarray]:
    return dict(load_torch_checkpoint(FIX / f"dinov3_{name}.pth"))


# ----------------------------------------------------------------------------------------------
# Fidelity against the official code


@pytest.mark.parametrize(
    "name, size",
    [(n, s) for n, (_, sizes, _) in MODELS.items() for s in sizes],
    ids=lambda v: v if isinstance(v, str) else f"{v[0]}x{v[1]}",
)
def test_tokens_and_attention_match_official(loaded, name, size):
    seed, _, batch = MODELS[name]
    cfg, params = loaded[name]
    h, w = size
    with np.load(FIX / f"dinov3_{name}_ref.npz") as z:
        ref_tokens, rows, ref_attn = (z[f"{h}x{w}/{k}"] for k in ("tokens", "attn_rows", "attn"))
    tokens, attn = _apply(cfg, params, fixed_input(batch, h, w, seed))
    n = 5 + (h // 16) * (w // 16)
    assert tokens.shape == (batch, n, cfg.embed_dim) and attn.shape == (batch, 2, n, n)
    assert np.abs(np.asarray(tokens) - ref_tokens).max() <= TOL
    assert np.abs(np.asarray(attn)[:, :, rows] - ref_attn).max() <= TOL
    # Without the attention (the fused attention path): the same tokens.
    alone = _apply(cfg, params, fixed_input(batch, h, w, seed), return_attention=False)
    assert np.abs(np.asarray(alone) - ref_tokens).max() <= TOL


def test_inferred_configs_are_the_hub_settings(loaded):
    mlp, glu = loaded["mlp"][0], loaded["swiglu"][0]
    assert (mlp.ffn, mlp.mlp_dim, mlp.num_heads, mlp.num_storage_tokens) == ("mlp", 128, 2, 4)
    assert (mlp.norm_eps, mlp.layer_scale, mlp.mask_k_bias, mlp.patch_size) == (1e-5, True, True, 16)
    assert (glu.ffn, glu.mlp_dim, glu.num_heads) == ("swiglu", 96, 2)  # int(24 * 6 * 2/3) = 96
    assert num_prefix_tokens(mlp) == mlp.num_prefix_tokens == 5
    sd = _official("mlp")
    # mask_token and bias_mask are in the official files but are not parameters.
    assert "mask_token" in sd and "blocks.0.attn.qkv.bias_mask" in sd
    assert "mask_token" not in loaded["mlp"][1]
    # The "mlp" file keeps the official periods; the "swiglu" file's are perturbed and are used.
    np.testing.assert_allclose(sd["rope_embed.periods"], dinov3.rope_periods(16), rtol=1e-6)
    np.testing.assert_array_equal(
        loaded["swiglu"][1]["rope_embed"]["periods"], _official("swiglu")["rope_embed.periods"]
    )


def test_masked_key_bias_and_rope_semantics(loaded):
    cfg, params = loaded["mlp"]
    x = fixed_input(1, 48, 112, 0)
    ref = np.asarray(_apply(cfg, params, x, return_attention=False))
    # The key third of the qkv bias has no effect (masked); the query third has.
    d = cfg.embed_dim
    for lo, changes in ((d, False), (0, True)):
        p = jax.tree.map(np.array, params)
        p["blocks_1"]["attn"]["qkv"]["bias"][lo : lo + d] += 3.0
        out = np.asarray(_apply(cfg, p, x, return_attention=False))
        assert (np.abs(out - ref).max() > 1e-3) == changes
    # RoPE angles: per-axis normalised centres, rows' periods then columns', tiled twice.
    periods = jnp.asarray([1.0, 10.0], jnp.float32)
    sin, cos = dinov3.rope_sincos(periods, (2, 4))
    ch, cw = -0.5, 0.75  # patch (0, 3): 2 * (0.5 / 2) - 1, 2 * (3.5 / 4) - 1
    angles = 2 * np.pi * np.asarray([ch, ch / 10, cw, cw / 10] * 2)
    np.testing.assert_allclose(np.asarray(sin)[3], np.sin(angles), atol=1e-6)
    np.testing.assert_allclose(np.asarray(cos)[3], np.cos(angles), atol=1e-6)


def test_wrong_tensor_is_named():
    sd = _official("mlp")
    sd["blocks.1.ls2.gamma"] = sd["blocks.1.ls2.gamma"][:-1]
    with pytest.raises(ValueError, match=r"tensor 'blocks\.1\.ls2\.gamma' has shape \[31\], expected \[32\]"):
        convert_dinov3.convert_state_dict(sd, "x.pth")
    sd = _official("mlp")
    del sd["blocks.0.attn.proj.bias"]
    with pytest.raises(ValueError, match=r"tensor 'blocks\.0\.attn\.proj\.bias' is missing"):
        convert_dinov3.convert_state_dict(sd, "x.pth")
    sd = _official("mlp")
    sd["cls_norm.weight"] = np.ones(32, np.float32)
    with pytest.raises(ValueError, match=r"unexpected tensor 'cls_norm\.weight'"):
        convert_dinov3.convert_state_dict(sd, "x.pth")
    sd = _official("mlp")
    sd["blocks.0.attn.qkv.bias_mask"] = np.ones(96, np.float32)
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv\.bias_mask' is not the official"):
        convert_dinov3.convert_state_dict(sd, "x.pth")
    with pytest.raises(ValueError, match=r"num_heads=4 does not fit tensor 'rope_embed\.periods'"):
        convert_dinov3.convert_state_dict(_official("mlp"), "x.pth", num_heads=4)
    # Training wrappers and the eval-unused local-crop norm are accepted.
    sd = {f"module.backbone.{k}": v for k, v in _official("mlp").items()}
    sd["module.backbone.local_cls_norm.weight"] = np.ones(32, np.float32)
    cfg, _ = convert_dinov3.convert_state_dict(sd, "x.pth")
    assert cfg.embed_dim == 32


def test_registry_is_local_only(monkeypatch, tmp_path):
    monkeypatch.setenv("STEGO_JAX_DINOV3_DIR", str(tmp_path))
    assert dinov3_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=r"dinov3_vitb16_pretrain_lvd1689m-73cec8be\.pth.*"
                                                r"ai\.meta\.com/resources/models-and-libraries/dinov3-downloads"):
        load_backbone("dinov3_vitb16")
    # A file that is not the entry's model fails naming the tensor.
    (tmp_path / "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth").write_bytes(
        (FIX / "dinov3_mlp.pth").read_bytes()
    )
    with pytest.raises(ValueError, match=r"tensor 'cls_token' has shape \[1, 1, 32\].*"
                                         r"not the dinov3_vitb16 checkpoint"):
        load_backbone("dinov3_vitb16")
    # Another hash of the same architecture is found too; the hub config is claimed.
    (tmp_path / "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth").unlink()
    (tmp_path / "dinov3_vits16_pretrain_other-00000000.pth").write_bytes(
        (FIX / "dinov3_mlp.pth").read_bytes()
    )
    tiny = dataclasses.replace(dinov3.dinov3_config("dinov3_vits16"), embed_dim=32, depth=2, num_heads=2)
    monkeypatch.setitem(dinov3.DINOV3_VARIANTS, "dinov3_vits16", tiny)
    cfg, _ = load_backbone("dinov3_vits16")
    assert cfg == tiny


def test_registry_and_hub_configs():
    assert {n: s.path for n, s in DINOV3_REGISTRY.items()} == {
        "dinov3_vits16": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
        "dinov3_vits16plus": "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
        "dinov3_vitb16": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
        "dinov3_vitl16": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
    }
    for name, spec in DINOV3_REGISTRY.items():
        cfg = dinov3.dinov3_config(name)
        assert (cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (
            spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads)
        assert (cfg.num_storage_tokens, cfg.norm_eps, cfg.head_dim) == (4, 1e-5, 64)
    assert dinov3.dinov3_config("dinov3_vits16plus").mlp_dim == 1536  # int(2304 * 2/3)
    assert dinov3.dinov3_config("dinov3_vitl16").mlp_dim == 4096


@pytest.mark.parametrize("name", ["dinov3_vits16plus", "dinov3_vitb16"])
def test_module_params_match_the_official_keys_of_hub_models(name):
    cfg = dinov3.dinov3_config(name)
    shapes = jax.eval_shape(
        build_backbone(cfg).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )["params"]
    flat = {"/".join(p.key for p in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    expected = {
        k: v for k, v in convert_dinov3.expected_shapes(cfg).items() if not k.endswith("bias_mask")
    }
    fake = {k: np.zeros(v, np.float32) for k, v in expected.items()}
    got = jax.tree.map(np.shape, convert_dinov3.dinov3_to_flax(fake, cfg))
    got = {"/".join(p.key for p in path): tuple(leaf) for path, leaf in
           jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: isinstance(x, tuple))[0]}
    assert got == {k: tuple(v) for k, v in flat.items()}


# ----------------------------------------------------------------------------------------------
# STEGO on a DINOv3 backbone


def test_config_file():
    from stego_jax.config import load_config_file, validate

    path = Path(__file__).resolve().parents[1] / "configs" / "cocostuff27_dinov3_vitb16.py"
    c = load_config_file(str(path))
    validate(c)
    assert (c.model.backbone, c.model.patch_size, c.data.res % 16, c.eval.res % 16) == (
        "dinov3_vitb16", 16, 0, 0)
