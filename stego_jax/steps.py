"""The compiled steps of a run: the loss, the data-parallel train step, and validation's
per-batch predictions and confusion counts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stego_jax import losses, metrics, parallel
from stego_jax.model import codes, probe_outputs


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
    """`step(state, batch, key) -> (state, metrics)`: replicated state, batch sharded over `mesh`,
    the state's buffers donated."""
    rep = parallel.replicated(mesh)
    dat = parallel.data_sharding(mesh)
    fn = functools.partial(train_step, config=config, modules=modules, optimizer=optimizer)
    return jax.jit(fn, in_shardings=(rep, dat, rep), out_shardings=(rep, rep), donate_argnums=(0,))


def make_predict_fn(config, modules):
    """feats -> (cluster prediction, linear prediction) at label resolution, no CRF, no flip
    (the official during-training validation)."""
    head = modules[0]

    @functools.partial(jax.jit, static_argnums=(2,))
    def predict(params, feats, out_hw):
        out = probe_outputs(modules, params, codes(head, params["head"], feats), out_hw)
        return (jnp.argmax(out["cluster"], -1).astype(jnp.int32),
                jnp.argmax(out["linear"], -1).astype(jnp.int32))

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
