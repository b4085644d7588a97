"""Unsupervised segmentation metrics: on-device confusion accumulation, Hungarian matching on the
host, mIoU and pixel accuracy with the semantics of the official STEGO `UnsupervisedMetrics`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment


@functools.partial(jax.jit, static_argnames=("n_classes", "n_clusters"))
def confusion(
    preds: jax.Array,
    labels: jax.Array,
    n_classes: int,
    n_clusters: int | None = None,
    ignore_index: int = -1,
) -> jax.Array:
    """Confusion counts of predicted clusters against true classes, for one batch.

    Args:
      preds: int array of any shape (e.g. `[B,H,W]`), predicted cluster ids.
      labels: int array of the same shape, true class ids; values outside `[0, n_classes)` and
        `ignore_index` are ignored.
      n_classes: number of true classes `n` (static).
      n_clusters: number of predicted clusters `n + extra` (static); defaults to `n_classes`.
      ignore_index: an additional label value to ignore (only matters if it lies in `[0, n)`).

    Returns:
      int32 `[n_clusters, n_classes]`, rows = predicted cluster, columns = true class. Sum batches
      on the host in int64 (`int32` overflows past ~2e9 pixels).

    As the official code, a pixel counts only if `0 <= label < n_classes` **and**
    `0 <= pred < n_classes`: predictions in the extra clusters (ids `>= n_classes`) are dropped,
    so rows `n_classes..n_clusters-1` always stay zero. Consequence: with over-clustering, the
    pixels that fall in clusters with ids `>= n_classes` are silently excluded from both mIoU and
    accuracy (the denominator too), and the extra clusters can never be matched to a class
    except through ties of zero rows. Reproduced on purpose so numbers compare with the paper.
    Compiled once per input shape and (`n_classes`, `n_clusters`), which are static;
    `ignore_index` is an argument.
    """
    n_clusters = n_classes if n_clusters is None else n_clusters
    if n_clusters < n_classes:
        raise ValueError(f"n_clusters={n_clusters} must be >= n_classes={n_classes}")
    preds = jnp.asarray(preds).reshape(-1).astype(jnp.int32)
    labels = jnp.asarray(labels).reshape(-1).astype(jnp.int32)
    valid = (labels >= 0) & (labels < n_classes) & (labels != ignore_index)
    valid &= (preds >= 0) & (preds < n_classes)  # official mask: n_classes, not n_clusters
    # Invalid pixels are sent to bin 0 with weight 0; a scatter-add avoids a [P, n] one-hot.
    flat = jnp.where(valid, preds * n_classes + labels, 0)
    counts = jnp.zeros(n_clusters * n_classes, jnp.int32).at[flat].add(valid.astype(jnp.int32))
    return counts.reshape(n_clusters, n_classes)


def scores_from_confusion(
    stats: Any,
    n_classes: int,
    *,
    hungarian: bool = True,
    extra_clusters: int = 0,
) -> dict[str, Any]:
    """mIoU and pixel accuracy (percent) from a global confusion matrix, as official `compute()`.

    Args:
      stats: `[n_classes + extra_clusters, n_classes]` counts, rows = cluster, cols = class
        (the sum of `confusion` over the whole evaluation set).
      n_classes: number of true classes `n`.
      hungarian: match clusters to classes by maximum overlap (cluster probe); `False` uses the
        identity (linear probe; requires `extra_clusters == 0`).
      extra_clusters: number of clusters beyond `n`.

    Returns:
      dict with
        "mIoU": float, mean over the non-NaN IoUs (classes absent from both ground truth and
          prediction are NaN and excluded), in percent;
        "Accuracy": float, matched pixels / valid pixels, in percent;
        "iou": list of `n` per-class IoUs in percent (NaN where undefined);
        "iou_extra": with `extra_clusters > 0`, the IoU of the official "Extra" row/column
          (0 or NaN; a 0 lowers mIoU exactly as in the official code), else absent;
        "assignment": int64 `[n + extra]`, the class matched to each cluster, -1 for unmatched
          clusters; recolour predictions with `map_clusters(preds, assignment)`;
        "cluster_of_class": int64 `[n]`, the cluster that row `i` of the histogram came from.
    """
    stats = np.asarray(stats, dtype=np.int64)
    n_clusters = n_classes + extra_clusters
    if stats.shape != (n_clusters, n_classes):
        raise ValueError(
            f"stats has shape {stats.shape}, expected (n_classes + extra_clusters, n_classes)"
            f" = ({n_clusters}, {n_classes})"
        )
    if hungarian:
        rows, cols = linear_sum_assignment(stats, maximize=True)
        assignment = np.full(n_clusters, -1, np.int64)
        assignment[rows] = cols
        if extra_clusters == 0:
            cluster_of_class = rows[np.argsort(cols)]
            histogram = stats[cluster_of_class, :]
        else:
            # The official code matches twice (on stats and on stats.T): rows of the histogram
            # come from the transposed matching, the "Extra" row from clusters unmatched in the
            # first one. The two agree except under ties; reproduced as is.
            _, cluster_of_class = linear_sum_assignment(stats.T, maximize=True)
            missing = sorted(set(range(n_clusters)) - set(rows.tolist()))
            histogram = stats[cluster_of_class, :]
            extra_row = stats[missing, :].sum(0, keepdims=True)
            histogram = np.concatenate([histogram, extra_row], axis=0)
            histogram = np.concatenate([histogram, np.zeros((n_classes + 1, 1), np.int64)], 1)
    else:
        if extra_clusters:
            raise ValueError("hungarian=False (identity matching) needs extra_clusters == 0")
        assignment = np.arange(n_classes, dtype=np.int64)
        cluster_of_class = assignment.copy()
        histogram = stats

    histogram = histogram.astype(np.float64)
    tp = np.diag(histogram)
    # Official names fp/fn are swapped relative to rows=prediction; IoU is symmetric so kept.
    fp = histogram.sum(0) - tp
    fn = histogram.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        accuracy = tp.sum() / histogram.sum()
    valid_iou = iou[~np.isnan(iou)]
    miou = float(valid_iou.mean()) if valid_iou.size else float("nan")
    out: dict[str, Any] = {
        "mIoU": 100.0 * miou,
        "Accuracy": 100.0 * float(accuracy),
        "iou": [100.0 * float(v) for v in iou[:n_classes]],
        "assignment": assignment,
        "cluster_of_class": np.asarray(cluster_of_class, np.int64),
    }
    if hungarian and extra_clusters:
        out["iou_extra"] = 100.0 * float(iou[n_classes])
    return out


def scores(
    preds: Any,
    labels: Any,
    n_classes: int,
    *,
    n_clusters: int | None = None,
    hungarian: bool = True,
    ignore_index: int = -1,
) -> dict[str, Any]:
    """Hungarian-matched mIoU / accuracy (percent) of one set of predictions; see
    `scores_from_confusion` for the returned dict.

    Args:
      preds: int `[...]` predicted cluster ids (e.g. `[N,H,W]`).
      labels: int `[...]` true classes, same shape; -1 / out of range / `ignore_index` ignored.
      n_classes: number of true classes.
      n_clusters: number of clusters (`>= n_classes`); default `n_classes`.
      hungarian: Hungarian matching (cluster probe) or identity (linear probe).
      ignore_index: label value to ignore.
    """
    n_clusters = n_classes if n_clusters is None else n_clusters
    stats = np.asarray(confusion(preds, labels, n_classes, n_clusters, ignore_index), np.int64)
    return scores_from_confusion(
        stats, n_classes, hungarian=hungarian, extra_clusters=n_clusters - n_classes
    )


def map_clusters(preds: Any, assignment: Any) -> Any:
    """Recolour cluster ids to their matched class ids.

    Args:
      preds: int `[...]` cluster ids in `[0, len(assignment))` (NumPy or JAX array).
      assignment: `[n_clusters]` class per cluster, -1 for unmatched (`scores(...)["assignment"]`).

    Returns:
      int `[...]` class ids; pixels of unmatched clusters get -1 (the ignore label).

    Deliberately not the official `map_clusters` with extra clusters: that one inserts the -1 for
    a missing cluster at position `missing + 1`, which shifts the mapping of the clusters in
    between; here each cluster maps to exactly the class it was matched to.
    """
    if isinstance(preds, jax.Array):
        return jnp.asarray(assignment)[preds]
    return np.asarray(assignment)[np.asarray(preds)]
