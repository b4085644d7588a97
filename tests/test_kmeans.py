"""k-means: blob recovery, restart selection by objective, determinism, k-means++ seeding, and the
fixed-point / objective properties checked against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stego_jax import kmeans as km


def _same_partition(a, b):
    """True iff the two labelings are equal up to a permutation of ids."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _cosine_blobs(rng, n_per=20, k=3, d=6):
    dirs = np.eye(d)[:k] + 0.1
    labels = np.repeat(np.arange(k), n_per)
    x = dirs[labels] + 0.05 * rng.standard_normal((k * n_per, d))
    x *= rng.uniform(0.5, 5.0, size=(len(x), 1))  # norms must not matter for cosine
    return x.astype(np.float32), labels


def _euclid_blobs(rng, n_per=20):
    means = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    labels = np.repeat(np.arange(4), n_per)
    return (means[labels] + 0.5 * rng.standard_normal((4 * n_per, 2))).astype(np.float32), labels


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    # Compilation dominates these tiny problems; XLA's optimisation passes are not under test.
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def test_cosine_blobs_recovered_deterministic_and_fixed_point():
    x, labels = _cosine_blobs(np.random.default_rng(0))
    x = jnp.asarray(x)
    kw = dict(iters=8, restarts=3)
    res = km.kmeans_fit(jax.random.key(0), x, 3, **kw)
    assert _same_partition(res.assignment, labels)
    again = km.kmeans_fit(jax.random.key(0), x, 3, **kw)
    np.testing.assert_array_equal(res.centroids, again.centroids)
    np.testing.assert_array_equal(res.assignment, again.assignment)
    other = km.kmeans_fit(jax.random.key(1), x, 3, **kw)
    assert _same_partition(other.assignment, labels)
    # Spherical k-means fixed point: centroids are the normalised means of their members and
    # every point sits at its max-cosine centroid; the objective is the mean of 1 - max cos.
    xn = _np_normalize(np.asarray(x))
    a = np.asarray(res.assignment)
    assert a.dtype == np.int32
    ref_c = _np_normalize(np.stack([xn[a == j].mean(0) for j in range(3)]))
    np.testing.assert_allclose(res.centroids, ref_c, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(xn @ ref_c.T, 1), a)
    assert float(res.objective) == pytest.approx(np.mean(1 - np.max(xn @ ref_c.T, 1)), abs=1e-5)
    np.testing.assert_array_equal(km.assign(x, res.centroids), a)
    np.testing.assert_array_equal(km.assign(x, res.centroids, chunk_size=7), a)  # N=60, ragged


def test_euclidean_blobs_recovered_fixed_point_and_chunking():
    x, labels = _euclid_blobs(np.random.default_rng(1), n_per=13)  # N = 52
    x = jnp.asarray(x)
    kw = dict(iters=8, metric="euclidean", restarts=3)
    res = km.kmeans_fit(jax.random.key(1), x, 4, **kw)
    assert _same_partition(res.assignment, labels)
    a, c, xn = np.asarray(res.assignment), np.asarray(res.centroids), np.asarray(x)
    np.testing.assert_allclose(c, np.stack([xn[a == j].mean(0) for j in range(4)]), atol=1e-4)
    d2 = ((xn[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.argmin(d2, 1), a)
    assert float(res.objective) == pytest.approx(d2.min(1).mean(), rel=1e-4)
    # Assignment in chunks of 10 rows (10 does not divide 52) gives the same run.
    chunked = km.kmeans_fit(jax.random.key(1), x, 4, chunk_size=10, **kw)
    np.testing.assert_array_equal(chunked.assignment, res.assignment)
    np.testing.assert_allclose(chunked.centroids, res.centroids, atol=1e-5)
    cents, assign = km.kmeans(jax.random.key(1), x, 4, **kw)  # the tuple-returning wrapper
    np.testing.assert_array_equal(assign, res.assignment)


def test_restarts_keep_the_lowest_objective_and_run_under_jit():
    # Random init with no Lloyd steps: each restart's result is its init, so some restarts are
    # bad (two seeds in one blob). The best-of-R must equal the minimum of the R single runs.
    x, _ = _euclid_blobs(np.random.default_rng(2))
    x = jnp.asarray(x)
    key, r = jax.random.key(3), 12
    kw = dict(iters=0, metric="euclidean", init="random")
    singles = [km.kmeans_fit(kk, x, 4, restarts=1, **kw) for kk in jax.random.split(key, r)]
    objs = np.array([float(s.objective) for s in singles])
    assert objs.max() > 5 * objs.min()  # the case really has bad initialisations
    best = km.kmeans_fit(key, x, 4, restarts=r, **kw)
    assert float(best.objective) == pytest.approx(objs.min(), rel=1e-6)
    np.testing.assert_array_equal(best.assignment, singles[int(objs.argmin())].assignment)
    # Traceable inside a caller's jit (static k / iters / restarts).
    jitted = jax.jit(lambda kk, xx: km.kmeans(kk, xx, 4, restarts=r, **kw))
    np.testing.assert_array_equal(jitted(key, x)[1], best.assignment)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_kmeanspp_picks_distinct_weighted_points(metric):
    # k = number of weighted points, no Lloyd steps: D^2 seeding can pick each point only once
    # and never a zero-weight point, so the centroids are a permutation of the weighted points.
    x = np.random.default_rng(5).standard_normal((12, 4)).astype(np.float32)
    w = np.ones(12, np.float32)
    w[[2, 5, 11]] = 0.0
    res = km.kmeans_fit(jax.random.key(0), jnp.asarray(x), 9, iters=0, metric=metric,
                        weights=jnp.asarray(w))
    ref = (_np_normalize(x) if metric == "cosine" else x)[w > 0]
    c = np.asarray(res.centroids)
    match = np.argmin(((c[:, None] - ref[None]) ** 2).sum(-1), axis=1)
    assert sorted(match.tolist()) == list(range(9))
    np.testing.assert_allclose(c, ref[match], atol=1e-6)


def test_empty_cluster_is_reseeded_at_the_farthest_point():
    # Three copies of A and one B, random init: when both seeds are copies of A, cluster 1 is
    # empty (ties go to the lower index) and must be reseeded at B; every run then ends {A},{B}.
    x = jnp.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [5.0, 4.0]])
    for key in jax.random.split(jax.random.key(0), 8):
        res = km.kmeans_fit(key, x, 2, iters=2, metric="euclidean", init="random")
        assert float(res.objective) == 0.0
        assert _same_partition(res.assignment, [0, 0, 0, 1])


def test_bad_arguments_raise():
    x = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="metric"):
        km.kmeans_fit(jax.random.key(0), x, 2, metric="l1")
    with pytest.raises(ValueError, match="only N=3"):
        km.kmeans_fit(jax.random.key(0), x, 4)
