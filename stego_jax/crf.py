"""Dense CRF (Krähenbühl & Koltun mean field with STEGO's parameters) in pure JAX.

Owns the permutohedral-lattice replica of pydensecrf, an exact O(N^2) path for tiny images, and
the `crf_labels` front end that can also run pydensecrf2 over a process pool.
"""

from __future__ import annotations

import atexit
import functools
import math
import multiprocessing
import multiprocessing.pool
import os
import warnings
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stego_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Official STEGO constants (mhamilton723/STEGO:src/crf.py).
MAX_ITER = 10
POS_W, POS_XY_STD = 3.0, 1.0
BI_W, BI_XY_STD, BI_RGB_STD = 4.0, 67.0, 3.0

_INT32_MAX = 2**31 - 1
_SMALL = 8192  # below this many pixels the overflow-free lattice capacity is cheap enough


class Lattice(NamedTuple):
    """A permutohedral lattice built for one image; reused by every filter application.

    vertex: [N, d+1] int32 lattice-vertex id of each pixel's simplex corner (cap = dropped).
    weight: [N, d+1] float32 barycentric weights.
    n1, n2: [d+1, cap] int32 blur neighbours along each lattice axis (cap = missing).
    num_vertices: [] int32 number of distinct vertices; > cap means the capacity was too small.
    """

    vertex: jax.Array
    weight: jax.Array
    n1: jax.Array
    n2: jax.Array
    num_vertices: jax.Array


def _scale_factors(d: int) -> np.ndarray:
    # Same float32 constants as permutohedral.cpp (double maths, then a float32 store).
    inv_std = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return np.array([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(d)], np.float32)


