"""DINOv2 backbone: fidelity against fixtures written by the official facebookresearch/dinov2 code
(tests/fixtures/make_dinov2_fixtures.py), the key layouts, architecture checks, the registry and
the hub configurations (bf16, the featurizer and the STEGO pipeline on it: test_backbones_pipeline.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stego_jax.weights as weights
from stego_jax.models import build_backbone, dinov2
from stego_jax.weights import DINOV2_REGISTRY, convert_dinov2, flatten_params, load_backbone
from stego_jax.weights.torch_pickle import load_torch_checkpoint

from .fixtures.fixture_inputs import fixed_input

FIX = Path(__file__).resolve().parent / "fixtures"

_S37 = [(518, 518), (224, 224), (518, 252), (602, 196), (98, 154)]
_S5 = [(70, 70), (42, 98), (84, 56), (28, 28)]
# Fixture name: (seed of its inputs, input sizes, batch), as make_dinov2_fixtures.MODELS.
MODELS = {"mlp": (0, _S37, 1), "mlp_reg": (1, _S37, 1), "swiglu": (2, _S5, 2), "swiglu_reg": (3, _S5, 2)}
TOL = 5e-5  # max abs error against the official float32 forward


@pytest.fixture(scope="module")
def loaded():
    return {name: load_backbone(FIX / f"dinov2_{name}.pth", num_heads=2) for name in MODELS}


def _apply(cfg, params, x, dtype=jnp.float32, return_attention=True):
    model = build_backbone(cfg, dtype=dtype)
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, return_attention=return_attention))
    return fn(params, jnp.asarray(x))


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
    with np.load(FIX / f"dinov2_{name}_ref.npz") as z:
        ref_tokens, rows, ref_attn = (z[f"{h}x{w}/{k}"] for k in ("tokens", "attn_rows", "attn"))
    tokens, attn = _apply(cfg, params, fixed_input(batch, h, w, seed))
    n = cfg.num_prefix_tokens + (h // 14) * (w // 14)
    assert tokens.shape == (batch, n, cfg.embed_dim) and attn.shape == (batch, 2, n, n)
    assert np.abs(np.asarray(tokens) - ref_tokens).max() <= TOL
    assert np.abs(np.asarray(attn)[:, :, rows] - ref_attn).max() <= TOL


def test_inferred_configs_are_the_hub_settings(loaded):
    mlp, reg, glu, glu_reg = (loaded[n][0] for n in MODELS)
    assert (mlp.ffn, mlp.num_register_tokens, mlp.interpolate_offset, mlp.interpolate_antialias) == (
        "mlp", 0, 0.1, False)
    assert (reg.num_register_tokens, reg.interpolate_offset, reg.interpolate_antialias) == (4, 0.0, True)
    assert mlp.pos_grid == 37 and mlp.img_size == 518 and mlp.layer_scale and mlp.norm_eps == 1e-6
    assert (glu.ffn, glu.mlp_dim, glu.pos_grid) == ("swiglu", 48, 5)  # (int(64 * 2/3) + 7) // 8 * 8
    assert glu_reg.num_register_tokens == 4 and glu_reg.interpolate_antialias
    # mask_token is in the official files but unused at inference: not a parameter.
    assert "mask_token" in load_torch_checkpoint(FIX / "dinov2_mlp.pth")
    assert "mask_token" not in loaded["mlp"][1]
    assert set(loaded["mlp_reg"][1]["blocks_0"]) == {"norm1", "attn", "ls1", "norm2", "mlp", "ls2"}


def test_native_grid_uses_the_stored_embedding_unchanged():
    pos = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1 + 37 * 37, 4)), jnp.float32)
    for offset, aa in ((0.1, False), (0.0, True)):
        assert dinov2.interpolate_pos_embed(pos, (37, 37), offset, aa) is pos
    # torch's antialiased kernel copies an axis whose size does not change.
    np.testing.assert_array_equal(dinov2.bicubic_matrix(37, 37, 0.1, True), np.eye(37))
    for out in (16, 43, 5):
        for offset, aa in ((0.1, False), (0.0, True), (0.0, False)):
            m = dinov2.bicubic_matrix(37, out, offset, aa)
            assert m.shape == (out, 37)
            np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Key layouts


def _official(name: str) -> dict[str, np.ndarray]:
    return dict(load_torch_checkpoint(FIX / f"dinov2_{name}.pth"))


def _assert_same(a, b):
    fa, fb = flatten_params(a), flatten_params(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_huggingface_safetensors_layout(loaded):
    cfg, params = load_backbone(FIX / "dinov2_swiglu_reg_hf.safetensors", num_heads=2)
    assert cfg == loaded["swiglu_reg"][0]
    _assert_same(params, loaded["swiglu_reg"][1])


@pytest.mark.parametrize("name", ["mlp_reg", "swiglu", "swiglu_reg"])
def test_timm_layout(loaded, name, tmp_path):
    # timm's _convert_dinov2: mask_token dropped; registers -> reg_token with the CLS position row
    # folded into cls_token; SwiGLU w12/w3 -> fc1/fc2.
    sd = _official(name)
    sd.pop("mask_token")
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    sd = {k.replace("mlp.w12", "mlp.fc1").replace("mlp.w3", "mlp.fc2"): v for k, v in sd.items()}
    np.savez(tmp_path / "timm.npz", **sd)
    cfg, params = load_backbone(tmp_path / "timm.npz", num_heads=2)
    assert cfg == loaded[name][0]
    seed, sizes, batch = MODELS[name]
    x = fixed_input(batch, *sizes[1], seed)
    got = _apply(cfg, params, x, return_attention=False)
    want = _apply(*loaded[name], x, return_attention=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


def test_flax_export_chunked_blocks_and_training_wrappers(loaded, tmp_path):
    cfg, params = loaded["mlp_reg"]
    np.savez(tmp_path / "flax.npz", **flatten_params(params))
    cfg2, params2 = load_backbone(tmp_path / "flax.npz", num_heads=2)
    assert cfg2 == cfg
    _assert_same(params2, params)
    # Official block_chunks > 0 ('blocks.<chunk>.<i>.') under a training wrapper with heads.
    sd = {
        ("backbone." + k.replace("blocks.", "blocks.0.", 1)): v for k, v in _official("mlp_reg").items()
    }
    sd["dino_head.mlp.0.weight"] = np.zeros((3, 8), np.float32)
    np.savez(tmp_path / "chunked.npz", **sd)
    _assert_same(load_backbone(tmp_path / "chunked.npz", num_heads=2)[1], params)


# ----------------------------------------------------------------------------------------------
# Architecture checks


def test_wrong_tensor_is_named():
    sd = _official("swiglu_reg")
    sd["blocks.1.ls2.gamma"] = sd["blocks.1.ls2.gamma"][:-1]
    with pytest.raises(ValueError, match=r"tensor 'blocks\.1\.ls2\.gamma' has shape \[15\], expected \[16\]"):
        convert_dinov2.convert_state_dict(sd, "x.pth", num_heads=2)
    sd = _official("mlp")
    del sd["blocks.0.attn.proj.bias"]
    with pytest.raises(ValueError, match=r"tensor 'blocks\.0\.attn\.proj\.bias' is missing"):
        convert_dinov2.convert_state_dict(sd, "x.pth", num_heads=2)
    sd = _official("mlp")
    sd["blocks.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"unexpected tensor 'blocks\.0\.extra\.weight'"):
        convert_dinov2.convert_state_dict(sd, "x.pth", num_heads=2)
    # Against a claimed architecture (a registry entry): registers the file lacks.
    claimed = dataclasses.replace(
        dinov2.dinov2_config("dinov2_vits14_reg"), embed_dim=8, depth=2, num_heads=2
    )
    with pytest.raises(ValueError, match=r"tensor 'register_tokens' is missing"):
        convert_dinov2.convert_state_dict(_official("mlp"), "x.pth", claimed=claimed)


@pytest.mark.filterwarnings("ignore:.*no published SHA-256")
def test_registry_entry_checks_the_file(monkeypatch, tmp_path):
    # The registry path with the download replaced by the fixture file.
    monkeypatch.setattr(weights, "fetch", lambda url, dest, **kw: FIX / "dinov2_mlp_reg.pth")
    with pytest.raises(ValueError, match=r"tensor 'cls_token' has shape \[1, 1, 8\].*"
                                         r"not the dinov2_vits14_reg checkpoint"):
        load_backbone("dinov2_vits14_reg", cache_dir=tmp_path, progress=False)
    tiny = dataclasses.replace(DINOV2_REGISTRY["dinov2_vits14_reg"], embed_dim=8, depth=2, num_heads=2)
    monkeypatch.setitem(DINOV2_REGISTRY, "dinov2_vits14_reg", tiny)
    cfg, _ = load_backbone("dinov2_vits14_reg", cache_dir=tmp_path, progress=False)
    assert (cfg.num_register_tokens, cfg.interpolate_antialias, cfg.interpolate_offset) == (4, True, 0.0)
    # The claimed settings can be overridden by name; a wrong field is named.
    cfg, _ = load_backbone("dinov2_vits14_reg", cache_dir=tmp_path, progress=False,
                           interpolate_antialias=False)
    assert not cfg.interpolate_antialias
    with pytest.raises(ValueError, match=r"unknown backbone override\(s\) \['antialias'\]"):
        load_backbone("dinov2_vits14_reg", cache_dir=tmp_path, progress=False, antialias=True)


def test_registry_urls_and_hub_configs(monkeypatch):
    monkeypatch.delenv("STEGO_JAX_WEIGHTS_URL", raising=False)
    base = "https://dl.fbaipublicfiles.com/dinov2/"
    urls = {n: s.url(weights.resolve_base_url(None, s)) for n, s in DINOV2_REGISTRY.items()}
    assert urls == {
        f"dinov2_vit{a}14{r}": f"{base}dinov2_vit{a}14/dinov2_vit{a}14{'_reg4' if r else ''}_pretrain.pth"
        for a in "sblg" for r in ("", "_reg")
    }
    assert all(s.sha256 is None for s in DINOV2_REGISTRY.values())  # none published
    for name, spec in DINOV2_REGISTRY.items():
        cfg = dinov2.dinov2_config(name)
        assert (cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (
            spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads)
        assert cfg.num_register_tokens == spec.num_register_tokens == (4 if name.endswith("_reg") else 0)
        assert cfg.interpolate_antialias == name.endswith("_reg")
        assert cfg.interpolate_offset == (0.0 if name.endswith("_reg") else 0.1)
        assert cfg.pos_grid == 37 and cfg.layer_scale
        assert cfg.ffn == ("swiglu" if "vitg" in name else "mlp")
    assert dinov2.dinov2_config("dinov2_vitg14").mlp_dim == 4096
    assert dinov2.dinov2_config("dinov2_vitl14").mlp_dim == 4096


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov2_vitg14"])
def test_module_params_match_the_official_keys_of_hub_models(name):
    # The Flax module's parameter tree, mapped to official names, is exactly the hub state dict's
    # keys and shapes (less mask_token) that the converter checks.
    cfg = dinov2.dinov2_config(name)
    shapes = jax.eval_shape(
        build_backbone(cfg).init, jax.random.key(0), jnp.zeros((1, 28, 28, 3))
    )["params"]
    flat = {
        "/".join(p.key for p in path): np.broadcast_to(np.float32(0), leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }
    official, layout = convert_dinov2.to_official_layout(flat, "module")
    assert layout == "flax"
    expected = convert_dinov2.expected_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in official.items()} == expected
    convert_dinov2.check_shapes(official, cfg, "module")


# ----------------------------------------------------------------------------------------------
# STEGO on a DINOv2 backbone


def test_config_file():
    from stego_jax.config import load_config_file, validate

    path = Path(__file__).resolve().parents[1] / "configs" / "cocostuff27_dinov2_vitb14.py"
    c = load_config_file(str(path))
    validate(c)
    assert (c.model.backbone, c.model.patch_size, c.data.res % 14, c.eval.res % 14) == (
        "dinov2_vitb14", 14, 0, 0)
    assert load_config_file(str(path), "reg").model.backbone == "dinov2_vitb14_reg"
