"""STEGO losses as pure functions: bilinear point sampling, feature/code correlations, the
correspondence-distillation loss, and the cluster- and linear-probe losses.

Each public function is compiled (`jax.jit`, options that set shapes or branches static), so a
direct call runs one program per shape and options; inside a caller's jit or grad they trace
as usual.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from stego_jax.ops import interp_matrix, norm

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weight and shift (bias ``b``) of each of the three correspondence terms.

    A pytree of six leaves: the values are traced (jit arguments), so other values reuse the
    compiled loss, and they can be batched or differentiated (e.g. by a hyper-parameter sweep).
    """

    pos_intra_weight: float | Array
    pos_inter_weight: float | Array
    neg_inter_weight: float | Array
    pos_intra_shift: float | Array
    pos_inter_shift: float | Array
    neg_inter_shift: float | Array

    @classmethod
    def from_config(cls, loss_config: Any) -> LossWeights:
        """From ``config.loss`` (the ``<term>_weight`` / ``<term>_shift`` entries ``set_loss``
        writes); numbers become Python floats, arrays (e.g. traced sweep values) are kept."""
        value = lambda v: v if isinstance(v, jax.Array) else float(v)  # noqa: E731
        return cls(**{f.name: value(loss_config[f.name]) for f in dataclasses.fields(cls)})


@jax.jit
def tensor_correlation(a: Array, b: Array) -> Array:
    """All-pairs dot products between two maps: ``a [B,H,W,C], b [B,I,J,C] -> [B,H,W,I,J]``."""
    return jnp.einsum("bhwc,bijc->bhwij", a, b)


def _sample(t: Array, coords: Array, batch_idx: Array | None = None) -> Array:
    """`sample`; output ``n`` reads batch element ``batch_idx[n]`` of ``t`` (default ``n``)."""
    n, hs, ws, _ = coords.shape
    _, h, w, _ = t.shape
    # The official code feeds grid_sample with coords.permute(0, 2, 1, 3): output (i, j) reads
    # coords[:, j, i]. Irrelevant for i.i.d. random coords, but kept for exact equivalence.
    grid = jnp.swapaxes(coords, 1, 2).astype(t.dtype)
    # align_corners=True: -1 and +1 are the centres of the first and last pixels; border padding
    # clamps the source position into the image before interpolating.
    ix = jnp.clip((grid[..., 0] + 1) * 0.5 * (w - 1), 0, w - 1)
    iy = jnp.clip((grid[..., 1] + 1) * 0.5 * (h - 1), 0, h - 1)
    x0f = jnp.floor(ix)
    y0f = jnp.floor(iy)
    wx = (ix - x0f)[..., None]
    wy = (iy - y0f)[..., None]
    x0 = x0f.astype(jnp.int32)
    y0 = y0f.astype(jnp.int32)
    # At the far border the "+1" neighbour has weight 0; clamping it keeps the gather in range.
    x1 = jnp.minimum(x0 + 1, w - 1)
    y1 = jnp.minimum(y0 + 1, h - 1)
    if batch_idx is None:
        batch_idx = jnp.arange(n)
    base = (batch_idx.astype(jnp.uint32) * h)[:, None, None]
    x0, x1, y0, y1 = (v.astype(jnp.uint32) for v in (x0, x1, y0, y1))
    rows = jnp.stack([(base + y0) * w + x0, (base + y0) * w + x1,
                      (base + y1) * w + x0, (base + y1) * w + x1], axis=-1)
    # One gather of the four neighbours' rows, with its indices computed beforehand: left to
    # itself XLA:CPU fuses the index arithmetic into each of four gathers and redoes it for every
    # channel, which made the sampling a third of the cached train step.
    rows = jax.lax.optimization_barrier(rows)
    v = jnp.asarray(t).reshape(-1, t.shape[-1]).at[rows].get(mode="promise_in_bounds")
    v00, v01, v10, v11 = v[..., 0, :], v[..., 1, :], v[..., 2, :], v[..., 3, :]
    top = v00 * (1 - wx) + v01 * wx
    bottom = v10 * (1 - wx) + v11 * wx
    return top * (1 - wy) + bottom * wy


