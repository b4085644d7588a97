"""Losses against independent NumPy references (loops, explicit formulas) and finite differences."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stego_jax import losses, ops

WEIGHTS = dict(
    pos_intra_weight=0.67, pos_inter_weight=0.25, neg_inter_weight=0.63,
    pos_intra_shift=0.18, pos_inter_shift=0.12, neg_inter_shift=0.46,
)
LOSS_WEIGHTS = losses.LossWeights(**WEIGHTS)


# ---------------------------------------------------------------- NumPy references


def np_sample(t, coords):
    """grid_sample(bilinear, border, align_corners=True) on coords transposed, via a tent kernel."""
    b_, h, w, c = t.shape
    _, hs, ws, _ = coords.shape
    out = np.zeros((b_, ws, hs, c))
    for b in range(b_):
        for i in range(ws):
            for j in range(hs):
                x, y = coords[b, j, i]  # the official permute(0, 2, 1, 3)
                ix = min(max((x + 1) / 2 * (w - 1), 0.0), w - 1)
                iy = min(max((y + 1) / 2 * (h - 1), 0.0), h - 1)
                for p in range(h):
                    for q in range(w):
                        wgt = max(0.0, 1 - abs(iy - p)) * max(0.0, 1 - abs(ix - q))
                        out[b, i, j] += wgt * t[b, p, q]
    return out


def np_cos(a, b, eps=1e-10):
    """[B,H,W,C], [B,I,J,C] -> [B,H,W,I,J] cosine, by explicit loops over the pairs."""
    B, H, W, _ = a.shape
    _, I, J, _ = b.shape
    out = np.zeros((B, H, W, I, J))
    for n, h, w, i, j in itertools.product(range(B), range(H), range(W), range(I), range(J)):
        u, v = a[n, h, w], b[n, i, j]
        out[n, h, w, i, j] = u @ v / (max(np.sqrt(u @ u), eps) * max(np.sqrt(v @ v), eps))
    return out


def np_term(f1, f2, c1, c2, shift, pointwise=True, zero_clamp=True, stabilize=False):
    fd = np_cos(f1, f2)
    if pointwise:
        B, H, W, I, J = fd.shape
        glob = fd.sum() / fd.size
        cen = np.empty_like(fd)
        for n, h, w in itertools.product(range(B), range(H), range(W)):
            cen[n, h, w] = fd[n, h, w] - fd[n, h, w].sum() / (I * J)
        fd = cen - cen.sum() / cen.size + glob
    cd = np_cos(c1, c2)
    lo = 0.0 if zero_clamp else -9999.0
    s = np.where(cd < lo, lo, cd)
    if stabilize:
        s = np.where(s > 0.8, 0.8, s)
    return -s * (fd - shift), cd


def np_full_loss(feats, feats_pos, code, code_pos, coords1, coords2, perms, w, **flags):
    fs, cs = np_sample(feats, coords1), np_sample(code, coords1)
    fps, cps = np_sample(feats_pos, coords2), np_sample(code_pos, coords2)
    intra, intra_cd = np_term(fs, fs, cs, cs, w["pos_intra_shift"], **flags)
    inter, inter_cd = np_term(fs, fps, cs, cps, w["pos_inter_shift"], **flags)
    negs, neg_cds = [], []
    for perm in perms:
        fn = np_sample(feats[perm], coords2)
        cn = np_sample(code[perm], coords2)
        l, c = np_term(fs, fn, cs, cn, w["neg_inter_shift"], **flags)
        negs.append(l)
        neg_cds.append(c)
    neg, neg_cd = np.concatenate(negs), np.concatenate(neg_cds)
    total = (w["pos_inter_weight"] * inter.mean() + w["pos_intra_weight"] * intra.mean()
             + w["neg_inter_weight"] * neg.mean())
    aux = dict(pos_intra_loss=intra.mean(), pos_inter_loss=inter.mean(),
               neg_inter_loss=neg.mean(), pos_intra_cd=intra_cd.mean(),
               pos_inter_cd=inter_cd.mean(), neg_inter_cd=neg_cd.mean())
    return total, aux


def np_resize_bilinear(x, H, W):
    """F.interpolate(bilinear, align_corners=False): half-pixel centres, source clamped at 0."""
    B, h, w, C = x.shape

    def taps(n_in, n_out):
        res = []
        for d in range(n_out):
            s = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = int(np.floor(s))
            i1 = min(i0 + 1, n_in - 1)
            res.append((i0, i1, s - i0))
        return res

    out = np.zeros((B, H, W, C))
    rows, cols = enumerate(taps(h, H)), enumerate(taps(w, W))
    for (i, (y0, y1, ly)), (j, (x0, x1, lx)) in itertools.product(rows, cols):
        out[:, i, j] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                        + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
    return out


# ---------------------------------------------------------------- sample / norm


def test_sample_matches_numpy_reference_incl_border_and_transpose():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(2, 3, 5, 2)).astype(np.float32)
    coords = rng.uniform(-1.4, 1.4, size=(2, 4, 3, 2)).astype(np.float32)  # some outside [-1, 1]
    coords[0, 0, 0] = [1.0, 1.0]
    coords[0, 1, 2] = [-1.0, 1.0]
    coords[1, 3, 1] = [1.0, -1.0]
    got = np.asarray(losses.sample(jnp.asarray(t), jnp.asarray(coords)))
    assert got.shape == (2, 3, 4, 2)  # [B, w, h, C] for coords [B, h, w, 2]
    np.testing.assert_allclose(got, np_sample(t, coords), atol=1e-5)


def test_sample_pixel_centre_grid_is_identity():
    # coords[m, n] = (x_m, y_n) with x over W and y over H: through the official transpose this
    # (row, col)-ordered grid reads every pixel centre back in place.
    rng = np.random.default_rng(1)
    t = rng.normal(size=(1, 3, 5, 4)).astype(np.float32)
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-1, 1, 3)
    coords = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1)[None].astype(np.float32)
    got = losses.sample(jnp.asarray(t), jnp.asarray(coords))
    np.testing.assert_allclose(np.asarray(got), t, atol=1e-6)


def test_sample_rejects_bad_shapes():
    with pytest.raises(ValueError, match="coords"):
        losses.sample(jnp.zeros((2, 3, 3, 1)), jnp.zeros((1, 2, 2, 2)))


def test_norm_matches_f_normalize_and_has_finite_grad_at_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-12, 0.0]], np.float32)
    got = np.asarray(ops.norm(jnp.asarray(x)))
    ref = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-10)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    g = jax.grad(lambda v: ops.norm(v).sum())(jnp.zeros((3,)))
    assert np.all(np.isfinite(np.asarray(g)))


def test_tensor_correlation_matches_loops():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 2, 3, 4)), rng.normal(size=(2, 3, 2, 4))
    ref = np.zeros((2, 2, 3, 3, 2))
    for n, h, w, i, j in itertools.product(range(2), range(2), range(3), range(3), range(2)):
        ref[n, h, w, i, j] = sum(a[n, h, w, c] * b[n, i, j, c] for c in range(4))
    got = losses.tensor_correlation(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


# ---------------------------------------------------------------- correspondence term


def _term_inputs(seed=3):
    rng = np.random.default_rng(seed)
    f1, f2 = rng.normal(size=(2, 3, 3, 5)), rng.normal(size=(2, 2, 3, 5))
    c1 = rng.normal(size=(2, 3, 3, 4))
    c2 = rng.normal(size=(2, 2, 3, 4))
    c2[:, 0, 0] = c1[:, 0, 0] + 0.01  # ensure some code cosines above 0.8 (stabilize branch)
    return [x.astype(np.float32) for x in (f1, f2, c1, c2)]


@pytest.mark.parametrize(
    "flags",
    [dict(), dict(pointwise=False), dict(zero_clamp=False), dict(stabilize=True),
     dict(pointwise=False, zero_clamp=False, stabilize=True)],
)
def test_correspondence_term_matches_numpy(flags):
    f1, f2, c1, c2 = _term_inputs()
    term = jax.jit(lambda *a: losses.correspondence_term(*a, 0.3, **flags))
    loss, cd = term(*map(jnp.asarray, (f1, f2, c1, c2)))
    ref_loss, ref_cd = np_term(f1, f2, c1, c2, 0.3, **flags)
    assert loss.shape == cd.shape == (2, 3, 3, 2, 3)
    np.testing.assert_allclose(np.asarray(cd), ref_cd, atol=1e-5)
    np.testing.assert_allclose(np.asarray(loss), ref_loss, atol=1e-5)
    if flags:  # the data exercise every branch: each flag changes the reference result
        assert not np.allclose(ref_loss, np_term(f1, f2, c1, c2, 0.3)[0])
    else:
        assert (ref_cd < 0).any() and (ref_cd > 0.8).any()
        assert np.all(np.asarray(loss)[ref_cd < 0] == 0)  # zero clamp: negative-cos pairs inert


def test_correspondence_term_clamp_gradient_is_torch_clamp_at_ties():
    # torch.clamp(x, min[, max]) passes the gradient where min <= x <= max, ties included. Codes
    # at exactly 0 cosine (orthogonal) and exactly 0.8 (stabilize) are the ties: the gradient of
    # -clamp(cd) * (fd - shift) w.r.t. c1 is then -(fd - shift) * d(cd)/d(c1), in closed form.
    f1 = jnp.asarray([[[[1.0, 0.0]]]])
    f2 = jnp.asarray([[[[0.6, 0.8]]]])  # fd = 0.6
    c2 = jnp.asarray([[[[0.0, 1.0]]]])
    shift = 0.25
    for c1_vec, flags in (([1.0, 0.0], {}), ([0.6, 0.8], {"stabilize": True})):
        c1 = jnp.asarray([[[c1_vec]]])
        grad = jax.grad(lambda c: jnp.sum(losses.correspondence_term(f1, f2, c, c2, shift, **flags)[0]))(c1)
        a, b = np.asarray(c1_vec), np.array([0.0, 1.0])
        cos = a @ b
        assert cos in (0.0, 0.8)
        dcos = b - cos * a  # unit vectors: d cos(a, b) / d a
        np.testing.assert_allclose(np.asarray(grad).reshape(2), -(0.6 - shift) * dcos, atol=1e-6)


# ---------------------------------------------------------------- super_perm


@pytest.mark.parametrize("n", [3, 16])
def test_super_perm_no_fixed_points_and_matches_rule(n):
    keys = jax.random.split(jax.random.key(0), 64)
    draw = jax.jit(jax.vmap(lambda k: (losses.super_perm(k, n), jax.random.permutation(k, n))))
    perms, raw = map(np.asarray, draw(keys))
    assert perms.dtype == np.int32 and perms.shape == (64, n)
    ar = np.arange(n)
    assert np.all(perms != ar) and perms.min() >= 0 and perms.max() < n
    # the official rule applied to the same permutation: fixed point i -> (i + 1) % n
    ref = np.array([[(i + 1) % n if p[i] == i else p[i] for i in range(n)] for p in raw])
    np.testing.assert_array_equal(perms, ref)
    assert len({tuple(p) for p in perms}) > 1
    if n == 3:  # not a bijection: repeated targets must occur across 64 draws
        assert any(len(set(p)) < n for p in perms)


# ---------------------------------------------------------------- full loss


def _full_inputs(seed=4, B=3, hw=(4, 5), C=6, K=4, S=3, n_neg=2):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(B, *hw, C))
    feats_pos = rng.normal(size=(B, *hw, C))
    code = rng.normal(size=(B, *hw, K))
    code_pos = rng.normal(size=(B, *hw, K))
    coords1 = rng.uniform(-1, 1, size=(B, S, S, 2))
    coords2 = rng.uniform(-1, 1, size=(B, S, S, 2))
    perms = np.stack([np.array([2, 0, 0]), np.array([1, 2, 0])])[:n_neg]  # a non-bijective one too
    return feats, feats_pos, code, code_pos, coords1, coords2, perms


@pytest.mark.parametrize("flags", [dict(), dict(pointwise=False, zero_clamp=False, stabilize=True)])
def test_full_loss_given_draws_matches_numpy(flags):
    args = _full_inputs()
    jargs = [jnp.asarray(a, jnp.float32) for a in args[:6]] + [jnp.asarray(args[6], jnp.int32)]
    fn = jax.jit(lambda *a: losses.correspondence_loss_given_draws(*a, LOSS_WEIGHTS, **flags))
    total, aux = fn(*jargs)
    ref_total, ref_aux = np_full_loss(*args, WEIGHTS, **flags)
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-4, atol=1e-6)
    assert set(aux) == set(ref_aux)
    for k in ref_aux:
        assert aux[k].shape == ()
        np.testing.assert_allclose(float(aux[k]), ref_aux[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_stego_loss_random_draws_deterministic_and_checked():
    feats, feats_pos, code, code_pos = [jnp.asarray(a, jnp.float32) for a in _full_inputs()[:4]]
    fn = jax.jit(lambda k, c: losses.stego_correspondence_loss(
        k, feats, feats_pos, c, code_pos, LOSS_WEIGHTS, feature_samples=3, neg_samples=2))
    l1, aux = fn(jax.random.key(0), code)
    l2, _ = fn(jax.random.key(0), code)
    l3, _ = fn(jax.random.key(1), code)
    assert float(l1) == float(l2) and float(l1) != float(l3) and np.isfinite(float(l1))
    assert all(v.shape == () for v in aux.values())
    with pytest.raises(ValueError, match="at least 2"):
        losses.stego_correspondence_loss(jax.random.key(0), feats[:1], feats_pos[:1], code[:1],
                                         code_pos[:1], LOSS_WEIGHTS)
    with pytest.raises(ValueError, match=">= 1"):
        losses.stego_correspondence_loss(jax.random.key(0), feats, feats_pos, code, code_pos,
                                         LOSS_WEIGHTS, neg_samples=0)


def test_full_loss_gradient_matches_finite_differences_x64():
    with jax.enable_x64(True):
        feats, feats_pos, code, code_pos, c1, c2, _ = _full_inputs(seed=5, B=2, hw=(4, 4), S=3)
        perms = jnp.asarray([[1, 0], [1, 0]], jnp.int32)
        f64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731

        # one compiled function serves both the analytic gradient and the finite differences
        @jax.jit
        @functools.partial(jax.value_and_grad, argnums=(0, 1, 2))
        def loss_and_grad(code, code_pos, feats):
            return losses.correspondence_loss_given_draws(
                feats, f64(feats_pos), code, code_pos, f64(c1), f64(c2), perms, LOSS_WEIGHTS)[0]

        loss = lambda *a: float(loss_and_grad(*a)[0])  # noqa: E731
        x, xp, f = f64(code), f64(code_pos), f64(feats)
        _, (g, gp, gf) = loss_and_grad(x, xp, f)
        assert g.dtype == jnp.float64
        assert np.all(np.asarray(gf) == 0)  # features are the frozen teacher: no gradient
        # central differences along random directions (each checks the whole gradient) and
        # along a few single coordinates.
        rng = np.random.default_rng(0)
        dirs = [(rng.normal(size=x.shape), rng.normal(size=xp.shape)) for _ in range(6)]
        for idx in [(0, 0, 0, 0), (1, 3, 2, 1), (0, 2, 3, 3)]:
            for which in range(2):
                e = [np.zeros(x.shape), np.zeros(xp.shape)]
                e[which][idx] = 1.0
                dirs.append(tuple(e))
        eps = 1e-6
        for d, dp in dirs:
            analytic = float(np.sum(np.asarray(g) * d) + np.sum(np.asarray(gp) * dp))
            plus = loss(x + eps * d, xp + eps * dp, f)
            numeric = (plus - loss(x - eps * d, xp - eps * dp, f)) / (2 * eps)
            np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
        assert np.abs(np.asarray(g)).max() > 1e-4 and np.abs(np.asarray(gp)).max() > 1e-4
    assert jnp.zeros(1).dtype == jnp.float32  # x64 did not leak


# ---------------------------------------------------------------- probes


def test_cluster_probe_loss_matches_loop():
    rng = np.random.default_rng(6)
    cos = rng.uniform(-1, 1, size=(2, 3, 4, 5)).astype(np.float32)
    ref = -np.mean([max(cos[b, i, j]) for b in range(2) for i in range(3) for j in range(4)])
    np.testing.assert_allclose(float(losses.cluster_probe_loss(jnp.asarray(cos))), ref, rtol=1e-6)
    g = np.asarray(jax.grad(losses.cluster_probe_loss)(jnp.asarray(cos)))
    onehot = (cos == cos.max(-1, keepdims=True))
    # the gradient flows only through the selected (argmax) entry
    np.testing.assert_allclose(g, -onehot.astype(np.float32) / 24.0, rtol=1e-6)


@pytest.mark.parametrize("hw", [(9, 7), (2, 3)])
def test_upsample_bilinear_matches_align_corners_false(hw):
    x = np.random.default_rng(7).normal(size=(2, 4, 5, 3)).astype(np.float32)
    got = np.asarray(ops.upsample_bilinear(jnp.asarray(x), hw))
    np.testing.assert_allclose(got, np_resize_bilinear(x, *hw), atol=1e-5)


def _np_linear_probe_loss(z, labels, n):
    """The linear-probe loss in float64 NumPy: resize, log-sum-exp minus the label's logit, mean
    over the valid pixels (0 without any)."""
    up = np_resize_bilinear(z, *labels.shape[1:])
    valid = (labels >= 0) & (labels < n)
    if not valid.any():
        return 0.0
    m = up.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(up - m).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(up, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return float(np.sum((lse - picked)[valid]) / valid.sum())


@pytest.mark.parametrize("shape, out_hw", [((2, 3, 3, 4), (24, 24)), ((2, 3, 4, 4), (6, 5)),
                                           ((1, 5, 6, 3), (3, 4)), ((1, 3, 3, 5), (3, 3))],
                         ids=["x8", "up", "down", "same"])
def test_linear_probe_loss_gradient_matches_numpy_differences(shape, out_hw):
    """The loss's hand-written gradient (softmax - one-hot at the valid pixels over their count,
    resized back) against central differences of the float64 NumPy loss."""
    rng = np.random.default_rng(11)
    z = rng.normal(size=shape) * 2.0
    n = shape[-1]
    labels = rng.integers(-1, n + 1, size=(shape[0], *out_hw)).astype(np.int32)  # some invalid
    value, grad = jax.value_and_grad(losses.linear_probe_loss)(jnp.asarray(z, jnp.float32), jnp.asarray(labels), n)
    np.testing.assert_allclose(float(value), _np_linear_probe_loss(z, labels, n), rtol=1e-5)
    eps = 1e-6
    num = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        d = np.zeros_like(z)
        d[idx] = eps
        num[idx] = (_np_linear_probe_loss(z + d, labels, n) - _np_linear_probe_loss(z - d, labels, n)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad), num, rtol=1e-4, atol=2e-6)
    assert np.abs(num).max() > 1e-3  # a real gradient, not zeros
    none = np.full_like(labels, -1)
    g0 = jax.grad(losses.linear_probe_loss)(jnp.asarray(z, jnp.float32), jnp.asarray(none), n)
    assert not np.any(np.asarray(g0))  # no valid pixel: loss 0, gradient 0


@pytest.mark.parametrize("n_out, n_in", [(224, 28), (24, 3), (6, 3), (3, 5), (7, 7), (100, 13)])
def test_interp_matrix_is_upsample_bilinear(n_out, n_in):
    m = ops.interp_matrix(n_out, n_in)
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
    assert ((m > 0).sum(1) <= 2).all()  # two taps per output
    x = np.random.default_rng(3).normal(size=(1, n_in, 2, 1)).astype(np.float32)
    want = np_resize_bilinear(x, n_out, 2)[0, :, 0, 0]
    np.testing.assert_allclose(m @ x[0, :, 0, 0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ops.upsample_bilinear(jnp.asarray(x), (n_out, 2)))[0, :, 0, 0], want,
                               rtol=1e-5, atol=1e-6)


def test_linear_probe_loss_matches_numpy_and_ignores_invalid():
    rng = np.random.default_rng(8)
    n = 4
    logits = rng.normal(size=(2, 3, 3, n)).astype(np.float32)
    labels = rng.integers(-1, n + 2, size=(2, 6, 5)).astype(np.int32)  # includes -1 and >= n
    up = np_resize_bilinear(logits, 6, 5)
    nll = []
    for b, i, j in itertools.product(range(2), range(6), range(5)):
        y = labels[b, i, j]
        if 0 <= y < n:
            z = up[b, i, j]
            nll.append(np.log(np.exp(z).sum()) - z[y])
    got = float(losses.linear_probe_loss(jnp.asarray(logits), jnp.asarray(labels), n))
    np.testing.assert_allclose(got, np.mean(nll), rtol=1e-5)
    none_valid = jnp.full((2, 6, 5), -1, jnp.int32)
    assert float(losses.linear_probe_loss(jnp.asarray(logits), none_valid, n)) == 0.0
