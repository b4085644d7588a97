"""Where a training step's frozen features come from, and the training data of a run.

Three sources with one small protocol (`FeatureSource.batch(step) -> {"feats", "feats_pos",
"label"}` sharded over the mesh): features computed once and kept in host memory, read from the
on-disk feature cache, or computed from decoded images every step. All three follow the same
data plan (`data.plan_step`: anchors and k-NN positives from `(seed, step)`), so a run resumes
exactly and the three give the same batches.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from stego_jax import feature_cache, knn as knn_lib, parallel
from stego_jax.config import eval_config
from stego_jax.data import batches, build_dataset, plan_step
from stego_jax.featurize import (chunk_size, compute_features, featurize_sharded, local_featurize_fn,
                                 make_featurize, pad_rows, run_featurizer)
from stego_jax.featurizers import Featurizer


class FeatureSource(Protocol):
    def batch(self, step: int) -> dict:
        """{"feats", "feats_pos" [B,h,w,C], "label" [B,H,W]} of `step`, sharded over the mesh."""


class CachedFeatures:
    """All training features computed once (frozen backbone, deterministic crops): a step only
    gathers rows. Host memory: N*h*w*C floats on every process."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray, knn: np.ndarray, config, mesh):
        self.feats, self.labels, self.knn, self.config, self.mesh = feats, labels, knn, config, mesh
        self.rows = parallel.process_rows(mesh, config.batch_size)

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Dataset indices of this process's anchors and positives at `step` (the global plan is
        the same on every process; each takes the rows its devices hold)."""
        c = self.config
        plan = plan_step(len(self.knn), step, global_batch=c.batch_size, seed=c.seed, knn=self.knn,
                         num_neighbors=c.knn.num_neighbors)
        return plan["index"][self.rows], plan["index_pos"][self.rows]

    def batch(self, step: int) -> dict:
        idx, pos = self.plan(step)
        return parallel.shard_batch(
            {"feats": self.feats[idx], "feats_pos": self.feats[pos], "label": self.labels[idx]}, self.mesh)


class DiskFeatures(CachedFeatures):
    """Training features read from the on-disk cache (`feature_cache.FeatureCache`): each step
    reads only its rows from memory-mapped shards, so host memory does not grow with the set.
    Features stay in the cache dtype (bfloat16 by default) until the step upcasts them."""

    def __init__(self, cache, knn: np.ndarray, config, mesh):
        super().__init__(None, None, knn, config, mesh)
        self.cache = cache

    def batch(self, step: int) -> dict:
        idx, pos = self.plan(step)
        return parallel.shard_batch({"feats": self.cache.features(idx), "feats_pos": self.cache.features(pos),
                                     "label": self.cache.labels(idx)}, self.mesh)


class StreamedFeatures:
    """Images decoded by the input pipeline each step; the frozen backbone runs on device in its
    own jitted call (its parameters are an argument, never part of the optimizer state)."""

    def __init__(self, dataset, knn: np.ndarray, config, featurize, fparams, mesh):
        self.featurize, self.fparams, self.mesh = featurize, fparams, mesh
        self.dataset, self.knn, self.config = dataset, knn, config
        self.it: Iterator | None = None
        self.next_step = None

    def _start(self, step: int) -> Iterator:
        """The input pipeline from `step` on (a resumed run starts it where it resumes)."""
        c = self.config
        rows = parallel.process_rows(self.mesh, c.batch_size)
        per = rows.stop - rows.start
        # `batches` hands process i the block [i*per, (i+1)*per) of the global plan: name the block
        # this process's devices hold.
        return batches(self.dataset, batch_size=per, seed=c.seed, start_step=step,
                       process_index=rows.start // per, process_count=c.batch_size // per, knn=self.knn,
                       num_neighbors=c.knn.num_neighbors, num_workers=c.data.num_workers)

    def batch(self, step: int) -> dict:
        if self.it is None or step != self.next_step:
            self.it = self._start(step)
        self.next_step = step + 1
        b = next(self.it)
        arr = parallel.shard_batch({"image": b["image"], "image_pos": b["image_pos"], "label": b["label"]},
                                   self.mesh)
        return {"feats": self.featurize(self.fparams, arr["image"]),
                "feats_pos": self.featurize(self.fparams, arr["image_pos"]), "label": arr["label"]}


# ----------------------------------------------------------------------------------------
# k-NN tables
# ----------------------------------------------------------------------------------------

def load_train_knn(config, featurizer: Featurizer, dataset) -> np.ndarray:
    """The precomputed k-NN table of the training split; a clear error if missing or stale."""
    path = knn_lib.table_path(config, featurizer, "train")
    table, _ = knn_lib.load_knn(path, expect_meta=knn_lib.table_meta(config, featurizer, "train", dataset.ids))
    return table


def descriptor_knn(config, descriptors) -> np.ndarray:
    """k-NN table of the demo featurizer, from its cached features' descriptors (GAP + cosine
    top-k, as the official precompute, without its dropout quirk): it has no precompute command,
    its statistics living in the run's workdir."""
    return np.asarray(knn_lib.knn_table(descriptors, k=min(config.knn.k, len(descriptors))))


