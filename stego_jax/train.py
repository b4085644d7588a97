"""STEGO training program: `python -m stego_jax.train --config configs/<name>.py --workdir DIR`.

Thin shell over library pieces: a jitted, data-parallel train step over a device mesh; the
frozen featurizer runs outside the optimizer (its own jitted call, or a precomputed cache);
orbax checkpoints with exact resume; console progress, JSON lines and TensorBoard events.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from stego_jax import losses, metrics, ops, parallel
from stego_jax.config import validate
from stego_jax.models.head import ClusterProbe, LinearProbe, SegmentationHead

PyTree = Any


# ----------------------------------------------------------------------------------------
# Model pieces and state
# ----------------------------------------------------------------------------------------

def build_modules(config):
    head = SegmentationHead(
        dim=config.model.dim,
        projection=config.model.projection,
        feature_dropout=bool(config.model.dropout),
    )
    cluster = ClusterProbe(n_clusters=config.data.n_classes + config.model.extra_clusters)
    linear = LinearProbe(n_classes=config.data.n_classes)
    return head, cluster, linear


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam on the head, Adam on each probe (official: three optimizers, no schedule)."""
    return optax.multi_transform(
        {
            "head": optax.adam(config.optim.lr),
            "probe": optax.adam(config.optim.probe_lr),
        },
        {"head": "head", "cluster_probe": "probe", "linear_probe": "probe"},
    )


def init_params(config, feat_dim: int, key) -> PyTree:
    head, cluster, linear = build_modules(config)
    k1, k2, k3 = jax.random.split(key, 3)
    g = config.data.res // config.model.patch_size
    feats = jnp.zeros((1, g, g, feat_dim), jnp.float32)
    code = jnp.zeros((1, g, g, config.model.dim), jnp.float32)
    return {
        "head": head.init(k1, feats, train=False)["params"],
        "cluster_probe": cluster.init(k2, code)["params"],
        "linear_probe": linear.init(k3, code)["params"],
    }


def create_state(config, feat_dim: int, key) -> dict:
    params = init_params(config, feat_dim, key)
    opt_state = make_optimizer(config).init(params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}


# ----------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------

def loss_fn(params, batch, key, config, modules):
    """Total loss: correspondence (head) + cluster probe + linear probe (on detached codes)."""
    head, cluster, linear = modules
    k_drop, k_drop_pos, k_loss = jax.random.split(key, 3)
    # A bfloat16 on-disk feature cache (feature_cache.py) ships half the bytes to the device; the
    # head and the loss still compute in float32 (a no-op for float32 features).
    f_in = batch["feats"].astype(jnp.float32)
    f_pos_in = batch["feats_pos"].astype(jnp.float32)
    feats, code = head.apply({"params": params["head"]}, f_in, train=True, rngs={"dropout": k_drop})
    feats_pos, code_pos = head.apply({"params": params["head"]}, f_pos_in, train=True,
                                     rngs={"dropout": k_drop_pos})
    lc = config.loss
    corr, aux = losses.stego_correspondence_loss(
        k_loss, feats, feats_pos, code, code_pos, losses.LossWeights.from_config(lc),
        feature_samples=lc.feature_samples, neg_samples=lc.neg_samples,
        pointwise=lc.pointwise, zero_clamp=lc.zero_clamp, stabilize=lc.stabilize,
    )
    detached = jax.lax.stop_gradient(code)
    cos = cluster.apply({"params": params["cluster_probe"]}, detached)
    cluster_loss = losses.cluster_probe_loss(cos)
    logits = linear.apply({"params": params["linear_probe"]}, detached)
    linear_loss = losses.linear_probe_loss(logits, batch["label"], config.data.n_classes)
    total = lc.correspondence_weight * corr + cluster_loss + linear_loss
    out = {"loss": total, "loss/correspondence": corr, "loss/cluster_probe": cluster_loss,
           "loss/linear_probe": linear_loss}
    out.update({f"corr/{k}": v for k, v in aux.items()})
    return total, out


def train_step(state, batch, base_key, *, config, modules, optimizer):
    """One update. A non-finite loss leaves the state unchanged and is flagged in the metrics,
    so a checkpoint can never contain the poisoned parameters."""
    key = jax.random.fold_in(base_key, state["step"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, out), grads = grad_fn(state["params"], batch, key, config, modules)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
    }
    out["nonfinite"] = jnp.logical_not(finite)
    return new_state, out


