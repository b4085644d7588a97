"""STEGO head and probes against NumPy formulas; dropout-mask structure; PyTorch-default init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stego_jax.models.head import ClusterProbe, LinearProbe, SegmentationHead, cluster_probs


def _init(module, x, **kw):
    # jit: one compilation is much cheaper on CPU than eager op-by-op dispatch.
    init = jax.jit(functools.partial(module.init, **kw))
    return init(jax.random.key(0), jnp.asarray(x))["params"]


def _apply(module, params, x, **kw):
    return jax.jit(functools.partial(module.apply, **kw))({"params": params}, jnp.asarray(x))


def _np(p):
    return {k: np.asarray(v) for k, v in p.items()}


def _feats(seed=0, shape=(2, 3, 4, 16)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _np_code(f, params, projection="nonlinear"):
    lin = _np(params["linear"])
    code = f @ lin["kernel"] + lin["bias"]
    if projection == "nonlinear":
        n0, n1 = _np(params["nonlinear_0"]), _np(params["nonlinear_1"])
        code = code + np.maximum(f @ n0["kernel"] + n0["bias"], 0) @ n1["kernel"] + n1["bias"]
    return code


@pytest.mark.parametrize("projection", ["nonlinear", "linear"])
def test_head_eval_equals_numpy_formula(projection):
    f = _feats()
    head = SegmentationHead(dim=5, projection=projection)
    params = _init(head, f, train=False)
    expected = {"linear"} | ({"nonlinear_0", "nonlinear_1"} if projection == "nonlinear" else set())
    assert set(params) == expected
    feats_out, code = _apply(head, params, f, train=False)
    assert code.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(np.asarray(feats_out), f)
    np.testing.assert_allclose(np.asarray(code), _np_code(f, params, projection), atol=1e-5)


def _channel_mask(dropped, f, rate):
    """Per (image, channel) keep mask; asserts whole channels are zeroed or scaled by 1/(1-rate)."""
    keep = np.all(np.isclose(dropped, f / (1 - rate), atol=1e-6), axis=(1, 2))
    zero = np.all(dropped == 0, axis=(1, 2))
    assert np.all(keep ^ zero), "dropout is not channel-wise"
    return keep


def test_head_train_three_independent_channel_masks():
    f = _feats(1, (2, 3, 3, 64)) + 3.0  # no exact zeros, so zero <=> dropped
    head = SegmentationHead(dim=4)
    params = _init(head, f, train=False)
    rngs = {"dropout": jax.random.key(3)}
    (feats_out, code), state = _apply(head, params, f, train=True, rngs=rngs,
                                      capture_intermediates=True)
    inter = state["intermediates"]
    d_lin = np.asarray(inter["dropout_linear"]["__call__"][0])
    d_nl = np.asarray(inter["dropout_nonlinear"]["__call__"][0])
    d_feats = np.asarray(inter["dropout_feats"]["__call__"][0])
    np.testing.assert_array_equal(d_feats, np.asarray(feats_out))
    masks = [_channel_mask(d, f, 0.1) for d in (d_lin, d_nl, np.asarray(feats_out))]
    for m in masks:
        assert 0 < m.sum() < m.size  # some channels dropped, most kept
    assert not np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[0], masks[2])
    assert not np.array_equal(masks[1], masks[2])
    # code = linear(drop_a f) + nonlinear(drop_b f)
    lin = _np(params["linear"])
    n0, n1 = _np(params["nonlinear_0"]), _np(params["nonlinear_1"])
    ref = (d_lin @ lin["kernel"] + lin["bias"]
           + np.maximum(d_nl @ n0["kernel"] + n0["bias"], 0) @ n1["kernel"] + n1["bias"])
    np.testing.assert_allclose(np.asarray(code), ref, atol=1e-4)
    # feature_dropout=False (official cfg.dropout off): features pass through, code unchanged
    head_keep = SegmentationHead(dim=4, feature_dropout=False)
    feats_keep, code_keep = _apply(head_keep, params, f, train=True, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(feats_keep), f)
    np.testing.assert_allclose(np.asarray(code_keep), np.asarray(code), atol=1e-6)


def test_head_rejects_unknown_projection():
    with pytest.raises(ValueError, match="projection"):
        SegmentationHead(projection="mlp").init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)),
                                                train=False)


def test_head_param_count_and_torch_default_init():
    head = SegmentationHead(dim=70)
    x = jnp.zeros((1, 2, 2, 384))
    shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), x, train=False))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == 201_740
    params = _init(head, np.zeros((1, 1, 1, 384), np.float32), train=False)
    bound = 1 / np.sqrt(384)  # fan_in = C for every layer, biases included (PyTorch default)
    for name in ("linear", "nonlinear_0", "nonlinear_1"):
        for leaf in ("kernel", "bias"):
            v = np.asarray(params[name][leaf])
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound, (name, leaf)
    k = np.asarray(params["nonlinear_0"]["kernel"])
    assert k.shape == (384, 384)
    np.testing.assert_allclose(k.std(), bound / np.sqrt(3), rtol=0.02)  # uniform, not normal


def test_cluster_probe_cosine_matches_numpy():
    code = _feats(4, (2, 3, 3, 6))
    code[0, 0, 0] = 0.0  # zero code -> zero cosines (eps), not NaN
    probe = ClusterProbe(n_clusters=5)
    params = _init(probe, code)
    cl = np.asarray(params["clusters"])
    assert cl.shape == (5, 6)
    cos = np.asarray(_apply(probe, params, code))
    ref = np.zeros((2, 3, 3, 5))
    for idx in np.ndindex(2, 3, 3):
        v = code[idx]
        for k in range(5):
            ref[idx + (k,)] = v @ cl[k] / (max(np.linalg.norm(v), 1e-12) * np.linalg.norm(cl[k]))
    np.testing.assert_allclose(cos, ref, atol=1e-6)
    big = np.asarray(_init(ClusterProbe(27), np.zeros((1, 70), np.float32))["clusters"])
    assert abs(big.std() - 1) < 0.1 and abs(big.mean()) < 0.1  # randn init


def test_cluster_probs_is_softmax_of_scaled_cos():
    cos = np.random.default_rng(5).uniform(-1, 1, size=(3, 4)).astype(np.float32)
    e = np.exp(2.0 * cos)
    got = np.asarray(cluster_probs(jnp.asarray(cos)))
    np.testing.assert_allclose(got, e / e.sum(-1, keepdims=True), rtol=1e-5)


def test_linear_probe_shape_and_affine():
    code = _feats(6, (2, 3, 3, 7))
    probe = LinearProbe(n_classes=27)
    params = _init(probe, code)
    logits = np.asarray(_apply(probe, params, code))
    assert logits.shape == (2, 3, 3, 27)
    d = _np(params["dense"])
    np.testing.assert_allclose(logits, code @ d["kernel"] + d["bias"], atol=1e-5)
    assert np.abs(d["kernel"]).max() <= 1 / np.sqrt(7)