# ----------------------------------------------------------------------------------------
# A run's training data
# ----------------------------------------------------------------------------------------

def _stack(ds, key: str) -> np.ndarray:
    return np.stack([ds[i][key] for i in range(len(ds))])


def build_training_data(config, workdir: str, mesh
                        ) -> tuple[Featurizer, FeatureSource, Callable[[], Iterator]]:
    """The featurizer, the per-step training feature source and the validation batches of `config`.

    `config.feature_cache`: a `dir` selects the on-disk cache (built on first use), `enabled`
    without a dir keeps all training features in host memory, neither streams images.
    """
    train_ds = build_dataset(config, "train")
    cache_dir = feature_cache.cache_dir(config)
    in_memory = bool(config.feature_cache.enabled) and not cache_dir
    train_images = _stack(train_ds, "image") if in_memory else None
    featurizer = run_featurizer(config, workdir, fit=True, train_ds=train_ds, train_images=train_images)
    featurize = make_featurize(featurizer, mesh)
    descriptor = config.model.featurizer == "descriptor"

    source: FeatureSource
    if cache_dir:
        cache = feature_cache.open_or_build(cache_dir, config, featurizer, train_ds,
                                            local_featurize_fn(featurizer))
        table = (descriptor_knn(config, cache.descriptors()) if descriptor
                 else load_train_knn(config, featurizer, train_ds))
        source = DiskFeatures(cache, table, config, mesh)
    elif in_memory:
        feats = compute_features(featurize, featurizer.params, train_images, mesh, 256)
        labels = _stack(train_ds, "label").astype(np.int32)
        table = (descriptor_knn(config, knn_lib.global_descriptors(jnp.asarray(feats))) if descriptor
                 else load_train_knn(config, featurizer, train_ds))
        source = CachedFeatures(feats, labels, table, config, mesh)
    else:
        table = load_train_knn(config, featurizer, train_ds)
        source = StreamedFeatures(train_ds, table, config, featurize, featurizer.params, mesh)
    return featurizer, source, validation_batches(config, featurize, featurizer, mesh)


def validation_batches(config, featurize, featurizer: Featurizer, mesh) -> Callable[[], Iterator]:
    """`val_batches()` yields (features, labels) of the validation split at eval.res, sharded over
    `mesh`: computed once on the first pass and kept (frozen backbone). The last batch is padded
    to the common size with label -1 rows, which are not counted."""
    val_ds = build_dataset(eval_config(config), "val")
    n_val = min(len(val_ds), config.num_val_images or len(val_ds))
    kept: list = []

    def val_batches():
        if kept:
            yield from kept
            return
        b = chunk_size(n_val, config.eval.batch_size, mesh)
        for i in range(0, n_val, b):
            items = [val_ds[j] for j in range(i, min(i + b, n_val))]
            images = pad_rows(np.stack([it["image"] for it in items]), b)
            labels = pad_rows(np.stack([it["label"] for it in items]).astype(np.int32), b, fill=-1)
            rows = parallel.process_rows(mesh, b)
            kept.append((featurize_sharded(featurize, featurizer.params, images, mesh),
                         jax.make_array_from_process_local_data(parallel.data_sharding(mesh), labels[rows])))
            yield kept[-1]

    return val_batches