def make_train_step(config, mesh, modules, optimizer):
    rep = parallel.replicated(mesh)
    dat = parallel.data_sharding(mesh)
    fn = functools.partial(train_step, config=config, modules=modules, optimizer=optimizer)
    return jax.jit(fn, in_shardings=(rep, dat, rep), out_shardings=(rep, rep), donate_argnums=(0,))


def make_featurize(featurizer, mesh):
    """uint8 images [B,H,W,3] (sharded) -> frozen features [B,h,w,C]; normalization on device."""
    from stego_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)

    def featurize(params, images):
        x = (images.astype(jnp.float32) / 255.0 - mean) / std
        return jax.lax.stop_gradient(featurizer.apply(params, x))

    rep = parallel.replicated(mesh)
    dat = parallel.data_sharding(mesh)
    return jax.jit(featurize, in_shardings=(rep, dat), out_shardings=dat)


# ----------------------------------------------------------------------------------------
# Codes and validation (shared with evaluate.py)
# ----------------------------------------------------------------------------------------

def codes(head, head_params, feats):
    """Eval-mode codes [B,h,w,D] from frozen features [B,h,w,C]."""
    return head.apply({"params": head_params}, feats, train=False)[1]


def make_predict_fn(config, modules):
    """feats -> (cluster prediction, linear prediction) at label resolution, no CRF, no flip
    (the official during-training validation)."""
    head, cluster, linear = modules

    @functools.partial(jax.jit, static_argnums=(2,))
    def predict(params, feats, out_hw):
        c = codes(head, params["head"], feats)
        c = ops.upsample_bilinear(c, out_hw)
        cos = cluster.apply({"params": params["cluster_probe"]}, c)
        logits = linear.apply({"params": params["linear_probe"]}, c)
        return jnp.argmax(cos, -1).astype(jnp.int32), jnp.argmax(logits, -1).astype(jnp.int32)

    return predict


def make_confusion_fn(config, modules, mesh):
    """(params, feats [B,h,w,C], labels [B,H,W]) sharded over `mesh` -> the cluster and linear
    confusion counts of the batch, replicated: with several processes the predictions are
    global arrays no process holds whole, so the counting happens on device and only the small
    matrices come back (labels -1, e.g. padding rows, are not counted)."""
    predict = make_predict_fn(config, modules)
    n = config.data.n_classes
    n_clusters = n + config.model.extra_clusters
    rep = parallel.replicated(mesh)
    dat = parallel.data_sharding(mesh)

    def confusions(params, feats, labels):
        pc, pl = predict(params, feats, tuple(labels.shape[1:3]))
        return metrics.confusion(pc, labels, n, n_clusters), metrics.confusion(pl, labels, n, n)

    return jax.jit(confusions, in_shardings=(rep, dat, dat), out_shardings=(rep, rep))


def validate_probes(config, params, confusion_fn, val_batches) -> dict:
    """Hungarian-matched cluster-probe and plain linear-probe scores over the validation set."""
    n = config.data.n_classes
    n_clusters = n + config.model.extra_clusters
    conf_c = np.zeros((n_clusters, n), np.int64)
    conf_l = np.zeros((n, n), np.int64)
    for feats, labels in val_batches():
        cc, cl_ = confusion_fn(params, feats, labels)
        conf_c += np.asarray(cc)
        conf_l += np.asarray(cl_)
    cl = metrics.scores_from_confusion(conf_c, n, hungarian=True,
                                       extra_clusters=config.model.extra_clusters)
    li = metrics.scores_from_confusion(conf_l, n, hungarian=False)
    return {"cluster/mIoU": cl["mIoU"], "cluster/Accuracy": cl["Accuracy"],
            "linear/mIoU": li["mIoU"], "linear/Accuracy": li["Accuracy"]}


