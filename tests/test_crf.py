"""Tests of the dense CRF against closed forms, independent NumPy references and pydensecrf2."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stego_jax import crf, testing

K = 3
H, W = 8, 10  # tiny: the O(N^2) and pure-Python references stay fast


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _unary(logits: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(_softmax(logits.astype(np.float64)), 1e-5, 1.0))


def _mean_field(unary: np.ndarray, filters: list[tuple[float, callable]], iters: int) -> np.ndarray:
    """Mean field with NORMALIZE_SYMMETRIC Potts messages; unary [N,K], filters (w, L)."""
    norms = [1.0 / np.sqrt(f(np.ones((unary.shape[0], 1))) + 1e-20) for _, f in filters]
    q = _softmax(-unary)
    for _ in range(iters):
        msg = sum(w * n * f(n * q) for (w, f), n in zip(filters, norms))
        q = _softmax(-unary + msg)
    return q


def _features(image: np.ndarray, sxy: float, srgb: float | None) -> np.ndarray:
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = [xx / np.float32(sxy), yy / np.float32(sxy)]
    if srgb is not None:
        f += [image[..., 2 - i].astype(np.float32) / np.float32(srgb) for i in range(3)]  # BGR
    return np.stack(f, -1).reshape(h * w, -1)


def brute_force(image: np.ndarray, logits: np.ndarray, iters: int = 10) -> np.ndarray:
    """Exact mean field with dense Gaussian kernels, O(N^2), float64."""
    def dense(f: np.ndarray) -> callable:
        f = f.astype(np.float64)
        kern = np.exp(-0.5 * ((f[:, None] - f[None]) ** 2).sum(-1))
        return lambda v: kern @ v

    filters = [(3.0, dense(_features(image, 1.0, None))), (4.0, dense(_features(image, 67.0, 3.0)))]
    h, w, k = logits.shape
    return _mean_field(_unary(logits).reshape(-1, k), filters, iters).reshape(h, w, k)


def reference_lattice(features: np.ndarray) -> callable:
    """Permutohedral lattice written straight from the paper / permutohedral.cpp, with a dict."""
    n, d = features.shape
    inv_std = np.float32(math.sqrt(2.0 / 3.0) * (d + 1))
    scale = [np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std)) for i in range(d)]
    table: dict[tuple[int, ...], int] = {}
    offsets = np.zeros((n, d + 1), np.int64)
    bary = np.zeros((n, d + 1), np.float32)
    one_over = np.float32(1.0 / (d + 1))
    for p in range(n):
        elev = [np.float32(0)] * (d + 1)
        sm = np.float32(0)
        for j in range(d, 0, -1):
            cf = np.float32(features[p, j - 1] * scale[j - 1])
            elev[j] = np.float32(sm - np.float32(j) * cf)
            sm = np.float32(sm + cf)
        elev[0] = sm
        v = [np.float32(np.round(np.float32(e * one_over))) for e in elev]
        rem0 = [np.float32(x * np.float32(d + 1)) for x in v]
        total = sum(int(x) for x in v)
        rank = [0] * (d + 1)
        for i in range(d):
            for j in range(i + 1, d + 1):
                if elev[i] - rem0[i] < elev[j] - rem0[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d + 1
                rem0[i] += d + 1
            elif rank[i] >= d + 1:
                rank[i] -= d + 1
                rem0[i] -= d + 1
        b = [np.float32(0)] * (d + 2)
        for i in range(d + 1):
            val = np.float32((elev[i] - rem0[i]) * one_over)
            b[d - rank[i]] = np.float32(b[d - rank[i]] + val)
            b[d - rank[i] + 1] = np.float32(b[d - rank[i] + 1] - val)
        b[0] = np.float32(b[0] + np.float32(1) + b[d + 1])
        for r in range(d + 1):
            key = tuple(int(rem0[i]) + (r if rank[i] <= d - r else r - (d + 1)) for i in range(d))
            offsets[p, r] = table.setdefault(key, len(table))
            bary[p, r] = b[r]
    keys = list(table)
    m = len(keys)
    nbrs = []
    for j in range(d + 1):
        n1 = np.full(m + 1, m)
        n2 = np.full(m + 1, m)
        for idx, key in enumerate(keys):
            k1 = [x - 1 for x in key]
            k2 = [x + 1 for x in key]
            if j < d:
                k1[j], k2[j] = key[j] + d, key[j] - d
            n1[idx] = table.get(tuple(k1), m)
            n2[idx] = table.get(tuple(k2), m)
        nbrs.append((n1, n2))
    alpha = 1.0 / (1.0 + 2.0 ** (-d))

    def apply(values: np.ndarray) -> np.ndarray:
        grid = np.zeros((m + 1, values.shape[1]))
        for r in range(d + 1):
            np.add.at(grid, offsets[:, r], bary[:, r, None] * values)
        for n1, n2 in nbrs:
            grid = grid + 0.5 * (grid[n1] + grid[n2])
            grid[m] = 0.0
        return alpha * sum(bary[:, r, None] * grid[offsets[:, r]] for r in range(d + 1))

    apply.num_vertices = m
    return apply


def reference_pydensecrf_replica(image: np.ndarray, logits: np.ndarray, iters: int = 10) -> np.ndarray:
    filters = [
        (3.0, reference_lattice(_features(image, 1.0, None))),
        (4.0, reference_lattice(_features(image, 67.0, 3.0))),
    ]
    h, w, k = logits.shape
    return _mean_field(_unary(logits).reshape(-1, k), filters, iters).reshape(h, w, k)


@functools.lru_cache(maxsize=None)
def _jitted(**params) -> callable:
    return jax.jit(functools.partial(crf.dense_crf, **params))


def run(image: np.ndarray, logits: np.ndarray, **params) -> np.ndarray:
    return np.asarray(_jitted(**params)(jnp.asarray(image), jnp.asarray(logits, jnp.float32)))


def _random_case(seed: int, h: int = H, w: int = W, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Few colours with jitter, so the 3-pixel colour kernel actually links pixels.
    palette = rng.integers(0, 256, (3, 3))
    image = np.clip(palette[rng.integers(0, 3, (h, w))] + rng.integers(-4, 5, (h, w, 3)), 0, 255)
    return image.astype(np.uint8), rng.normal(size=(h, w, k)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Closed forms and invariances


@pytest.mark.parametrize("method", ["lattice", "exact"])
def test_single_pixel_closed_form(method: str) -> None:
    # One pixel: every normalised kernel is the identity, so Q <- softmax(-U + (3 + 4) Q).
    logits = np.array([[[0.3, -0.2, 1.1]]], np.float32)
    u = _unary(logits[0, 0])
    q = _softmax(-u)
    for _ in range(10):
        q = _softmax(-u + 7.0 * q)
    out = run(np.full((1, 1, 3), 77, np.uint8), logits, method=method)
    np.testing.assert_allclose(out[0, 0], q, atol=1e-6)


def test_constant_image_constant_logits() -> None:
    image = np.full((H, W, 3), 120, np.uint8)
    # Uniform unary: every message is the same for all labels, so the output stays uniform.
    out = run(image, np.zeros((H, W, K), np.float32))
    np.testing.assert_allclose(out, 1.0 / K, atol=1e-6)
    # Non-uniform constant unary: each message is a positive multiple of Q at that pixel, which
    # has the ordering of -U, so the argmax is the unary's everywhere and confidence only grows.
    logits = np.broadcast_to(np.array([0.2, 0.5, -0.1], np.float32), (H, W, K))
    out = run(image, logits)
    assert (out.argmax(-1) == 1).all()
    assert (out.max(-1) > _softmax(logits).max(-1) + 0.05).all()


def test_rows_sum_to_one_and_finite() -> None:
    image, logits = _random_case(0)
    out = run(image, 5.0 * logits)
    assert np.isfinite(out).all() and (out >= 0).all()
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_label_permutation_equivariance() -> None:
    image, logits = _random_case(1)
    perm = np.array([2, 0, 1])
    out = run(image, logits)
    np.testing.assert_allclose(run(image, logits[..., perm]), out[..., perm], atol=2e-5)


def test_two_region_denoising() -> None:
    # Left half dark, right half bright; the unary is correct on only ~70% of the pixels.
    h, w = 24, 32
    rng = np.random.default_rng(3)
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2 :] = 1
    image = np.where(truth[..., None] == 1, 200, 40).astype(np.uint8) + rng.integers(0, 3, (h, w, 3)).astype(np.uint8)
    noisy = np.where(rng.random((h, w)) < 0.3, 1 - truth, truth)
    logits = 0.8 * np.eye(2, dtype=np.float32)[noisy]
    before = (logits.argmax(-1) == truth).mean()
    after = (run(image, logits).argmax(-1) == truth).mean()
    assert before < 0.75
    assert after > 0.98, (before, after)


def test_vmap_and_batch_equal_single() -> None:
    cases = [_random_case(s) for s in (4, 5, 6)]
    images = np.stack([c[0] for c in cases])
    logits = np.stack([c[1] for c in cases])
    single = np.stack([run(i, l) for i, l in cases])
    batched = np.asarray(crf.dense_crf_batch(jnp.asarray(images), jnp.asarray(logits)))
    np.testing.assert_allclose(batched, single, atol=1e-6)
    vmapped = np.asarray(jax.jit(jax.vmap(crf.dense_crf))(images, logits))
    np.testing.assert_allclose(vmapped, single, atol=2e-5)
    labels = crf.crf_labels(images, logits)
    np.testing.assert_array_equal(labels, single.argmax(-1))


def test_jit_no_retrace_same_shape() -> None:
    traces = []

    def f(im: jax.Array, lg: jax.Array) -> jax.Array:
        traces.append(1)
        return crf.dense_crf(im, lg)

    g = jax.jit(f)
    for s in (7, 8):
        image, logits = _random_case(s, 2, 2)
        g(image, logits).block_until_ready()
    assert len(traces) == 1


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="does not match"):
        crf.dense_crf(jnp.zeros((4, 5, 3), jnp.uint8), jnp.zeros((4, 6, 2)))


# ---------------------------------------------------------------------------------------------
# Independent references


def test_exact_method_matches_numpy_brute_force() -> None:
    image, logits = _random_case(9)
    np.testing.assert_allclose(run(image, logits, method="exact"), brute_force(image, logits), atol=2e-5)


def test_lattice_matches_python_replica() -> None:
    image, logits = _random_case(10)
    want = reference_pydensecrf_replica(image, logits)
    got = run(image, logits, spatial="lattice")
    # float32 scatter sums against a float64 reference; a wrong vertex or neighbour costs > 0.1.
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_spatial_conv_is_the_truncated_dense_gaussian() -> None:
    # spatial="conv" replaces the d=2 lattice by the exact σ=1 Gaussian cut at 3 pixels.
    v = np.random.default_rng(2).random((H * W, 2)).astype(np.float32)
    yy, xx = np.mgrid[0:H, 0:W]
    dy = np.abs(yy.reshape(-1, 1) - yy.reshape(1, -1))
    dx = np.abs(xx.reshape(-1, 1) - xx.reshape(1, -1))
    kern = np.exp(-0.5 * (dx**2 + dy**2)) * ((dx <= 3) & (dy <= 3))
    got = np.asarray(jax.jit(crf._gauss_conv, static_argnums=(1, 2, 3))(v, H, W, 1.0))
    np.testing.assert_allclose(got, kern @ v, rtol=1e-5)


def test_lattice_is_a_different_approximation_than_exact() -> None:
    # Guards the fairness of the two checks above: lattice and dense kernels really differ.
    image, logits = _random_case(10)
    assert np.abs(run(image, logits, spatial="lattice") - brute_force(image, logits)).max() > 1e-3


def test_hash_collisions_are_split_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hash that sends pairs of adjacent keys to one bucket forces the collision path.
    image, logits = _random_case(12)
    want = run(image, logits, spatial="lattice")
    monkeypatch.setattr(crf, "_hash32", lambda hi, lo: ((hi * 7919 + lo) >> 1).astype(jnp.uint32))
    got = np.asarray(jax.jit(functools.partial(crf.dense_crf, spatial="lattice"))(image, logits))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_capacity_overflow_is_redone_at_safe_size(monkeypatch: pytest.MonkeyPatch) -> None:
    image, logits = _random_case(14)  # tiny images need ~3·N lattice vertices, > the fast 1.5·N
    want = run(image, logits)  # small images always use the overflow-free capacity
    dropped = run(image, logits, capacity=int(1.5 * H * W))
    assert np.abs(dropped - want).max() > 1e-3  # the overflow is real and matters
    monkeypatch.setattr(crf, "_SMALL", 0)
    got = np.asarray(jax.jit(crf.dense_crf)(image, logits))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_lattice_filter_and_vertex_count_match_reference() -> None:
    image, _ = _random_case(13)
    f = _features(image, 67.0, 3.0)
    fmax = np.array([(W - 1) / 67.0, (H - 1) / 67.0, 85.0, 85.0, 85.0])
    values = np.random.default_rng(0).random((H * W, 2))

    @jax.jit
    def filt(f: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        lat = crf.build_lattice(f, fmax, 6 * H * W)
        return crf.lattice_filter(lat, v), lat.num_vertices

    got, m = filt(jnp.asarray(f), jnp.asarray(values, jnp.float32))
    ref = reference_lattice(f)
    assert int(m) == ref.num_vertices
    np.testing.assert_allclose(np.asarray(got), ref(values), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# pydensecrf2 (optional extra)


def test_agreement_with_pydensecrf() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    for seed, name in enumerate(["astronaut", "chelsea"]):
        image = testing.sample_photo(name, 60, 80)
        logits = testing.stego_like_logits(image, 5, seed)
        ref = crf._pydensecrf_one(image, logits)
        default = run(image, logits)  # spatial="lattice"
        assert (default.argmax(-1) == ref.argmax(-1)).mean() == 1.0
        assert np.abs(default - ref).max() < 1e-3
        conv = run(image, logits, spatial="conv")
        agree = (conv.argmax(-1) == ref.argmax(-1)).mean()
        assert agree >= 0.995, (name, agree)
    # The two crf.backend settings give the same labels.
    labels = crf.crf_labels(image[None], logits[None], backend="pydensecrf")
    np.testing.assert_array_equal(labels[0], ref.argmax(-1))
    np.testing.assert_array_equal(crf.crf_labels(image[None], logits[None], backend="jax"), labels)


def test_fixed_spatial_lattice_equals_the_per_image_lattice() -> None:
    # The position-only lattice is built once per shape, trimmed and renumbered; it must filter
    # exactly like the lattice built from the features inside a trace, at the full safe capacity.
    h, w = 13, 17
    lat, norm = crf._fixed_lattice(h, w, 1.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = np.stack([xx, yy], -1).reshape(-1, 2)
    fmax = np.array([w - 1.0, h - 1.0])
    v = np.random.default_rng(3).random((h * w, 4)).astype(np.float32)

    @jax.jit
    def traced(f: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        ref = crf.build_lattice(f, fmax, 6 * h * w)
        return crf.lattice_filter(ref, v), crf.lattice_filter(ref, jnp.ones((h * w, 1))), ref.num_vertices

    want, ones, m = traced(jnp.asarray(f), jnp.asarray(v))
    assert int(lat.num_vertices) == int(m) and lat.n1.shape == (3, int(m) + 1)
    np.testing.assert_allclose(np.asarray(crf.lattice_filter(lat, jnp.asarray(v))), np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(norm, 1.0 / np.sqrt(np.asarray(ones) + 1e-20), rtol=1e-6)
    # Renumbered in first-touch order: the vertices of pixel 0 come first.
    assert sorted(lat.vertex[0].tolist()) == list(range(3))


def test_label_sets_share_one_lattice() -> None:
    # splits=(3, 2): two independent label sets of one image refined together give each set's
    # own result; crf_labels does this for a list of logits.
    image, a = _random_case(16)
    b = np.random.default_rng(17).normal(size=(H, W, 2)).astype(np.float32)
    both = run(image, np.concatenate([a, b], -1), splits=(3, 2))
    np.testing.assert_allclose(both[..., :3], run(image, a), atol=1e-6)
    np.testing.assert_allclose(both[..., 3:], run(image, b), atol=1e-6)
    la, lb = crf.crf_labels(image[None], [a[None], b[None]])
    np.testing.assert_array_equal(la[0], run(image, a).argmax(-1))
    np.testing.assert_array_equal(lb[0], run(image, b).argmax(-1))
    with pytest.raises(ValueError, match="splits"):
        run(image, a, splits=(2, 2))


def test_pydensecrf_pool_is_reused_and_cannot_hang() -> None:
    pytest.importorskip("pydensecrf.densecrf")
    cases = [_random_case(20 + i, 12, 14) for i in range(3)]
    images = np.stack([c[0] for c in cases])
    logits = np.stack([c[1] for c in cases])
    serial = crf.crf_labels(images, logits, backend="pydensecrf")
    np.testing.assert_array_equal(serial, np.stack([crf._pydensecrf_one(*c).argmax(-1) for c in cases]))
    np.testing.assert_array_equal(crf.crf_labels(images, logits, backend="pydensecrf", processes=2), serial)
    pool = crf._POOLS[2]
    np.testing.assert_array_equal(crf.crf_labels(images, logits, backend="pydensecrf", processes=2), serial)
    assert crf._POOLS[2] is pool  # kept between calls
    # processes=0: one worker per CPU core (what eval.crf_processes=0 asks for).
    np.testing.assert_array_equal(crf.crf_labels(images, logits, backend="pydensecrf", processes=0), serial)
    assert (os.cpu_count() or 1) == 1 or os.cpu_count() in crf._POOLS
    # A timeout drops the pool with a warning and the batch still completes serially. The images
    # are large enough (~0.1 s each) that a 1 ms timeout cannot be met by a warm pool.
    big = [_random_case(30 + i, 160, 240) for i in range(2)]
    images, logits = np.stack([c[0] for c in big]), np.stack([c[1] for c in big])
    with pytest.warns(RuntimeWarning, match="running serially"):
        out = crf.crf_labels(images, logits, backend="pydensecrf", processes=2, timeout_s=1e-3)
    np.testing.assert_array_equal(out, np.stack([crf._pydensecrf_one(*c).argmax(-1) for c in big]))
    assert 2 not in crf._POOLS


def test_backend_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    image, logits = _random_case(15)
    with pytest.raises(ValueError, match="backend"):
        crf.crf_labels(image[None], logits[None], backend="torch")
    monkeypatch.setitem(__import__("sys").modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match=r"pip install stego_jax\[crf\]"):
        crf.crf_labels(image[None], logits[None], backend="pydensecrf")
