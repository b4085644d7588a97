"""Pure, jittable k-means (spherical/cosine or Euclidean) with k-means++ seeding and parallel
restarts chosen by the clustering objective."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

_METRICS = ("cosine", "euclidean")
_INITS = ("k-means++", "random")
# Exact fp32 products: assignments should not depend on the accelerator's matmul default.
_PRECISION = jax.lax.Precision.HIGHEST
_EPS = 1e-12


class KMeansResult(NamedTuple):
    """centroids `[k, D]` (unit norm for cosine), assignment int32 `[N]`, objective scalar
    (weighted mean distance to the assigned centroid: `1 - cos` for cosine, squared distance
    for Euclidean; lower is better)."""

    centroids: jax.Array
    assignment: jax.Array
    objective: jax.Array


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _distances(x: jax.Array, centroids: jax.Array, metric: str) -> jax.Array:
    """`[n, D] x [k, D] -> [n, k]` distances (`1 - cos` for unit vectors, or squared L2)."""
    dots = jnp.matmul(x, centroids.T, precision=_PRECISION)
    if metric == "cosine":
        return 1.0 - dots
    sq = jnp.sum(x * x, -1, keepdims=True) - 2.0 * dots + jnp.sum(centroids**2, -1)[None]
    return jnp.maximum(sq, 0.0)


def _chunked_assign(xc: jax.Array, centroids: jax.Array, metric: str):
    """`xc [n_chunks, chunk, D]` -> (assignment `[N']`, distance `[N']`), one chunk at a time so
    only `chunk x k` distances exist at once."""

    def one(chunk):
        d = _distances(chunk, centroids, metric)
        return jnp.argmin(d, -1).astype(jnp.int32), jnp.min(d, -1)

    a, d = jax.lax.map(one, xc)
    return a.reshape(-1), d.reshape(-1)


@functools.partial(jax.jit, static_argnames=("metric", "chunk_size"))
def assign(
    x: jax.Array, centroids: jax.Array, metric: str = "cosine", chunk_size: int = 65536
) -> jax.Array:
    """Nearest centroid of each point; compiled once per shape, metric and chunk size.

    Args:
      x: `[N, D]` points (normalised internally for cosine).
      centroids: `[k, D]`.
      metric: "cosine" (max cosine) or "euclidean".
      chunk_size: rows per step, so only `chunk_size x k` distances exist at once.

    Returns:
      int32 `[N]`; ties go to the lower centroid index.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    x, centroids = jnp.asarray(x, jnp.float32), jnp.asarray(centroids, jnp.float32)
    if metric == "cosine":
        x, centroids = _normalize(x), _normalize(centroids)
    n = x.shape[0]
    chunk = max(1, min(chunk_size, n))
    xp = jnp.pad(x, ((0, (-n) % chunk), (0, 0)))
    return _chunked_assign(xp.reshape(-1, chunk, x.shape[1]), centroids, metric)[0][:n]


def _sample(p: jax.Array, u: jax.Array) -> jax.Array:
    """Index drawn with probability `p / sum(p)` from a uniform `u` in [0, 1) (inverse CDF):
    the first index whose cumulative mass exceeds `u * sum(p)`, so zero-mass points are never
    drawn. Keeps the PRNG out of the seeding loop (one draw for all k), which compiles faster."""
    c = jnp.cumsum(p)
    above = c > u * c[-1]
    return jnp.where(jnp.any(above), jnp.argmax(above), jnp.argmax(p))


def _init_kmeanspp(key, x, w, k, metric):
    """k-means++ (D^2 sampling). For cosine on unit vectors `1 - cos = |a - b|^2 / 2`, so sampling
    proportional to `1 - cos` *is* D^2 sampling on the sphere."""
    u = jax.random.uniform(key, (k,))
    first = _sample(w, u[0])
    cents = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    mind = _distances(x, x[first][None], metric)[:, 0].at[first].set(0.0)

    def body(i, carry):
        cents, mind = carry
        p = w * mind
        # Fewer distinct points than k: fall back to sampling by weight alone.
        idx = _sample(jnp.where(jnp.sum(p) > 0, p, w), u[i])
        cents = cents.at[i].set(x[idx])
        d = _distances(x, x[idx][None], metric)[:, 0]
        # Chosen points get exactly 0 so rounding can never pick them again.
        mind = jnp.minimum(mind, d).at[idx].set(0.0)
        return cents, mind

    cents, _ = jax.lax.fori_loop(1, k, body, (cents, mind))
    return cents


def _init_random(key, x, w, k):
    idx = jax.random.choice(key, x.shape[0], (k,), replace=False, p=w / jnp.sum(w))
    return x[idx]