def preview_panels(config, params, predict, val_batches, n_images: int = 3) -> np.ndarray:
    """Ground truth | cluster probe (Hungarian-matched on these images) | linear probe, for the
    first validation images, as one uint8 RGB panel for TensorBoard."""
    from stego_jax.evaluate import colorize

    feats, labels = next(iter(val_batches()))
    pc, pl = predict(params, feats, tuple(labels.shape[1:3]))
    pc, pl, lab = (parallel.gather_to_host(x)[:n_images] for x in (pc, pl, labels))
    n = config.data.n_classes
    match = metrics.scores(pc, lab, n, n_clusters=n + config.model.extra_clusters)
    pc = metrics.map_clusters(pc, match["assignment"])
    rows = [np.concatenate([colorize(lab[i]), colorize(pc[i]), colorize(pl[i])], axis=1)
            for i in range(len(lab))]
    return np.concatenate(rows, axis=0)


# ----------------------------------------------------------------------------------------
# Training data: features for each step
# ----------------------------------------------------------------------------------------

class CachedFeatures:
    """All training features computed once (frozen backbone, deterministic crops): a step only
    gathers rows. Host memory: N*h*w*C floats on every process."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray, knn: np.ndarray, config, mesh):
        self.feats, self.labels, self.knn, self.config, self.mesh = feats, labels, knn, config, mesh
        self.rows = parallel.process_rows(mesh, config.batch_size)

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Dataset indices of this process's anchors and positives at `step` (the global plan is
        the same on every process; each takes the rows its devices hold)."""
        from stego_jax.data import plan_step

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

    def __init__(self, dataset, knn: np.ndarray, config, featurize, fparams, mesh, start_step: int):
        from stego_jax.data import batches

        self.featurize, self.fparams, self.mesh = featurize, fparams, mesh
        rows = parallel.process_rows(mesh, config.batch_size)
        per = rows.stop - rows.start
        # `batches` hands process i the block [i*per, (i+1)*per) of the global plan: name the block
        # this process's devices hold.
        self.it = batches(dataset, batch_size=per, seed=config.seed, start_step=start_step,
                          process_index=rows.start // per, process_count=config.batch_size // per, knn=knn,
                          num_neighbors=config.knn.num_neighbors, num_workers=config.data.num_workers)

    def batch(self, step: int) -> dict:
        b = next(self.it)
        arr = parallel.shard_batch({"image": b["image"], "image_pos": b["image_pos"], "label": b["label"]},
                                   self.mesh)
        return {"feats": self.featurize(self.fparams, arr["image"]),
                "feats_pos": self.featurize(self.fparams, arr["image_pos"]), "label": arr["label"]}


