"""The public array functions compile themselves: called directly (on NumPy arrays, outside any
`jax.jit`) they run one compiled program per shape and options, as fast as under an explicit
`jax.jit`, with the results of the un-jitted (op by op) computation."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from stego_jax import crf, kmeans, losses, metrics, ops

WEIGHTS = losses.LossWeights(
    pos_intra_weight=0.67, pos_inter_weight=0.25, neg_inter_weight=0.63,
    pos_intra_shift=0.18, pos_inter_shift=0.12, neg_inter_shift=0.46,
)


def _cache_size(fn) -> int:
    return fn._cache_size()


def _compiled_once(fn, call):
    """`call()` twice: the second adds no executable to `fn`'s cache; returns the first result."""
    out = jax.block_until_ready(call())
    n = _cache_size(fn)
    again = jax.block_until_ready(call())
    assert _cache_size(fn) == n >= 1
    jax.tree.map(np.testing.assert_array_equal, out, again)
    return out


def _eager(fn, *args, **kwargs):
    """`fn` run op by op: the reference the compiled call must match."""
    with jax.disable_jit():
        return fn(*args, **kwargs)


def _close(got, want, rtol=1e-6, atol=1e-6):
    def one(g, w):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)

    jax.tree.map(one, got, want)


# ---------------------------------------------------------------- CRF


