"""The trainable STEGO model: its modules, optimizer and state, eval-mode codes, and the probe
outputs that training validation, evaluation and prediction all read."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from stego_jax import ops
from stego_jax.models.head import ClusterProbe, LinearProbe, SegmentationHead

PyTree = Any


def build_modules(config) -> tuple[SegmentationHead, ClusterProbe, LinearProbe]:
    """(head, cluster probe, linear probe) of `config`."""
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
    """{"step", "params", "opt_state"}: everything a checkpoint holds."""
    params = init_params(config, feat_dim, key)
    opt_state = make_optimizer(config).init(params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}


def codes(head, head_params, feats):
    """Eval-mode codes [B,h,w,D] from frozen features [B,h,w,C]."""
    return head.apply({"params": head_params}, feats, train=False)[1]


def probe_outputs(modules, params, code, out_hw: tuple[int, int]) -> dict:
    """Codes [B,h,w,D] -> the probes' logits at `out_hw` (the official evaluation path).

    Returns {"cluster": 2*cos to the cluster centres (the official unary: softmax of it),
    "linear": linear-probe logits, "codes": the bilinearly upsampled codes}, each [B,H,W,*].
    Under `jax.jit` outputs a caller does not use are not computed.
    """
    _, cluster, linear = modules
    up = ops.upsample_bilinear(code, out_hw)
    cos = cluster.apply({"params": params["cluster_probe"]}, up)
    logits = linear.apply({"params": params["linear_probe"]}, up)
    return {"cluster": 2.0 * cos, "linear": logits, "codes": up}