def _chunk_size(n: int, batch: int, mesh) -> int:
    """Rows per featurizer call: a multiple of the device count, no larger than needed for `n`."""
    n_dev = mesh.devices.size
    want = min(max(batch, 1), n)
    return max(n_dev, -(-want // n_dev) * n_dev)


def featurize_sharded(featurize, fparams, images: np.ndarray, mesh) -> jax.Array:
    """Features of one chunk of uint8 images [B,H,W,3] (B a multiple of the device count), every
    process passing the same chunk: each puts only its own rows on its devices, so the call is
    one data-parallel program over all processes. Returns the global sharded features."""
    rows = parallel.process_rows(mesh, len(images))
    local = jax.make_array_from_process_local_data(parallel.data_sharding(mesh), images[rows])
    return featurize(fparams, local)


def _pad_rows(x: np.ndarray, size: int, fill=None) -> np.ndarray:
    pad = size - len(x)
    if pad <= 0:
        return x
    tail = np.repeat(x[-1:], pad, 0) if fill is None else np.full((pad,) + x.shape[1:], fill, x.dtype)
    return np.concatenate([x, tail])


def compute_features(featurize, fparams, images: np.ndarray, mesh, batch: int) -> np.ndarray:
    """Frozen features [N,h,w,C] float32 of a uint8 image array [N,H,W,3], whole on every process.

    Every process must call it with the same `images`; each featurizes its share of every chunk
    and the shares are all-gathered. Chunks are padded to one size, so one program is compiled.
    With a `parallel.local_mesh()` it runs on this process's devices alone.
    """
    size = _chunk_size(len(images), batch, mesh)
    out = []
    for i in range(0, len(images), size):
        chunk = images[i:i + size]
        f = parallel.gather_to_host(featurize_sharded(featurize, fparams, _pad_rows(chunk, size), mesh))
        out.append(f[:len(chunk)])
    return np.concatenate(out)


def load_train_knn(config, featurizer, dataset) -> np.ndarray:
    """The precomputed k-NN table of the training split; a clear error if missing or stale."""
    from stego_jax import knn as knn_lib

    crop = config.data.get("crop_type", None)
    name = knn_lib.knn_filename(featurizer.name, featurizer.patch_size, config.data.name, "train", crop,
                                config.data.res)
    out_dir = config.knn.dir or os.path.join(config.data.root, "nns")
    expect = {"dataset": config.data.name, "split": "train", "crop": crop, "backbone": featurizer.name,
              "patch_size": int(featurizer.patch_size), "res": int(config.data.res), "n": len(dataset),
              "ids_fingerprint": knn_lib.ids_fingerprint(dataset.ids)}
    table, _ = knn_lib.load_knn(os.path.join(out_dir, name), expect_meta=expect)
    return table


# ----------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------

class Logger:
    """Console progress (process 0), JSON lines and TensorBoard event files."""

    def __init__(self, workdir: str, total_steps: int, enabled: bool):
        self.enabled = enabled
        self.total = total_steps
        self.t0 = time.time()
        self.last = (None, None)
        self.writer = None
        self.jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tb"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(prefix + k, float(v), step)
        self.jsonl.write(json.dumps({"step": step, **{prefix + k: float(v) for k, v in values.items()}}) + "\n")
        self.jsonl.flush()

    def progress(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        now = time.time()
        lstep, ltime = self.last
        rate = (step - lstep) / (now - ltime) if lstep is not None and now > ltime else float("nan")
        self.last = (step, now)
        eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--:--:--"
        print(f"step {step:>6d}/{self.total} | loss {loss:.4f} | {rate:6.2f} steps/s | ETA {eta_s}",
              flush=True)
        self.scalars(step, {"steps_per_sec": rate} if rate == rate else {}, "perf/")

    def image(self, tag: str, step: int, img: np.ndarray) -> None:
        if self.enabled:
            self.writer.add_image(tag, img, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

class Checkpoints:
    """orbax: the last K checkpoints under `checkpoints/` and the best (cluster mIoU) under `best/`."""

    def __init__(self, workdir: str, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.last = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m: m["cluster/mIoU"], best_mode="max"),
        )

    def latest_step(self):
        return self.last.latest_step()

    def save(self, step: int, state, metrics_: dict | None = None) -> None:
        self.last.save(step, args=self.ocp.args.StandardSave(state))
        if metrics_ is not None:
            self.best.save(step, args=self.ocp.args.StandardSave(state), metrics=metrics_)

    def restore(self, step: int, abstract_state, which: str = "last"):
        mgr = self.last if which == "last" else self.best
        return mgr.restore(step, args=self.ocp.args.StandardRestore(abstract_state))

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()


def restore_params(workdir: str, config, feat_dim: int, which: str = "best", mesh=None) -> PyTree:
    """Params of a finished run (the best checkpoint if there is one, else the last), replicated
    over `mesh` (default: all devices of all processes).

    The target sharding is always given: a checkpoint written by another topology (e.g. 2
    processes x 4 devices, evaluated in 1 process) cannot be restored to its saved sharding.
    """
    ckpts = Checkpoints(workdir, config.keep_checkpoints)
    mgr = ckpts.best if which == "best" else ckpts.last
    step = mgr.best_step() if which == "best" else mgr.latest_step()
    if step is None:
        mgr, step = ckpts.last, ckpts.last.latest_step()
    if step is None:
        ckpts.close()
        raise FileNotFoundError(
            f"no checkpoint in {workdir}/checkpoints; train first: "
            f"python -m stego_jax.train --config <config> --workdir {workdir}")
    abstract = jax.eval_shape(lambda: create_state(config, feat_dim, jax.random.key(0)))
    rep = parallel.replicated(mesh if mesh is not None else parallel.make_mesh())
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)
    state = mgr.restore(step, args=ckpts.ocp.args.StandardRestore(abstract))
    ckpts.close()
    return state["params"]


# ----------------------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------------------

def prepare_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        # One probe name per process: several processes share the workdir.
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"cannot write to workdir {workdir!r} ({e.strerror}); choose a writable --workdir") from e


def save_config(config, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def build_train_featurizer(config, workdir: str | None, train_ds, train_images: np.ndarray | None = None):
    """The frozen featurizer of a run. The 'descriptor' demo featurizer z-scores with statistics
    fitted on the training images and kept in `<workdir>/featurizer.npz` (fitted again when
    `workdir` is None or has none: the fit is deterministic)."""
    from stego_jax.models.featurizers import build_featurizer

    if config.model.featurizer != "descriptor":
        return build_featurizer(config)
    from stego_jax.data.transforms import normalize

    stats_path = os.path.join(workdir, "featurizer.npz") if workdir else None
    have = bool(stats_path) and os.path.exists(stats_path)
    # Every process looks before process 0 may write, so none reads a half-written file.
    parallel.barrier("stego_featurizer_stats_checked")
    if have:
        return build_featurizer(config, stats=dict(np.load(stats_path)))
    if train_images is None:
        train_images = np.stack([train_ds[i]["image"] for i in range(len(train_ds))])
    featurizer = build_featurizer(config, fit_images=normalize(train_images))
    if stats_path and jax.process_index() == 0:
        tmp = stats_path + ".tmp.npz"
        np.savez(tmp, **{k: np.asarray(v) for k, v in featurizer.params.items()})
        os.replace(tmp, stats_path)
    return featurizer


def local_featurize_fn(featurizer, batch: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [B<=batch,H,W,3] -> float32 features on this process's devices alone (no
    collectives): for work processes split among themselves, such as building the on-disk
    feature cache. Calls are padded to one size, so one program is compiled."""
    mesh = parallel.local_mesh()
    featurize = make_featurize(featurizer, mesh)
    size = _chunk_size(batch, batch, mesh)

    def run(images: np.ndarray) -> np.ndarray:
        out = [compute_features(featurize, featurizer.params, _pad_rows(images[i:i + size], size), mesh, size)
               [:len(images[i:i + size])] for i in range(0, len(images), size)]
        return np.concatenate(out)

    return run


def build_training_data(config, workdir: str, mesh, start_step: int):
    """The featurizer, the per-step training batches and the validation batches for `config`."""
    from stego_jax import feature_cache
    from stego_jax import knn as knn_lib
    from stego_jax.data import build_dataset
    from stego_jax.evaluate import eval_config

    train_ds = build_dataset(config, "train")
    cache_dir = feature_cache.cache_dir(config)
    in_memory = bool(config.feature_cache.enabled) and not cache_dir
    train_images = None
    if in_memory:
        train_images = np.stack([train_ds[i]["image"] for i in range(len(train_ds))])
    featurizer = build_train_featurizer(config, workdir, train_ds, train_images)
    featurize = make_featurize(featurizer, mesh)

    def descriptor_knn(descriptors) -> np.ndarray:
        # No precompute CLI for the demo featurizer: the table comes from the cached features
        # (GAP + cosine top-k, as the official precompute, without its dropout quirk).
        return np.asarray(knn_lib.knn_table(descriptors, k=min(config.knn.k, len(descriptors))))

    if cache_dir:
        cache = feature_cache.open_or_build(cache_dir, config, featurizer, train_ds,
                                            local_featurize_fn(featurizer))
        table = (descriptor_knn(cache.descriptors()) if config.model.featurizer == "descriptor"
                 else load_train_knn(config, featurizer, train_ds))
        source = DiskFeatures(cache, table, config, mesh)
    elif in_memory:
        feats = compute_features(featurize, featurizer.params, train_images, mesh, 256)
        labels = np.stack([train_ds[i]["label"] for i in range(len(train_ds))]).astype(np.int32)
        table = (descriptor_knn(knn_lib.global_descriptors(jnp.asarray(feats)))
                 if config.model.featurizer == "descriptor" else load_train_knn(config, featurizer, train_ds))
        source = CachedFeatures(feats, labels, table, config, mesh)
    else:
        table = load_train_knn(config, featurizer, train_ds)
        source = StreamedFeatures(train_ds, table, config, featurize, featurizer.params, mesh, start_step)

    val_ds = build_dataset(eval_config(config), "val")
    n_val = min(len(val_ds), config.num_val_images or len(val_ds))
    cache: list = []

    def val_batches():
        """Validation features are computed once and kept, sharded over the mesh (frozen backbone).
        The last batch is padded to the common size with label -1 rows, which are not counted."""
        if cache:
            yield from cache
            return
        b = _chunk_size(n_val, config.eval.batch_size, mesh)
        for i in range(0, n_val, b):
            items = [val_ds[j] for j in range(i, min(i + b, n_val))]
            images = _pad_rows(np.stack([it["image"] for it in items]), b)
            labels = _pad_rows(np.stack([it["label"] for it in items]).astype(np.int32), b, fill=-1)
            rows = parallel.process_rows(mesh, b)
            cache.append((featurize_sharded(featurize, featurizer.params, images, mesh),
                          jax.make_array_from_process_local_data(parallel.data_sharding(mesh), labels[rows])))
            yield cache[-1]

    return featurizer, source, val_batches


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None) -> dict:
    """Train (or resume) a STEGO head in `workdir`; returns the last validation metrics and the
    parameters. `devices` defaults to all devices of all processes.

    Multi-process (config.distributed or $STEGO_COORDINATOR...): every process runs this same
    function on the same config and workdir (a shared filesystem); each feeds only the rows of
    the global batch its devices hold; process 0 alone writes config.json, featurizer.npz,
    metrics and TensorBoard events; orbax checkpoints are written by all processes together.
    """
    parallel.initialize_distributed(config)  # first: the JAX backend must not have started yet
    validate(config)
    prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        save_config(config, workdir)
    mesh = parallel.make_mesh(devices)
    parallel.check_batch_size(config.batch_size, mesh)

    ckpts = Checkpoints(workdir, config.keep_checkpoints)
    start = ckpts.latest_step() or 0
    featurizer, source, val_batches = build_training_data(config, workdir, mesh, start)
    modules = build_modules(config)
    optimizer = make_optimizer(config)
    rep = parallel.replicated(mesh)
    root = jax.random.key(config.seed)
    init_key, step_key = jax.random.split(root)
    state = jax.jit(lambda k: create_state(config, featurizer.dim, k), out_shardings=rep)(init_key)

    if start:
        state = ckpts.restore(start, jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state))
        if is_main:
            print(f"resumed from step {start} in {workdir}", flush=True)

    step_fn = make_train_step(config, mesh, modules, optimizer)
    confusion_fn = make_confusion_fn(config, modules, mesh)
    predict = make_predict_fn(config, modules)
    logger = Logger(workdir, config.num_steps, is_main)
    window: list = []
    last_eval: dict = {}
    last_good = start
    done = start
    try:
        for step in range(start, config.num_steps):
            batch = source.batch(step)
            state, out = step_fn(state, batch, step_key)
            window.append(out)
            done = step + 1
            if done % config.log_every == 0 or done == config.num_steps:
                host = jax.device_get(window)
                window = []
                bad = [i for i, m in enumerate(host) if bool(m["nonfinite"])]
                if bad:
                    first = done - len(host) + bad[0]
                    raise FloatingPointError(
                        f"non-finite loss at step {first + 1}: training stopped. The parameters were "
                        f"not updated with it; the last good checkpoint (step {last_good}) in "
                        f"{workdir}/checkpoints is intact. Check the input data for NaN/Inf, or lower "
                        f"config.optim.lr (now {config.optim.lr}).")
                mean = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "nonfinite"}
                logger.scalars(done, mean, "train/")
                logger.progress(done, mean["loss"])
            if done % config.eval_every == 0 or done == config.num_steps:
                last_eval = validate_probes(config, state["params"], confusion_fn, val_batches)
                logger.scalars(done, last_eval, "val/")
                panel = preview_panels(config, state["params"], predict, val_batches)
                logger.image("val/segmentation_truth_cluster_linear", done, panel)
                if is_main:
                    print("  val " + " | ".join(f"{k} {v:.2f}" for k, v in last_eval.items()), flush=True)
            if done % config.checkpoint_every == 0 or done == config.num_steps:
                ckpts.save(done, state, last_eval if done % config.eval_every == 0
                           or done == config.num_steps else None)
                last_good = done
    finally:
        ckpts.wait()
        ckpts.close()
        logger.close()
    return {"step": int(done), **last_eval, "params": state["params"]}


def main(argv):
    del argv
    from absl import flags

    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    parallel.enable_compilation_cache()
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and results")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