def _smooth_image(h=64, w=96, k=5, seed=0):
    """A photo-like image (smooth colour regions, an edge, mild noise) and logits that follow it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(3 * xx + 1), np.cos(4 * yy), np.sin(2 * (xx + yy))], -1)
    base[:, w // 2 :] += 0.8  # an edge
    img = ndimage.gaussian_filter(base + 0.1 * rng.normal(size=base.shape), (1, 1, 0))
    img = (255 * (img - img.min()) / (img.max() - img.min())).round().astype(np.uint8)
    proto = rng.normal(size=(3, k))
    noise = ndimage.gaussian_filter(rng.normal(size=(h, w, k)), (4, 4, 0))
    logits = (2 * (img / 255.0 - 0.5) @ proto + noise / noise.std()).astype(np.float32)
    return img, logits


def _best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def test_dense_crf_direct_call_as_fast_as_jit_and_identical():
    img, logits = _smooth_image()
    jitted = jax.jit(crf.dense_crf)
    direct_out = np.asarray(crf.dense_crf(img, logits))  # warm-up (compiles)
    jit_out = np.asarray(jitted(img, logits))
    np.testing.assert_array_equal(direct_out, jit_out)
    assert direct_out.shape == (64, 96, 5) and np.all(np.isfinite(direct_out))
    t_direct, t_jit = float("inf"), float("inf")
    for _ in range(4):  # interleaved, so a load change hits both
        t_direct = min(t_direct, _best_time(lambda: crf.dense_crf(img, logits), 3))
        t_jit = min(t_jit, _best_time(lambda: jitted(img, logits), 3))
    assert t_direct < 1.3 * t_jit, (t_direct, t_jit)


def test_dense_crf_compiled_once_per_shape_and_options():
    img, logits = _smooth_image(24, 32, 3, seed=1)
    fn = crf._dense_crf_jit
    out = _compiled_once(fn, lambda: crf.dense_crf(img, logits, iterations=3, splits=[1, 2]))
    n = _cache_size(fn)
    # equal options spelt differently (int vs float, list vs tuple) share the program
    again = crf.dense_crf(img, logits, iterations=3.0, splits=(1, 2), pos_w=3)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))
    assert _cache_size(fn) == n
    crf.dense_crf(img, logits, iterations=4, splits=(1, 2))  # new options: one more program
    assert _cache_size(fn) == n + 1
    # the compiled call equals the same computation run op by op (up to float rounding)
    _close(out, _eager(crf.dense_crf, img, logits, iterations=3, splits=(1, 2)), atol=1e-5)


def test_dense_crf_capacity_retry_and_traced_use_still_work():
    # 96x96 > 8192 pixels: the 1.5·N capacity is tried and the overflow-free one redone when
    # exceeded; noise images overflow, and the result must equal the explicit safe capacity.
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    logits = rng.normal(size=(96, 96, 2)).astype(np.float32)
    got = crf.dense_crf(img, logits, iterations=2)
    safe = crf.dense_crf(img, logits, iterations=2, capacity=6 * 96 * 96)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(safe))
    fast_only = crf.dense_crf(img, logits, iterations=2, capacity=int(1.5 * 96 * 96))
    assert not np.allclose(np.asarray(fast_only), np.asarray(safe))  # the retry did happen
    # inside a user's jit and vmap it still traces (nested compiled call)
    both = jax.jit(jax.vmap(lambda a, b: crf.dense_crf(a, b, iterations=2, capacity=6 * 96 * 96)))
    traced = np.asarray(both(img[None], logits[None]))[0]
    np.testing.assert_allclose(traced, np.asarray(safe), atol=1e-6)


def test_unary_from_logits_compiled_once():
    x = np.random.default_rng(3).normal(size=(5, 7, 4)).astype(np.float32)
    out = _compiled_once(crf.unary_from_logits, lambda: crf.unary_from_logits(x))
    _close(out, _eager(crf.unary_from_logits, x))


# ---------------------------------------------------------------- k-means, metrics


def test_kmeans_functions_compiled_once_and_match_eager():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(c, 0.1, size=(40, 3)) for c in (-1.0, 0.0, 1.0)])
    x = x.astype(np.float32)
    key = jax.random.key(0)
    fit = lambda: kmeans.kmeans_fit(key, x, 3, iters=5, metric="euclidean")  # noqa: E731
    res = _compiled_once(kmeans._fit, fit)
    cents, assignment = kmeans.kmeans(key, x, 3, iters=5, metric="euclidean")
    np.testing.assert_array_equal(np.asarray(cents), np.asarray(res.centroids))
    np.testing.assert_array_equal(np.asarray(assignment), np.asarray(res.assignment))
    ref = _eager(kmeans.kmeans_fit, key, x, 3, iters=5, metric="euclidean")
    np.testing.assert_array_equal(np.asarray(res.assignment), np.asarray(ref.assignment))
    _close(res.centroids, ref.centroids, atol=1e-5)

    a = _compiled_once(kmeans.assign, lambda: kmeans.assign(x, res.centroids, "euclidean", 50))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(res.assignment))
    ref_a = _eager(kmeans.assign, x, res.centroids, "euclidean", 50)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(ref_a))


def test_confusion_compiled_once_and_matches_eager():
    rng = np.random.default_rng(5)
    preds = rng.integers(-1, 6, size=(2, 8, 9))
    labels = rng.integers(-1, 5, size=(2, 8, 9))
    out = _compiled_once(metrics.confusion, lambda: metrics.confusion(preds, labels, 4, 6))
    assert out.shape == (6, 4) and out.dtype == jnp.int32
    ref = _eager(metrics.confusion, preds, labels, 4, 6)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    two = metrics.confusion(preds, labels, 4, 6, ignore_index=2)
    n = _cache_size(metrics.confusion)
    three = metrics.confusion(preds, labels, 4, 6, ignore_index=3)  # an argument: no new program
    assert _cache_size(metrics.confusion) == n
    np.testing.assert_array_equal(np.asarray(two)[:, 2], 0)
    np.testing.assert_array_equal(np.asarray(three)[:, 3], 0)
    np.testing.assert_array_equal(np.asarray(two)[:, 3], np.asarray(out)[:, 3])
    with pytest.raises(ValueError, match="n_clusters"):
        metrics.confusion(preds, labels, 4, 3)


# ---------------------------------------------------------------- losses, ops


def _loss_inputs(B=3, hw=(4, 5), C=6, K=4, S=3, seed=6):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return dict(feats=f(B, *hw, C), feats_pos=f(B, *hw, C), code=f(B, *hw, K),
                code_pos=f(B, *hw, K),
                coords1=rng.uniform(-1, 1, (B, S, S, 2)).astype(np.float32),
                coords2=rng.uniform(-1, 1, (B, S, S, 2)).astype(np.float32),
                perms=np.array([[2, 0, 0], [1, 2, 0]], np.int32))


def _draws_args(a):
    names = ("feats", "feats_pos", "code", "code_pos", "coords1", "coords2", "perms")
    return tuple(a[n] for n in names)


def test_losses_compiled_once_and_match_eager():
    a = _loss_inputs()
    labels = np.random.default_rng(7).integers(-1, 5, (3, 8, 10))
    cases = [
        (losses.sample, (a["feats"], a["coords1"]), {}),
        (losses.tensor_correlation, (a["code"], a["code_pos"]), {}),
        (losses.correspondence_term, (a["feats"], a["feats_pos"], a["code"], a["code_pos"], 0.3),
         dict(pointwise=False, stabilize=True)),
        (losses.super_perm, (jax.random.key(1), 7), {}),
        (losses.correspondence_loss_given_draws,
         (*_draws_args(a), WEIGHTS), {}),
        (losses.stego_correspondence_loss,
         (jax.random.key(2), a["feats"], a["feats_pos"], a["code"], a["code_pos"], WEIGHTS),
         dict(feature_samples=3, neg_samples=2)),
        (losses.cluster_probe_loss, (a["code"],), {}),
        (losses.linear_probe_loss, (a["code"], labels, 4), {}),
        (ops.norm, (a["feats"],), dict(eps=1e-12)),
        (ops.upsample_bilinear, (a["code"], (8, 10)), {}),
    ]
    for fn, args, kwargs in cases:
        compiled = ops._upsample_bilinear if fn is ops.upsample_bilinear else fn
        out = _compiled_once(compiled, lambda: fn(*args, **kwargs))
        _close(out, _eager(fn, *args, **kwargs), rtol=1e-5)


def test_static_options_key_the_cache():
    x = np.random.default_rng(8).normal(size=(1, 3, 4, 2)).astype(np.float32)
    ops.upsample_bilinear(x, (6, 8))
    n = _cache_size(ops._upsample_bilinear)
    ops.upsample_bilinear(x, [6, np.int64(8)])  # any int sequence means the same static size
    assert _cache_size(ops._upsample_bilinear) == n
    ops.upsample_bilinear(x, (5, 8))
    assert _cache_size(ops._upsample_bilinear) == n + 1
    ops.norm(x, eps=1e-12)
    n = _cache_size(ops.norm)
    ops.norm(x, eps=1e-12)
    assert _cache_size(ops.norm) == n
    ops.norm(x, eps=1e-10)
    assert _cache_size(ops.norm) == n + 1


def test_loss_weights_are_a_traceable_pytree_from_config():
    from stego_jax import config as config_lib

    cfg = config_lib.base_config()
    w = losses.LossWeights.from_config(cfg.loss)
    assert w.pos_intra_weight == cfg.loss.pos_intra_weight
    assert w.neg_inter_shift == cfg.loss.neg_inter_shift
    assert len(jax.tree.leaves(w)) == 6
    a = _loss_inputs()
    args = _draws_args(a)
    fn = losses.correspondence_loss_given_draws
    fn(*args, w)
    n = _cache_size(fn)
    # other weight values are traced, not recompiled; a gradient w.r.t. the weights exists
    doubled = jax.tree.map(lambda v: 2.0 * v, w)
    fn(*args, doubled)
    assert _cache_size(fn) == n
    g = jax.grad(lambda ws: fn(*args, ws)[0])(w)
    aux = fn(*args, w)[1]
    np.testing.assert_allclose(float(g.pos_inter_weight), float(aux["pos_inter_loss"]), rtol=1e-6)