def _digit_ranges(feature_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Static bounds of the quotient digits q_i = (key_i - r) / (d+1) for features in [0, max]."""
    d = feature_max.shape[0]
    cmax = feature_max.astype(np.float64) * _scale_factors(d)
    lo = np.empty(d)
    hi = np.empty(d)
    lo[0], hi[0] = 0.0, cmax.sum()
    for j in range(1, d):
        lo[j], hi[j] = -j * cmax[j - 1], cmax[j:].sum()
    # Rounding, wrap-around and vertex offsets move a key by < 3(d+1); one more digit of
    # padding on each side keeps the neighbour codes of edge vertices from aliasing.
    qlo = np.floor(lo / (d + 1)) - 4
    qhi = np.ceil(hi / (d + 1)) + 4
    return qlo.astype(np.int64), (qhi - qlo + 1).astype(np.int64)


def _word_split(radices: list[int]) -> list[list[int]]:
    """Greedily packs mixed-radix digits into int32 words; two words at most."""
    words: list[list[int]] = [[]]
    size = 1
    for i, r in enumerate(radices):
        if size * r > _INT32_MAX:
            words.append([])
            size = 1
        if r > _INT32_MAX:
            raise ValueError(f"lattice digit {i} has range {r}: features too large")
        words[-1].append(i)
        size *= r
    if len(words) > 2:
        raise ValueError(
            f"lattice keys need {len(words)} int32 words (ranges {radices}); the image is too "
            "large for these kernel widths"
        )
    return words


def _pack(digits: list[jax.Array], radices: list[int], words: list[list[int]]) -> list[jax.Array]:
    out = []
    for w in words:
        acc = jnp.zeros_like(digits[0])
        for i in w:
            acc = acc * radices[i] + digits[i]
        out.append(acc)
    while len(out) < 2:
        out.append(jnp.zeros_like(digits[0]))
    return out


def _pack_np(digits: list[int], radices: list[int], words: list[list[int]]) -> tuple[int, int]:
    out = []
    for w in words:
        acc = 0
        for i in w:
            acc = acc * radices[i] + digits[i]
        out.append(acc)
    return (out + [0])[0], (out + [0, 0])[1]


def _hash32(hi: jax.Array, lo: jax.Array) -> jax.Array:
    # murmur3-style finaliser of the two key words; only a bucket order for one int32 sort
    # (multi-operand sorts are ~7x slower on XLA:CPU); collisions are resolved below.
    x = hi.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) ^ lo.astype(jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def build_lattice(features: jax.Array, feature_max: np.ndarray, capacity: int) -> Lattice:
    """Builds pydensecrf's permutohedral lattice for `features` [N, d] (each in [0, feature_max]).

    Replicates permutohedral.cpp (SSE path): float32 elevation in the same order, round half to
    even, the same rank / barycentric rules, the same blur neighbours. Vertex ids come from a
    32-bit hash sort; two distinct keys sharing a hash are split exactly (three never occur in
    practice: ~M^3 / 2^64).
    """
    n, d = features.shape
    dp1 = d + 1
    sf = _scale_factors(d)
    inv = np.float32(1.0 / dp1)
    f = features.astype(jnp.float32)

    # Elevation E·f, accumulated exactly as the C++ loop does.
    elev = [None] * dp1
    sm = jnp.zeros((n,), jnp.float32)
    for j in range(d, 0, -1):
        cf = f[:, j - 1] * sf[j - 1]
        elev[j] = sm - np.float32(j) * cf
        sm = sm + cf
    elev[0] = sm
    elev = jnp.stack(elev, axis=1)  # [N, d+1]
    v = jnp.round(elev * inv)  # half to even, like _mm_round_ps
    rem0 = v * np.float32(dp1)
    ssum = v.sum(axis=1, keepdims=True)
    delta = elev - rem0
    # rank_i = #{j>i: Δ_i < Δ_j} + #{j<i: Δ_j >= Δ_i}
    lt = delta[:, :, None] < delta[:, None, :]  # [N, i, j]: Δ_i < Δ_j
    upper = np.triu(np.ones((dp1, dp1), bool), 1)
    rank = (lt & upper).sum(2) + ((~lt) & upper).sum(1)
    rank = rank.astype(jnp.float32) + ssum
    add = jnp.where(rank < 0, np.float32(dp1), np.float32(0))
    sub = jnp.where(rank >= dp1, np.float32(dp1), np.float32(0))
    rank = (rank + add - sub).astype(jnp.int32)
    rem0 = rem0 + add - sub

    # Barycentric weights, summed in the C++ order.
    vb = (elev - rem0) * inv
    bary = jnp.zeros((n, dp1 + 1), jnp.float32)
    cols = jnp.arange(dp1 + 1)
    for i in range(dp1):
        p = (d - rank[:, i])[:, None]
        bary = bary + jnp.where(cols == p, vb[:, i : i + 1], 0.0)
        bary = bary - jnp.where(cols == p + 1, vb[:, i : i + 1], 0.0)
    bary = bary.at[:, 0].add(1.0 + bary[:, dp1])
    weight = bary[:, :dp1]

    # Vertex r of each pixel: q_i = rem0_i/(d+1) - [rank_i > d - r] for the first d coordinates.
    qlo, qrange = _digit_ranges(np.asarray(feature_max, np.float64))
    radices = [dp1] + [int(x) for x in qrange]
    words = _word_split(radices)
    q0 = (rem0[:, :d] * inv).round().astype(jnp.int32) - jnp.asarray(qlo, jnp.int32)
    r_ids = jnp.arange(dp1, dtype=jnp.int32)
    q = q0[:, None, :] - (rank[:, None, :d] > (d - r_ids)[None, :, None]).astype(jnp.int32)
    rr = jnp.broadcast_to(r_ids[None, :], (n, dp1))
    digits = [rr.reshape(-1)] + [q[:, :, i].reshape(-1) for i in range(d)]
    khi, klo = _pack(digits, radices, words)
    h = _hash32(khi, klo)

    # Unique hash groups via one single-operand sort.
    p_total = n * dp1
    hs = jnp.sort(h)
    first = jnp.concatenate([jnp.ones((1,), bool), hs[1:] != hs[:-1]])
    gid_sorted = jnp.cumsum(first.astype(jnp.int32)) - 1
    num_groups = gid_sorted[-1] + 1
    sentinel = jnp.uint32(0xFFFFFFFF)
    uh = jnp.full((p_total,), sentinel, jnp.uint32).at[gid_sorted].set(hs)
    g = jnp.searchsorted(uh, h, method="scan").astype(jnp.int32)

    # A group normally holds one key. Hash collisions (~M^2/2^33 pairs per image) are checked
    # for cheaply and only then split exactly: the representative is the largest key.
    imin = jnp.int32(-_INT32_MAX - 1)
    src = jnp.zeros((p_total,), jnp.int32).at[g].set(jnp.arange(p_total, dtype=jnp.int32))
    collided = jnp.any((khi != khi[src][g]) | (klo != klo[src][g]))

    def simple(_: None) -> tuple[jax.Array, ...]:
        zeros = jnp.zeros((p_total,), bool)
        return khi[src], klo[src], khi[src], klo[src], zeros, jnp.ones((p_total,), bool)

    def split(_: None) -> tuple[jax.Array, ...]:
        rep_hi = jax.ops.segment_max(khi, g, p_total)
        rep_lo = jax.ops.segment_max(jnp.where(khi == rep_hi[g], klo, imin), g, p_total)
        is_rep = (khi == rep_hi[g]) & (klo == rep_lo[g])
        oth_hi = jax.ops.segment_max(jnp.where(is_rep, imin, khi), g, p_total)
        oth_lo = jax.ops.segment_max(jnp.where(is_rep | (khi != oth_hi[g]), imin, klo), g, p_total)
        has2 = jax.ops.segment_max((~is_rep).astype(jnp.int32), g, p_total) > 0
        return rep_hi, rep_lo, oth_hi, oth_lo, has2, is_rep

    rep_hi, rep_lo, oth_hi, oth_lo, has2, is_rep = jax.lax.cond(collided, split, simple, None)
    slots = 1 + has2.astype(jnp.int32)
    offset = jnp.cumsum(slots) - slots
    num_vertices = jnp.sum(jnp.where(jnp.arange(p_total) < num_groups, slots, 0))
    vid = offset[g] + (~is_rep).astype(jnp.int32)
    # Renumber the vertices in order of the first (pixel, corner) touching them: ids in hash
    # order scatter the filter's gathers over memory, these walk it nearly in order (1.5x faster
    # filtering at 320x320x27). A scatter-min and a cumsum, no sort; no float changes (splat still
    # sums each vertex's pixels in pixel order).
    entry = jnp.arange(p_total, dtype=jnp.int32)
    first = jnp.full((p_total,), p_total - 1, jnp.int32).at[vid].min(entry)
    new_of_old = (jnp.cumsum((first[vid] == entry).astype(jnp.int32)) - 1)[first]
    vid = new_of_old[vid]
    vid = jnp.where(vid < capacity, vid, capacity)

    # Blur neighbours: n1 along axis j of (r, q) is (r-1, q + e_j) for r >= 1 and
    # (d, q - 1 + e_j) for r = 0 (e_d = 0): a constant offset of the packed key per (r, j),
    # because the padded digit ranges never carry.
    vsrc = jnp.zeros((capacity + 1,), jnp.int32).at[vid].set(jnp.arange(p_total, dtype=jnp.int32), mode="drop")
    valid = jnp.arange(capacity + 1) < jnp.minimum(num_vertices, capacity)
    vhi, vlo, vr = khi[vsrc], klo[vsrc], digits[0][vsrc]
    dhi = np.zeros((dp1, dp1), np.int64)
    dlo = np.zeros((dp1, dp1), np.int64)
    for r in range(dp1):
        for j in range(dp1):
            delta = [(r - 1 if r >= 1 else d) - r] + [
                (0 if r >= 1 else -1) + (1 if (i == j and j < d) else 0) for i in range(d)
            ]
            whi, wlo = _pack_np(delta, radices, words)
            dhi[r, j], dlo[r, j] = whi, wlo
    # All d+1 axes at once: one search, one inverse scatter (also keeps the HLO small).
    nhi = vhi[None, :] + jnp.asarray(dhi.T, jnp.int32)[:, vr]  # [d+1, cap+1]
    nlo = vlo[None, :] + jnp.asarray(dlo.T, jnp.int32)[:, vr]
    nh = _hash32(nhi, nlo)
    ng = jnp.minimum(jnp.searchsorted(uh, nh.reshape(-1), method="scan"), p_total - 1).reshape(nh.shape)
    found = uh[ng] == nh
    is_r = found & (rep_hi[ng] == nhi) & (rep_lo[ng] == nlo)
    is_o = found & has2[ng] & (oth_hi[ng] == nhi) & (oth_lo[ng] == nlo)
    n1 = jnp.where(is_r | is_o, new_of_old[offset[ng] + is_o.astype(jnp.int32)], capacity)
    n1 = jnp.where(valid[None] & (n1 < capacity), n1, capacity).astype(jnp.int32)
    # n2 is the inverse map of n1 (key+1 / key_j - d undoes key-1 / key_j + d).
    rows = jnp.arange(capacity + 1, dtype=jnp.int32)
    src_v = jnp.where(n1 < capacity, rows[None, :], capacity)
    axis = jnp.arange(dp1, dtype=jnp.int32)[:, None]
    flat = jnp.where(n1 < capacity, axis * (capacity + 1) + n1, dp1 * (capacity + 1))
    n2 = jnp.full((dp1 * (capacity + 1),), capacity, jnp.int32).at[flat.reshape(-1)].set(src_v.reshape(-1), mode="drop")
    n2 = n2.reshape(dp1, capacity + 1)
    return Lattice(vid.reshape(n, dp1), weight, n1, n2, num_vertices)


def lattice_filter(lat: Lattice, values: jax.Array) -> jax.Array:
    """Splat, blur and slice `values` [N, C] through the lattice → [N, C] (pydensecrf `compute`)."""
    n, dp1 = lat.vertex.shape
    cap = lat.n1.shape[1] - 1
    c = values.shape[1]
    contrib = (lat.weight[:, :, None] * values[:, None, :]).reshape(n * dp1, c)
    grid = jnp.zeros((cap + 1, c), values.dtype).at[lat.vertex.reshape(-1)].add(contrib)
    grid = grid.at[cap].set(0.0)  # dropped (over-capacity) vertices must stay zero

    # The axis loop must stay a loop: unrolled, XLA:CPU fuses the six gather passes into one
    # loop fusion that recomputes each previous pass per element (measured 5x slower).
    def blur_axis(g: jax.Array, nbr: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        n1, n2 = nbr
        g = g + 0.5 * (g.at[n1].get(mode="promise_in_bounds") + g.at[n2].get(mode="promise_in_bounds"))
        return g.at[cap].set(0.0), None

    grid, _ = jax.lax.scan(blur_axis, grid, (lat.n1, lat.n2))
    d = dp1 - 1
    alpha = np.float32(1.0 / (1.0 + 2.0 ** (-d)))
    out = jnp.zeros((n, c), values.dtype)
    for r in range(dp1):
        out = out + lat.weight[:, r : r + 1] * grid.at[lat.vertex[:, r]].get(mode="promise_in_bounds")
    return out * alpha


@functools.lru_cache(maxsize=16)
def _fixed_lattice(height: int, width: int, sxy: float) -> tuple[Lattice, np.ndarray]:
    """pydensecrf's lattice for the position-only kernel of an H×W image, built once per shape.

    It depends on the image size only, so it is built on the host (outside any trace) at the
    overflow-free capacity and trimmed to its exact vertex count (its vertices already come in
    first-touch order from `build_lattice`). Measured at 320x320x27 on a 2-core CPU: 39 ms per
    filter vs 71 ms for the lattice built per image in hash order, plus the ~80 ms build saved
    per call. Returns the lattice as NumPy constants and the symmetric normaliser
    (L·1 + 1e-20)^-1/2.
    """
    n = height * width
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    feats = np.stack([xx / np.float32(sxy), yy / np.float32(sxy)], -1).reshape(n, 2)
    fmax = np.array([(width - 1) / sxy, (height - 1) / sxy])
    with jax.ensure_compile_time_eval():
        lat = jax.jit(lambda f: build_lattice(f, fmax, 6 * n))(jnp.asarray(feats))
        lat = jax.tree.map(np.asarray, lat)
    m = int(lat.num_vertices)

    def trim(nbr: np.ndarray) -> np.ndarray:  # rows past m are empty; the sentinel becomes m
        return np.where(nbr[:, : m + 1] < m, nbr[:, : m + 1], m).astype(np.int32)

    fixed = Lattice(lat.vertex, lat.weight, trim(lat.n1), trim(lat.n2), np.int32(m))
    with jax.ensure_compile_time_eval():
        norm = np.asarray(jax.lax.rsqrt(jax.jit(lattice_filter)(fixed, jnp.ones((n, 1), jnp.float32)) + 1e-20))
    return fixed, norm


def _gauss_conv(q: jax.Array, height: int, width: int, sigma: float) -> jax.Array:
    """Exact separable Gaussian (radius 3σ, zero outside the image) of q [H*W, C]."""
    rad = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2).astype(np.float32)
    x = q.reshape(height, width, -1)
    xp = jnp.pad(x, ((rad, rad), (0, 0), (0, 0)))
    x = sum(taps[k] * xp[k : k + height] for k in range(2 * rad + 1))
    xp = jnp.pad(x, ((0, 0), (rad, rad), (0, 0)))
    x = sum(taps[k] * xp[:, k : k + width] for k in range(2 * rad + 1))
    return x.reshape(height * width, -1)


def _features(image: jax.Array, sxy: float, srgb: float | None) -> jax.Array:
    h, w = image.shape[:2]
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    feats = [xx / np.float32(sxy), yy / np.float32(sxy)]
    if srgb is not None:
        bgr = image[..., ::-1].astype(jnp.float32)  # STEGO passes the image to pydensecrf as BGR
        feats += [bgr[..., i] / np.float32(srgb) for i in range(3)]
    return jnp.stack(feats, -1).reshape(h * w, -1)


def _unary(logits: jax.Array) -> jax.Array:
    return -jnp.log(jnp.clip(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), 1e-5, 1.0))


@jax.jit
def unary_from_logits(logits: jax.Array) -> jax.Array:
    """U = -log(clip(softmax(logits), 1e-5, 1)), [..., K] → [..., K] (pydensecrf.utils). Compiled
    once per shape."""
    return _unary(logits)


def official_rgb(images: np.ndarray) -> np.ndarray:
    """The uint8 RGB image the official dense CRF sees (official `src/crf.py` `dense_crf`): it gets
    the ImageNet-normalised float32 image, un-normalises it and turns it back into uint8 with
    torchvision's `to_pil_image` (`mul(255).byte()`, a truncation), which leaves some pixels one
    level darker than the original (about 7%). Evaluation and prediction give the CRF this image, as
    the official evaluation does."""
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    x = (np.asarray(images, np.float32) / np.float32(255) - mean) / std
    return ((x * std + mean) * np.float32(255)).astype(np.uint8)


def dense_crf(
    image: jax.Array,
    logits: jax.Array,
    *,
    iterations: int = MAX_ITER,
    pos_w: float = POS_W,
    pos_xy_std: float = POS_XY_STD,
    bi_w: float = BI_W,
    bi_xy_std: float = BI_XY_STD,
    bi_rgb_std: float = BI_RGB_STD,
    spatial: str = "lattice",
    method: str = "lattice",
    capacity: int | None = None,
    splits: tuple[int, ...] | None = None,
) -> jax.Array:
    """Mean-field dense CRF with STEGO's parameters: image [H,W,3] uint8 RGB, logits [H,W,K] → probs [H,W,K].

    method="lattice" replicates pydensecrf's permutohedral lattice for the bilateral kernel;
    spatial="lattice" (default) does the same for the σ=1 kernel, whose lattice depends on the
    image size only and is built once per shape: the same labels as pydensecrf on the benchmark
    photos. spatial="conv" uses the exact 7×7 separable Gaussian instead, a deliberate departure
    from pydensecrf's approximation of it (~99.8% argmax agreement, no faster end to end).
    method="exact" uses dense Gaussian kernels, O(N^2): a reference for tiny images only.
    `splits` (channel counts summing to K) runs independent label sets of one image together, e.g.
    (27, 27) for STEGO's cluster and linear probes: one lattice and one filtering pass for all,
    a softmax per set; each set's result equals its own `dense_crf` call up to float rounding.
    `capacity` is the static lattice size. Default: 1.5·H·W, redone at the overflow-free 6·H·W
    when exceeded (always 6·H·W below 8192 pixels). An explicit value skips that check: vertices
    past it are dropped.
    Called directly (e.g. on NumPy arrays) it runs one compiled program, built once per image
    shape, dtype and set of options (all options are static: plain Python values). Also
    jittable; `jax.vmap` over a batch of equally sized images.
    """
    return _dense_crf_jit(
        image, logits, iterations=int(iterations), pos_w=float(pos_w), pos_xy_std=float(pos_xy_std),
        bi_w=float(bi_w), bi_xy_std=float(bi_xy_std), bi_rgb_std=float(bi_rgb_std), spatial=spatial,
        method=method, capacity=None if capacity is None else int(capacity),
        splits=None if splits is None else tuple(int(x) for x in splits),
    )


def _dense_crf(
    image: jax.Array,
    logits: jax.Array,
    *,
    iterations: int,
    pos_w: float,
    pos_xy_std: float,
    bi_w: float,
    bi_xy_std: float,
    bi_rgb_std: float,
    spatial: str,
    method: str,
    capacity: int | None,
    splits: tuple[int, ...] | None,
) -> jax.Array:
    """`dense_crf`'s traceable body (its options are Python values)."""
    h, w, k = logits.shape
    if image.shape != (h, w, 3):
        raise ValueError(f"image shape {image.shape} does not match logits {logits.shape[:2]} + (3,)")
    if method not in ("lattice", "exact") or spatial not in ("conv", "lattice"):
        raise ValueError(f"method must be 'lattice'|'exact', spatial 'conv'|'lattice'; got {method!r}, {spatial!r}")
    n = h * w
    splits = (k,) if splits is None else tuple(int(x) for x in splits)
    if sum(splits) != k or min(splits) < 1:
        raise ValueError(f"splits {splits} must be positive channel counts summing to K={k}")
    cuts = list(np.cumsum(splits)[:-1])

    def per_set(fn: callable, x: jax.Array) -> jax.Array:
        return jnp.concatenate([fn(p) for p in jnp.split(x, cuts, axis=-1)], -1) if cuts else fn(x)

    softmax = functools.partial(per_set, functools.partial(jax.nn.softmax, axis=-1))
    unary = per_set(_unary, logits).reshape(n, k)
    f_pos = _features(image, pos_xy_std, None)
    f_bi = _features(image, bi_xy_std, bi_rgb_std)

    def mean_field(filt_pos: callable, filt_bi: callable, norm_pos: jax.Array | None = None) -> jax.Array:
        ones = jnp.ones((n, 1), jnp.float32)
        # NORMALIZE_SYMMETRIC: K̃Q = n ⊙ L(n ⊙ Q) with n = (L·1 + 1e-20)^-1/2.
        if norm_pos is None:
            norm_pos = jax.lax.rsqrt(filt_pos(ones) + 1e-20)
        norm_bi = jax.lax.rsqrt(filt_bi(ones) + 1e-20)

        def step(q: jax.Array, _: None) -> tuple[jax.Array, None]:
            # Potts: the message enters with a + sign (pydensecrf subtracts -w·K̃Q).
            msg = pos_w * norm_pos * filt_pos(norm_pos * q) + bi_w * norm_bi * filt_bi(norm_bi * q)
            return softmax(-unary + msg), None

        q, _ = jax.lax.scan(step, softmax(-unary), None, length=iterations)
        return q.reshape(h, w, k)

    if method == "exact":
        def dense(feat: jax.Array) -> callable:
            kern = jnp.exp(-0.5 * jnp.sum((feat[:, None, :] - feat[None, :, :]) ** 2, -1))
            return lambda v: kern @ v

        return mean_field(dense(f_pos), dense(f_bi))

    bi_max = np.array([(w - 1) / bi_xy_std, (h - 1) / bi_xy_std] + [255.0 / bi_rgb_std] * 3)

    def solve(cap: int) -> tuple[jax.Array, jax.Array]:
        lat_bi = build_lattice(f_bi, bi_max, cap)
        m = lat_bi.num_vertices
        if spatial == "lattice":
            lat_pos, norm_pos = _fixed_lattice(h, w, float(pos_xy_std))
            filt_pos = functools.partial(lattice_filter, lat_pos)
        else:
            filt_pos, norm_pos = functools.partial(_gauss_conv, height=h, width=w, sigma=pos_xy_std), None
        return mean_field(filt_pos, functools.partial(lattice_filter, lat_bi), norm_pos), m

    safe = 6 * n  # (d+1)·N vertices can never overflow
    if capacity is not None:
        return solve(int(capacity))[0]
    if n <= _SMALL:
        return solve(safe)[0]
    # Lattice work scales with the static capacity. Photos of 160x240 and up need 0.4-1.45·N
    # vertices, so try 1.5·N and redo the image at the safe size only if it overflowed (under
    # vmap both branches run: pass `capacity` there when the images are known to fit).
    fast = int(1.5 * n)
    q, m = solve(fast)
    return jax.lax.cond(m <= fast, lambda: q, lambda: solve(safe)[0])


_CRF_OPTIONS = ("iterations", "pos_w", "pos_xy_std", "bi_w", "bi_xy_std", "bi_rgb_std", "spatial",
                "method", "capacity", "splits")
# One compiled program per image shape/dtype and options; `dense_crf` normalises the options
# (ints, floats, a tuple of splits) so that equal options share it.
_dense_crf_jit = jax.jit(_dense_crf, static_argnames=_CRF_OPTIONS)


def dense_crf_batch(images: jax.Array, logits: jax.Array, **params) -> jax.Array:
    """`dense_crf` over a batch: images [B,H,W,3] uint8, logits [B,H,W,K] → probs [B,H,W,K].

    Runs the images one after another (`lax.map`): on CPU vmap gains nothing (the work is
    gather/scatter bound), and under vmap the capacity check's `cond` would run both branches.
    """
    return _batched(tuple(sorted(params.items())))(images, logits)


@functools.lru_cache(maxsize=32)
def _batched(params: tuple) -> callable:
    one = functools.partial(dense_crf, **dict(params))
    return jax.jit(lambda images, logits: jax.lax.map(lambda a: one(*a), (images, logits)))


# ----------------------------------------------------------------------------------------------
# pydensecrf2 backend (host, process pool)


def _pydensecrf_one(image: np.ndarray, logits: np.ndarray, iterations: int = MAX_ITER) -> np.ndarray:
    """pydensecrf2 with STEGO's call: image [H,W,3] uint8 RGB, logits [H,W,K] → probs [H,W,K]."""
    import pydensecrf.densecrf as dcrf

    h, w, k = logits.shape
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    unary = np.ascontiguousarray((-np.log(np.clip(p, 1e-5, 1.0))).reshape(-1, k).T, dtype=np.float32)
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=POS_XY_STD, compat=POS_W)
    crf.addPairwiseBilateral(
        sxy=BI_XY_STD, srgb=BI_RGB_STD, rgbim=np.ascontiguousarray(image[..., ::-1]), compat=BI_W
    )
    q = np.asarray(crf.inference(iterations), np.float32)
    return q.T.reshape(h, w, k)