def _single_run(key, x, w, xc, *, k, iters, metric, init):
    """One k-means run. `x [N', D]` padded points, `w [N']` weights (0 for padding),
    `xc` the same points as `[n_chunks, chunk, D]`."""
    if init == "k-means++":
        cents = _init_kmeanspp(key, x, w, k, metric)
    else:
        cents = _init_random(key, x, w, k)

    def update(cents):
        a, d = _chunked_assign(xc, cents, metric)
        sums = jax.ops.segment_sum(x * w[:, None], a, num_segments=k)
        mass = jax.ops.segment_sum(w, a, num_segments=k)
        new = sums / jnp.maximum(mass, _EPS)[:, None]
        if metric == "cosine":
            new = _normalize(new)
        # Empty cluster -> reseed deterministically at the farthest points: the j-th empty
        # cluster takes the j-th farthest (weighted) point from its current centroid.
        empty = mass <= 0
        far = jax.lax.top_k(jnp.where(w > 0, d, -jnp.inf), k)[1]
        rank = jnp.cumsum(empty) - 1
        return jnp.where(empty[:, None], x[far[jnp.clip(rank, 0, k - 1)]], new)

    cents = jax.lax.fori_loop(0, iters, lambda _, c: update(c), cents)
    a, d = _chunked_assign(xc, cents, metric)
    objective = jnp.sum(w * d) / jnp.sum(w)
    return cents, a, objective


def kmeans_fit(
    key: jax.Array,
    x: jax.Array,
    k: int,
    *,
    iters: int = 50,
    metric: str = "cosine",
    restarts: int = 1,
    init: str = "k-means++",
    weights: jax.Array | None = None,
    chunk_size: int = 65536,
) -> KMeansResult:
    """k-means with `restarts` parallel runs; keeps the run with the lowest objective.

    Args:
      key: PRNG key (the only source of randomness: same key, same result).
      x: `[N, D]` points. For "cosine" they are L2-normalised and clustering is spherical
        k-means (assign by max cosine, centroid = normalised mean).
      k: number of clusters (static).
      iters: Lloyd iterations (static; fixed count, no early stop, so shapes and cost are static).
      metric: "cosine" or "euclidean" (static).
      restarts: independent initialisations run in parallel (`vmap`) (static).
      init: "k-means++" (D^2 seeding; `1 - cos` for cosine) or "random" (k distinct points).
      weights: optional `[N]` non-negative point weights (0 = ignore the point).
      chunk_size: rows per assignment chunk (static); memory is `chunk_size x k`, never
        `N x k x D`, so N ~ 1e6 x D ~ 70 is fine.

    Returns:
      `KMeansResult(centroids [k, D], assignment int32 [N], objective)`; the objective is the
      weighted mean of `1 - max cos` (cosine) or of the squared distance (Euclidean) and is the
      only thing used to pick among restarts (never labels).
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if k > x.shape[0]:
        raise ValueError(f"k={k} clusters but only N={x.shape[0]} points")
    # One call form for every entry point, so they share compiled executables: one per shape,
    # dtype and static options.
    return _fit(key, x, weights, k, iters, metric, restarts, init, chunk_size)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _fit(key, x, weights, k, iters, metric, restarts, init, chunk_size) -> KMeansResult:
    n, dim = x.shape
    x = x.astype(jnp.float32)
    if metric == "cosine":
        x = _normalize(x)
    w = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    chunk = min(chunk_size, n)
    pad = (-n) % chunk
    xp = jnp.pad(x, ((0, pad), (0, 0)))
    wp = jnp.pad(w, (0, pad))  # padded rows weigh 0: they never seed, move or score
    xc = xp.reshape(-1, chunk, dim)

    run = functools.partial(_single_run, k=k, iters=iters, metric=metric, init=init)
    # restarts == 1 uses `key` itself, so restart i of a call equals a single run with
    # `jax.random.split(key, restarts)[i]`.
    keys = jax.random.split(key, restarts) if restarts > 1 else jnp.expand_dims(key, 0)
    cents, assigns, objs = jax.vmap(run, in_axes=(0, None, None, None))(keys, xp, wp, xc)
    best = jnp.argmin(objs)
    return KMeansResult(cents[best], assigns[best, :n], objs[best])


def kmeans(key: jax.Array, x: jax.Array, k: int, **options) -> tuple[jax.Array, jax.Array]:
    """`kmeans_fit(key, x, k, **options)` returning only `(centroids [k, D], assignment int32
    [N])`; the same options (`iters`, `metric`, `restarts`, `init`, `weights`, `chunk_size`) and
    the same compiled program."""
    res = kmeans_fit(key, x, k, **options)
    return res.centroids, res.assignment
