"""Metrics against explicit-loop NumPy/SciPy references and hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from stego_jax import metrics


def _loop_confusion(preds, labels, n_classes, n_clusters):
    """Reference: one pixel at a time, the official mask (pred < n_classes, not n_clusters)."""
    c = np.zeros((n_clusters, n_classes), np.int64)
    for p, t in zip(np.ravel(preds), np.ravel(labels)):
        if 0 <= t < n_classes and 0 <= p < n_classes:
            c[p, t] += 1
    return c


def _reference_scores(preds, labels, n_classes):
    """Reference with set-based IoU: |P_m & L_c| / |P_m | L_c| over valid pixels, m matched to c."""
    preds, labels = np.ravel(preds), np.ravel(labels)
    valid = (labels >= 0) & (labels < n_classes) & (preds >= 0) & (preds < n_classes)
    preds, labels = preds[valid], labels[valid]
    overlap = np.zeros((n_classes, n_classes))
    for m in range(n_classes):
        for c in range(n_classes):
            overlap[m, c] = np.sum((preds == m) & (labels == c))
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    ious, correct = [], 0
    for m, c in zip(rows, cols):
        inter = np.sum((preds == m) & (labels == c))
        union = np.sum((preds == m) | (labels == c))
        ious.append(np.nan if union == 0 else inter / union)
        correct += inter
    ious = np.array(ious)[np.argsort(cols)]
    return 100 * np.nanmean(ious), 100 * correct / len(labels), 100 * ious


def test_confusion_matches_loops_and_accumulates():
    rng = np.random.default_rng(0)
    n, n_clusters = 4, 6
    preds = rng.integers(-1, n_clusters + 1, size=(3, 7, 9))
    labels = rng.integers(-2, n + 2, size=(3, 7, 9))
    ref = _loop_confusion(preds, labels, n, n_clusters)
    jitted = jax.jit(metrics.confusion, static_argnums=(2, 3))
    got = np.asarray(jitted(preds, labels, n, n_clusters))
    assert got.dtype == np.int32 and got.shape == (n_clusters, n)
    np.testing.assert_array_equal(got, ref)
    assert ref[n:].sum() == 0 and (preds >= n).any()  # extra clusters dropped, as official
    halves = sum(
        np.asarray(metrics.confusion(preds[i : i + 2], labels[i : i + 2], n, n_clusters), np.int64)
        for i in (0, 2)
    )
    np.testing.assert_array_equal(halves, ref)


def test_scores_match_reference_on_noisy_clustering():
    rng = np.random.default_rng(1)
    n = 5
    labels = rng.integers(0, n, size=(4, 16, 16))
    perm = rng.permutation(n)
    preds = perm[labels]
    noise = rng.random(labels.shape) < 0.3
    preds = np.where(noise, rng.integers(0, n, size=labels.shape), preds)
    labels = np.where(rng.random(labels.shape) < 0.1, -1, labels)
    out = metrics.scores(preds, labels, n)
    miou, acc, ious = _reference_scores(preds, labels, n)
    assert out["mIoU"] == pytest.approx(miou, abs=1e-9)
    assert out["Accuracy"] == pytest.approx(acc, abs=1e-9)
    np.testing.assert_allclose(out["iou"], ious, atol=1e-9)
    np.testing.assert_array_equal(out["assignment"][perm], np.arange(n))
    assert 40 < out["mIoU"] < 100


def test_perfect_permuted_clustering_scores_100():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=(2, 8, 8))
    perm = np.array([2, 0, 3, 1])
    preds = perm[labels]
    out = metrics.scores(jnp.asarray(preds), jnp.asarray(labels), 4)
    assert out["mIoU"] == pytest.approx(100.0) and out["Accuracy"] == pytest.approx(100.0)
    np.testing.assert_array_equal(metrics.map_clusters(preds, out["assignment"]), labels)
    np.testing.assert_array_equal(out["cluster_of_class"], perm)


def _from_stats(stats):
    """Pixels (pred, label) realising a given [clusters, classes] count matrix."""
    preds, labels = [], []
    for m, row in enumerate(stats):
        for c, cnt in enumerate(row):
            preds += [m] * cnt
            labels += [c] * cnt
    return np.array(preds), np.array(labels)


def test_hand_computed_two_class_case():
    # stats [[3, 1], [2, 4]]: matching keeps the diagonal (7 > 3).
    # IoU0 = 3 / (3 + 2 + 1) = 1/2, IoU1 = 4 / (4 + 1 + 2) = 4/7, accuracy 7/10.
    preds, labels = _from_stats([[3, 1], [2, 4]])
    out = metrics.scores(preds, labels, 2)
    assert out["iou"] == pytest.approx([50.0, 400 / 7])
    assert out["mIoU"] == pytest.approx(100 * (0.5 + 4 / 7) / 2)
    assert out["Accuracy"] == pytest.approx(70.0)
    # Identity matching (linear probe) on swapped clusters scores 0; Hungarian scores 100.
    preds, labels = _from_stats([[0, 5], [5, 0]])
    assert metrics.scores(preds, labels, 2, hungarian=False)["Accuracy"] == 0.0
    assert metrics.scores(preds, labels, 2, hungarian=False)["mIoU"] == 0.0
    assert metrics.scores(preds, labels, 2)["mIoU"] == pytest.approx(100.0)


def test_ignored_pixels_and_ignore_index():
    preds, labels = _from_stats([[3, 1], [2, 4]])
    # Pixels with label -1, label >= n, or pred < 0 change nothing.
    p = np.concatenate([preds, [0, 1, 1, -1]])
    t = np.concatenate([labels, [-1, 2, 255, 0]])
    assert metrics.scores(p, t, 2)["Accuracy"] == pytest.approx(70.0)
    # ignore_index inside [0, n) drops that class: only class-0 pixels remain (3 + 2).
    out = metrics.scores(preds, labels, 2, ignore_index=1)
    assert out["Accuracy"] == pytest.approx(60.0)  # cluster 0 matched to class 0: 3 of 5


def test_absent_class_is_nan_and_excluded():
    # 3 classes, class 2 neither present nor predicted.
    preds, labels = _from_stats([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    out = metrics.scores(preds, labels, 3)
    assert np.isnan(out["iou"][2])
    assert out["mIoU"] == pytest.approx(100 * (0.5 + 4 / 7) / 2)
    assert out["Accuracy"] == pytest.approx(70.0)


def test_extra_clusters_official_semantics():
    # n=2, extra=1: pixels predicted in cluster 2 (>= n_classes) are dropped by the official mask.
    preds, labels = _from_stats([[3, 1], [2, 4], [7, 7]])
    out = metrics.scores(preds, labels, 2, n_clusters=3)
    assert out["Accuracy"] == pytest.approx(70.0)  # the 14 extra-cluster pixels are not counted
    assert out["mIoU"] == pytest.approx(100 * (0.5 + 4 / 7) / 2)
    assert np.isnan(out["iou_extra"])
    np.testing.assert_array_equal(out["assignment"], [0, 1, -1])
    # Cluster 1 never predicted: class 1 matches an empty row, IoU1 = 0 / (0 + 2 + 0) = 0;
    # IoU0 = 5 / (5 + 0 + 2) = 5/7; accuracy 5/7.
    preds, labels = _from_stats([[5, 2], [0, 0], [0, 0]])
    out = metrics.scores(preds, labels, 2, n_clusters=3)
    assert out["iou"] == pytest.approx([500 / 7, 0.0])
    assert out["mIoU"] == pytest.approx(100 * (5 / 7) / 2)
    assert out["Accuracy"] == pytest.approx(500 / 7)


def test_scores_from_confusion_checks_shape_and_map_clusters_unmatched():
    with pytest.raises(ValueError, match="expected"):
        metrics.scores_from_confusion(np.zeros((3, 3)), 2)
    with pytest.raises(ValueError, match="extra_clusters == 0"):
        metrics.scores_from_confusion(np.zeros((3, 2)), 2, hungarian=False, extra_clusters=1)
    mapped = metrics.map_clusters(jnp.array([[0, 1, 2]]), np.array([1, -1, 0]))
    np.testing.assert_array_equal(mapped, [[1, -1, 0]])