@jax.jit
def sample(t: Array, coords: Array) -> Array:
    """Bilinear sampling of a feature map at continuous points, as the official STEGO `sample`.

    Equals ``F.grid_sample(t, coords.permute(0, 2, 1, 3), mode='bilinear', padding_mode='border',
    align_corners=True)`` in NHWC: because of the official permute, ``out[b, i, j]`` is ``t[b]``
    read at point ``coords[b, j, i]`` (the sample grid is transposed).

    Args:
      t: ``[B, H, W, C]``.
      coords: ``[B, h, w, 2]`` as ``(x, y)`` in ``[-1, 1]``; x indexes W, y indexes H; -1/+1 are the
        centres of the first/last pixels; points outside are clamped to the border.
    Returns:
      ``[B, w, h, C]`` (``[B, h, w, C]`` for the square grids STEGO uses).
    """
    if coords.shape[0] != t.shape[0] or coords.shape[-1] != 2:
        raise ValueError(
            f"sample: need t [B,H,W,C] and coords [B,h,w,2], got {t.shape}, {coords.shape}"
        )
    return _sample(t, coords)


@functools.partial(jax.jit, static_argnames=("pointwise", "zero_clamp", "stabilize"))
def correspondence_term(
    f1: Array,
    f2: Array,
    c1: Array,
    c2: Array,
    shift: float | Array,
    *,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> tuple[Array, Array]:
    """One term of the correspondence loss (official ``ContrastiveCorrelationLoss.helper``).

    ``loss = -clip(S, min_val[, 0.8]) * (F - shift)`` with ``F`` the cosine correlation of the
    features (no gradient; with ``pointwise`` each query row is centred over the partner points and
    the global mean is then added back, as in the official code, unlike the paper's pure centring)
    and ``S`` the cosine correlation of the codes.

    Args:
      f1: ``[B, H, W, D]`` features of the first image (already sampled).
      f2: ``[B, I, J, D]`` features of the second image.
      c1: ``[B, H, W, K]`` codes at the same points as ``f1``.
      c2: ``[B, I, J, K]`` codes at the same points as ``f2``.
      shift: the term's bias ``b``.
      pointwise: spatial centring of ``F`` (official default True).
      zero_clamp: clamp ``S`` below at 0 (else at -9999, i.e. effectively not at all).
      stabilize: also clamp ``S`` above at 0.8 (official ``stabalize``).
    Returns:
      ``(loss, cd)``, both ``[B, H, W, I, J]``; ``cd`` is ``S`` before clamping.
    """
    b, h, w, _ = c1.shape
    _, i, j, _ = c2.shape
    loss, cd = _term(*(x.reshape(x.shape[0], -1, x.shape[-1]) for x in (f1, f2, c1, c2)), shift,
                     pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize)
    return loss.reshape(b, h, w, i, j), cd.reshape(b, h, w, i, j)


def _term(f1, f2, c1, c2, shift, *, pointwise, zero_clamp, stabilize):
    """`correspondence_term` on flattened points, ``[B,P,D], [B,Q,D] -> [B,P,Q]``.

    The work is done with the points of each map on one axis: differentiating the 5-d
    ``[B,H,W,I,J]`` layout made XLA:CPU transpose those arrays in the backward pass, which cost
    half the sweep/cached train step (same numbers up to float summation order)."""
    fd = jax.lax.stop_gradient(jnp.einsum("bpc,bqc->bpq", norm(f1), norm(f2)))
    if pointwise:
        old_mean = jnp.mean(fd)
        fd = fd - jnp.mean(fd, axis=2, keepdims=True)
        fd = fd - jnp.mean(fd) + old_mean
    cd = jnp.einsum("bpc,bqc->bpq", norm(c1), norm(c2))
    min_val = 0.0 if zero_clamp else -9999.0
    # torch.clamp's gradient is 1 where min <= cd <= max, ties included (jnp.maximum/clip give 1/2
    # at a tie); a select has exactly that gradient, and is cheaper to differentiate.
    if stabilize:
        clamped = jnp.where((cd >= min_val) & (cd <= 0.8), cd, jnp.clip(cd, min_val, 0.8))
    else:
        clamped = jnp.where(cd >= min_val, cd, min_val)
    loss = -clamped * (fd - shift)
    return loss, cd


@functools.partial(jax.jit, static_argnames=("n",))
def super_perm(key: Array, n: int) -> Array:
    """Random map of ``range(n)`` onto itself with no fixed points (official ``super_perm``).

    A random permutation whose fixed points ``i`` are sent to ``(i + 1) % n``; hence never
    ``perm[i] == i`` (for ``n >= 2``) but collisions are possible: it is not a bijection.

    Returns:
      int32 ``[n]``.
    """
    perm = jax.random.permutation(key, n).astype(jnp.int32)
    ar = jnp.arange(n, dtype=jnp.int32)
    return jnp.where(perm == ar, perm + 1, perm) % n


@functools.partial(jax.jit, static_argnames=("pointwise", "zero_clamp", "stabilize"))
def correspondence_loss_given_draws(
    feats: Array,
    feats_pos: Array,
    code: Array,
    code_pos: Array,
    coords1: Array,
    coords2: Array,
    neg_perms: Array,
    weights: LossWeights,
    *,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """`stego_correspondence_loss` with its random draws given explicitly (for tests and reuse).

    Args:
      feats, feats_pos: ``[B, h, w, C]`` full feature maps of the anchor and its KNN partner.
      code, code_pos: ``[B, h, w, K]`` their codes.
      coords1, coords2: ``[B, S, S, 2]`` sample points (see `sample`) for anchor and partner.
      neg_perms: int ``[N, B]``, one anchor-batch index map per negative draw.
      weights: the terms' weights and shifts.
    Returns:
      ``(loss, aux)``: scalar total loss and a dict of scalar means of each term's loss and cd.
    """
    term = lambda f1, f2, c1, c2, s: _term(  # noqa: E731
        f1, f2, c1, c2, s, pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize
    )
    # Sampled points flattened to [B, S*S, C]: the terms work on that layout (see `_term`).
    flat = lambda x: x.reshape(x.shape[0], -1, x.shape[-1])  # noqa: E731
    n_neg = neg_perms.shape[0]
    f_s = flat(_sample(feats, coords1))
    c_s = flat(_sample(code, coords1))
    fp_s = flat(_sample(feats_pos, coords2))
    cp_s = flat(_sample(code_pos, coords2))

    intra_loss, intra_cd = term(f_s, f_s, c_s, c_s, weights.pos_intra_shift)
    inter_loss, inter_cd = term(f_s, fp_s, c_s, cp_s, weights.pos_inter_shift)

    # All negative draws at once: row n*B + b reads anchor element neg_perms[n, b] at coords2[b];
    # gathering by index avoids materialising feats[perm] (N full feature maps).
    idx = neg_perms.reshape(-1).astype(jnp.int32)
    coords2_rep = jnp.tile(coords2, (n_neg, 1, 1, 1))
    split = lambda x: x.reshape(n_neg, -1, *x.shape[1:])  # noqa: E731
    fn_s = split(flat(_sample(feats, coords2_rep, idx)))
    cn_s = split(flat(_sample(code, coords2_rep, idx)))
    # vmap, not one big batch: with `pointwise` the global mean added back to F is per draw in the
    # official code (one helper call per draw), so draws must not share it.
    neg_term = lambda fn, cn: term(f_s, fn, c_s, cn, weights.neg_inter_shift)  # noqa: E731
    neg_loss, neg_cd = jax.vmap(neg_term)(fn_s, cn_s)

    aux = {
        "pos_intra_loss": jnp.mean(intra_loss),
        "pos_inter_loss": jnp.mean(inter_loss),
        "neg_inter_loss": jnp.mean(neg_loss),
        "pos_intra_cd": jnp.mean(intra_cd),
        "pos_inter_cd": jnp.mean(inter_cd),
        "neg_inter_cd": jnp.mean(neg_cd),
    }
    total = (
        weights.pos_inter_weight * aux["pos_inter_loss"]
        + weights.pos_intra_weight * aux["pos_intra_loss"]
        + weights.neg_inter_weight * aux["neg_inter_loss"]
    )
    return total, aux


@functools.partial(
    jax.jit,
    static_argnames=("feature_samples", "neg_samples", "pointwise", "zero_clamp", "stabilize"),
)
def stego_correspondence_loss(
    key: Array,
    feats: Array,
    feats_pos: Array,
    code: Array,
    code_pos: Array,
    weights: LossWeights,
    *,
    feature_samples: int = 11,
    neg_samples: int = 5,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """The STEGO correspondence loss (official ``ContrastiveCorrelationLoss`` and its weighting).

    ``loss = pos_inter_weight * mean(L_knn) + pos_intra_weight * mean(L_self)
    + neg_inter_weight * mean(L_neg)`` (weights from `LossWeights`): self term (anchor vs itself
    at the same S x S points), KNN term (anchor vs its partner), and ``neg_samples``
    random-negative terms, each pairing every anchor with another element of the *anchor* batch
    (`super_perm`) sampled at the partner points. The official multiplier
    ``correspondence_weight`` is left to the caller.

    Args:
      key: PRNG key; all draws (points and negative maps) derive from it deterministically.
      feats, feats_pos: ``[B, h, w, C]`` backbone features of the anchor and KNN images.
      code, code_pos: ``[B, h, w, K]`` head codes.
      weights: the terms' weights and shifts (`LossWeights.from_config(config.loss)`).
      feature_samples: S, points per side of the random sample grid (S*S points per image).
      neg_samples: number of random-negative draws.
    Returns:
      ``(loss, aux)``: scalar loss; ``aux`` maps ``{pos_intra,pos_inter,neg_inter}_{loss,cd}`` to
      scalar means (for logging).
    Raises:
      ValueError: if ``B < 2`` (negatives need another image in the batch), or no samples/draws.
    """
    b = feats.shape[0]
    if b < 2:
        raise ValueError(
            f"stego_correspondence_loss needs a batch of at least 2 for negatives, got B={b}"
        )
    if feature_samples < 1 or neg_samples < 1:
        raise ValueError(
            "stego_correspondence_loss: feature_samples and neg_samples must be >= 1, got "
            f"{feature_samples}, {neg_samples}"
        )
    k1, k2, kn = jax.random.split(key, 3)
    shape = (b, feature_samples, feature_samples, 2)
    coords1 = jax.random.uniform(k1, shape, feats.dtype, -1.0, 1.0)
    coords2 = jax.random.uniform(k2, shape, feats.dtype, -1.0, 1.0)
    neg_perms = jax.vmap(lambda k: super_perm(k, b))(jax.random.split(kn, neg_samples))
    return correspondence_loss_given_draws(
        feats, feats_pos, code, code_pos, coords1, coords2, neg_perms, weights,
        pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize,
    )


@jax.jit
def cluster_probe_loss(cos: Array) -> Array:
    """Hard-assignment cosine k-means loss (official ``ClusterLookup`` with ``alpha=None``).

    Args:
      cos: ``[..., K]`` cosine similarity of each code to each centroid.
    Returns:
      scalar ``-mean over pixels of cos[argmax cos]``.
    """
    k = jnp.argmax(cos, axis=-1)
    best = jnp.take_along_axis(cos, k[..., None], axis=-1)[..., 0]
    return -jnp.mean(best)


@functools.partial(jax.jit, static_argnames=("n_classes",))
def linear_probe_loss(logits: Array, labels: Array, n_classes: int) -> Array:
    """Cross-entropy of the linear probe on the valid pixels (official linear-probe loss).

    Logits are upsampled bilinearly (align_corners=False) to the label size first; pixels with a
    label outside ``[0, n_classes)`` are ignored.

    Args:
      logits: ``[B, h, w, n_classes]``.
      labels: int ``[B, H, W]``.
      n_classes: number of classes.
    Returns:
      scalar mean cross-entropy over valid pixels; 0 if there is none. (Deliberate difference:
      the official CrossEntropyLoss on an empty selection returns NaN.)
    """
    return _upsampled_cross_entropy(logits, labels, n_classes)


# The linear probe's loss, written out with its gradient: its work is all at label resolution
# (B x H x W x n_classes logits, e.g. 16 x 224 x 224 x 27 per step), where autodiff of
# resize + log_softmax + pick kept the upsampled logits channels-last (27 on the minor axis) and
# moved them between layouts: 36% of a cached sweep step at the paper's shapes. Here the upsampling
# is two matmuls with the interpolation matrices producing channel-first maps [B, C, H, W], and the
# max, the sum of exponentials and the label's pick are elementwise over the C planes (one fused
# pass each, vectorised along W; a reduction over the C axis was 3x slower). The gradient is
# softmax - one-hot at the valid pixels over their count, resized back (the transpose of the
# upsampling); only the log-sum-exp is kept for it. Same values up to float summation order
# (tests: NumPy loss and its central differences). Measured on the 2-core CPU at the paper's
# shapes: cached train step 457 -> 408 ms, a 16-setting sweep step 7.0 -> 6.2 s.

def _upsample_cf(z_cf: Array, hw: tuple[int, int]) -> Array:
    """``[B, C, h, w] -> [B, C, H, W]``, `upsample_bilinear` as two matmuls (full float32 precision,
    as `jax.image.resize` contracts)."""
    mh = jnp.asarray(interp_matrix(hw[0], z_cf.shape[2]))
    mw = jnp.asarray(interp_matrix(hw[1], z_cf.shape[3]))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("Hh,bchw->bcHw", mh, z_cf, precision=hi)
    return jnp.einsum("bcHw,Ww->bcHW", x, mw, precision=hi)


def _downsample_cf(d: Array, hw: tuple[int, int]) -> Array:
    """The transpose of `_upsample_cf` to size ``hw`` = (h, w): ``[B, C, H, W] -> [B, C, h, w]``."""
    mh = jnp.asarray(interp_matrix(d.shape[2], hw[0]))
    mw = jnp.asarray(interp_matrix(d.shape[3], hw[1]))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("bcHW,Ww->bcHw", d, mw, precision=hi)
    return jnp.einsum("Hh,bcHw->bchw", mh, x, precision=hi)


def _label_planes(labels: Array, n_classes: int, n_planes: int) -> tuple[Array, Array]:
    """(valid [B,H,W]: labels in [0, n_classes), one-hot [B,n_planes,H,W] bool of the valid labels)."""
    valid = (labels >= 0) & (labels < n_classes)
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    return valid, safe[:, None] == jnp.arange(n_planes, dtype=jnp.int32)[None, :, None, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _upsampled_cross_entropy(logits: Array, labels: Array, n_classes: int) -> Array:
    return _upsampled_cross_entropy_fwd(logits, labels, n_classes)[0]


def _upsampled_cross_entropy_fwd(logits, labels, n_classes):
    z_cf = jnp.moveaxis(logits, -1, 1)
    x = _upsample_cf(z_cf, labels.shape[1:3])
    planes = [x[:, c] for c in range(x.shape[1])]
    m = functools.reduce(jnp.maximum, planes)
    lse = m + jnp.log(functools.reduce(jnp.add, [jnp.exp(p - m) for p in planes]))
    valid, onehot = _label_planes(labels, n_classes, x.shape[1])
    # The label's logit picked by a select (exact: one term, the others 0), not a gather.
    picked = functools.reduce(jnp.add, [jnp.where(onehot[:, c], p, 0.0) for c, p in enumerate(planes)])
    count = jnp.maximum(jnp.sum(valid), 1).astype(x.dtype)
    loss = jnp.sum(jnp.where(valid, lse - picked, 0.0)) / count
    return loss, (z_cf, labels, lse, count)


def _upsampled_cross_entropy_bwd(n_classes, residuals, g):
    z_cf, labels, lse, count = residuals
    x = _upsample_cf(z_cf, labels.shape[1:3])
    valid, onehot = _label_planes(labels, n_classes, x.shape[1])
    scale = jnp.where(valid, g / count, 0.0)[:, None]
    d = (jnp.exp(x - lse[:, None]) - onehot.astype(x.dtype)) * scale
    d_logits = jnp.moveaxis(_downsample_cf(d, z_cf.shape[2:4]), 1, -1)
    return d_logits, None


_upsampled_cross_entropy.defvjp(_upsampled_cross_entropy_fwd, _upsampled_cross_entropy_bwd)
