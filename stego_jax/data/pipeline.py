"""Input pipeline: deterministic, resumable, process-sharded NumPy batches with k-NN positive pairs.

The batch of global step `s` is a pure function of `(seed, s)`, so resuming needs only the step number.
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np

_PERM_STREAM, _RANK_STREAM = 0, 1  # independent SeedSequence streams for the order and the neighbour ranks


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, _PERM_STREAM, epoch]).permutation(n)


def plan_step(n: int, step: int, *, global_batch: int, seed: int, shuffle: bool = True,
              drop_remainder: bool = True, knn: np.ndarray | None = None, num_neighbors: int = 7,
              _order_cache: dict | None = None) -> dict[str, np.ndarray]:
    """Dataset indices of the global batch of `step` (pure function of its arguments).

    With `drop_remainder`, an epoch has `n // global_batch` steps (the official DataLoader's
    `drop_last=True`): epoch `e = step // steps_per_epoch` reads its permutation (from `(seed, e)`) in
    consecutive slices. Without it, an epoch has `ceil(n / global_batch)` steps and the last batch is padded
    by repeating its first index, with `mask` False on the padding. The k-NN positive of slot `j` is
    `knn[index, r]`, `r` uniform in 1..num_neighbors from `(seed, step)` (rank 0, the image itself, skipped).

    Returns:
      `{"index": int64 [G], "mask": bool [G]}` plus `"index_pos": int64 [G]` when `knn` is given.
    """
    steps_per_epoch = n // global_batch if drop_remainder else math.ceil(n / global_batch)
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {n} items, fewer than one global batch of {global_batch} "
                         f"(batch_size x process_count); lower batch_size or use drop_remainder=False")
    epoch, b = divmod(step, steps_per_epoch)
    cache = _order_cache if _order_cache is not None else {}
    if cache.get("key") != (epoch, seed, shuffle, n):
        cache["key"], cache["order"] = (epoch, seed, shuffle, n), _epoch_order(n, seed, epoch, shuffle)
    index = cache["order"][b * global_batch: (b + 1) * global_batch]
    mask = np.ones(global_batch, bool)
    if len(index) < global_batch:
        mask[len(index):] = False
        index = np.concatenate([index, np.full(global_batch - len(index), index[0])])
    plan = {"index": index.astype(np.int64), "mask": mask}
    if knn is not None:
        ranks = np.random.default_rng([seed, _RANK_STREAM, step]).integers(1, num_neighbors + 1, size=global_batch)
        plan["index_pos"] = knn[index, ranks].astype(np.int64)
    return plan


def _check_knn(knn: Any, n: int, num_neighbors: int) -> np.ndarray:
    knn = np.asarray(knn)
    if knn.ndim != 2 or knn.shape[0] != n:
        raise ValueError(f"knn table has shape {knn.shape}, expected [{n}, k] for this dataset of {n} items; "
                         f"recompute it with `python -m stego_jax.knn` for this dataset, split and crop")
    if knn.shape[1] < num_neighbors + 1:
        raise ValueError(f"knn table has {knn.shape[1]} columns; num_neighbors={num_neighbors} needs at least "
                         f"{num_neighbors + 1} (column 0 is the image itself)")
    if not np.issubdtype(knn.dtype, np.integer) or knn.min() < 0 or knn.max() >= n:
        raise ValueError(f"knn table entries must be integer indices in [0, {n}), got dtype {knn.dtype}")
    return knn


def batches(dataset: Sequence[dict], *, batch_size: int, seed: int, start_step: int = 0, shuffle: bool = True,
            drop_remainder: bool = True, process_index: int = 0, process_count: int = 1,
            knn: np.ndarray | None = None, num_neighbors: int = 7, num_workers: int | None = None,
            prefetch: int = 2, num_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Iterate NumPy batches for this process, from global step `start_step` on.

    Each process gets the contiguous slice `[process_index*batch_size, (process_index+1)*batch_size)` of the
    global batch (`batch_size * process_count` items, see `plan_step`). Items are loaded by a thread pool
    (PIL decoding and NumPy indexing release the GIL) with at most `prefetch` batches in flight, so host
    memory stays bounded.

    We use our own ThreadPoolExecutor rather than grain: the step -> indices map must be an explicit pure
    function of `(seed, step)` (exact resume without iterator-state checkpoints, identical k-NN rank draws on
    every process), which is a few lines here, and the per-item work is already a random-access `Dataset`.

    Args:
      dataset: random-access items `{"image", "label", "id"}` (e.g. `build_dataset(...)`).
      batch_size: per-process batch size.
      knn: optional `[N, k]` neighbour table; adds `image_pos`, `label_pos`, `index_pos`.
      num_steps: stop after this many batches (default: never for training, one epoch when
        `shuffle=False`).
    Yields:
      `{"image": uint8 [B,res,res,3], "label": int32 [B,res,res], "index": int64 [B], "mask": bool [B]}`
      (+ positives), `mask` False on padding slots (only with `drop_remainder=False`).
    """
    n = len(dataset)
    if batch_size <= 0 or process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"need batch_size > 0 and 0 <= process_index < process_count; got batch_size="
                         f"{batch_size}, process_index={process_index}, process_count={process_count}")
    if seed < 0 or start_step < 0:
        raise ValueError(f"seed and start_step must be non-negative, got seed={seed}, start_step={start_step}")
    if knn is not None:
        knn = _check_knn(knn, n, num_neighbors)
    global_batch = batch_size * process_count
    if num_steps is None and not shuffle:
        num_steps = max(0, (n // global_batch if drop_remainder else math.ceil(n / global_batch)) - start_step)
    lo, hi = process_index * batch_size, (process_index + 1) * batch_size
    cache: dict = {}
    workers = num_workers or min(8, os.cpu_count() or 1)

    def submit(pool: ThreadPoolExecutor, step: int) -> tuple[dict, list[Future], list[Future]]:
        plan = plan_step(n, step, global_batch=global_batch, seed=seed, shuffle=shuffle,
                         drop_remainder=drop_remainder, knn=knn, num_neighbors=num_neighbors, _order_cache=cache)
        plan = {k: v[lo:hi] for k, v in plan.items()}
        anchors = [pool.submit(dataset.__getitem__, int(i)) for i in plan["index"]]
        positives = [pool.submit(dataset.__getitem__, int(i)) for i in plan.get("index_pos", ())]
        return plan, anchors, positives

    def assemble(plan: dict, anchors: list[Future], positives: list[Future]) -> dict[str, np.ndarray]:
        items = [f.result() for f in anchors]
        batch = {"image": np.stack([it["image"] for it in items]), "label": np.stack([it["label"] for it in items]),
                 "index": plan["index"], "mask": plan["mask"]}
        if positives:
            pos = [f.result() for f in positives]
            batch["image_pos"] = np.stack([it["image"] for it in pos])
            batch["label_pos"] = np.stack([it["label"] for it in pos])
            batch["index_pos"] = plan["index_pos"]
        return batch

    pool = ThreadPoolExecutor(workers, thread_name_prefix="stego-data")
    try:
        in_flight: deque = deque()
        step, end = start_step, (None if num_steps is None else start_step + num_steps)
        while True:
            while len(in_flight) < max(1, prefetch) and (end is None or step < end):
                in_flight.append(submit(pool, step))
                step += 1
            if not in_flight:
                return
            yield assemble(*in_flight.popleft())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