def _pydensecrf_labels(args: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return _pydensecrf_one(*args).argmax(-1).astype(np.int32)


_POOLS: dict[int, multiprocessing.pool.Pool] = {}


def _pool(processes: int) -> multiprocessing.pool.Pool:
    """A spawn-context pool kept for the life of the process (startup costs ~1 s per worker)."""
    pool = _POOLS.get(processes)
    if pool is None:
        pool = _POOLS[processes] = multiprocessing.get_context("spawn").Pool(processes)
        atexit.register(pool.terminate)
    return pool


def crf_labels(
    images: np.ndarray | jax.Array,
    logits: np.ndarray | jax.Array | Sequence[np.ndarray | jax.Array],
    *,
    backend: str = "jax",
    processes: int = 1,
    timeout_s: float = 300.0,
) -> np.ndarray | list[np.ndarray]:
    """CRF-refined labels: images [B,H,W,3] uint8 RGB, logits [B,H,W,K] → int32 [B,H,W].

    `logits` may be a list of label sets for the same images (e.g. [cluster, linear]): a list of
    label arrays comes back, and the jax backend refines them together over one lattice.
    backend="jax" runs `dense_crf_batch`; backend="pydensecrf" runs pydensecrf2 on the host,
    over a spawn-context process pool (kept between calls) of `processes` workers (0: one per
    CPU core) when that is more than one; each task has
    `timeout_s`; if the pool fails or times out it is dropped with a warning and the batch
    finishes serially, which cannot hang.
    """
    if isinstance(logits, (list, tuple)):
        sets = [np.asarray(x, np.float32) for x in logits]
        if backend == "jax":
            splits = tuple(x.shape[-1] for x in sets)
            probs = dense_crf_batch(jnp.asarray(images), jnp.asarray(np.concatenate(sets, -1)), splits=splits)
            return [np.asarray(jnp.argmax(p, -1), np.int32) for p in jnp.split(probs, np.cumsum(splits)[:-1], -1)]
        return [crf_labels(images, x, backend=backend, processes=processes, timeout_s=timeout_s) for x in sets]
    if backend == "jax":
        probs = dense_crf_batch(jnp.asarray(images), jnp.asarray(logits))
        return np.asarray(jnp.argmax(probs, -1), np.int32)
    if backend != "pydensecrf":
        raise ValueError(f"backend must be 'jax' or 'pydensecrf', got {backend!r}")
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "backend='pydensecrf' needs pydensecrf2: pip install stego_jax[crf]"
        ) from e
    tasks = [(np.asarray(i, np.uint8), np.asarray(l, np.float32)) for i, l in zip(images, logits)]
    processes = processes or os.cpu_count() or 1
    if processes > 1 and len(tasks) > 1:
        # spawn: fork can deadlock with JAX's threads (the hangs of STEGO issues #12/#16/#34);
        # per-task timeouts plus terminate() mean the pool can fail but never hang.
        try:
            pool = _pool(processes)
            jobs = [pool.apply_async(_pydensecrf_labels, (t,)) for t in tasks]
            return np.stack([j.get(timeout=timeout_s) for j in jobs])
        except Exception as e:  # noqa: BLE001 — any pool failure: finish serially
            warnings.warn(f"pydensecrf process pool failed ({e!r}); running serially", RuntimeWarning)
            bad = _POOLS.pop(processes, None)
            if bad is not None:
                bad.terminate()
    return np.stack([_pydensecrf_labels(t) for t in tasks])
