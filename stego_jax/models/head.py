"""The STEGO segmentation head (linear + nonlinear projection of frozen features to codes) and
the two evaluation probes trained on detached codes: cosine cluster probe and linear probe."""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from stego_jax.ops import norm

Array = jax.Array


def _torch_uniform(fan_in: int) -> Callable:
    """PyTorch's default Conv2d/Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    kaiming_uniform(a=sqrt(5)) on the weight and the bias rule both reduce to this bound; the
    official STEGO head keeps PyTorch's defaults, so we match them rather than Flax's lecun_normal.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense(features: int, fan_in: int, name: str) -> nn.Dense:
    return nn.Dense(
        features, kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in), name=name
    )


class SegmentationHead(nn.Module):
    """STEGO projection head (official ``DinoFeaturizer`` minus the backbone).

    ``code = linear(drop_a(f)) + nonlinear(drop_b(f))`` with ``nonlinear = Dense(C) -> ReLU ->
    Dense(dim)``; the returned features are a third independently dropped copy ``drop_c(f)`` in
    training when ``feature_dropout`` (official ``cfg.dropout``), else ``f``. Dropouts are channel
    dropouts (one mask per image and channel, kept channels scaled by ``1/(1-rate)``), using the
    ``'dropout'`` rng collection.

    Attributes:
      dim: code dimension D.
      projection: ``"linear"`` or ``"nonlinear"`` (linear branch plus the MLP branch).
      dropout_rate: channel-dropout probability.
      feature_dropout: drop channels of the returned features in training.
    """

    dim: int = 70
    projection: str = "nonlinear"
    dropout_rate: float = 0.1
    feature_dropout: bool = True

    @nn.compact
    def __call__(self, feats: Array, *, train: bool) -> tuple[Array, Array]:
        """Project features to codes.

        Args:
          feats: ``[B, h, w, C]`` backbone features.
          train: enables the channel dropouts (needs a ``'dropout'`` rng).
        Returns:
          ``(feats_out [B, h, w, C], code [B, h, w, dim])``.
        """
        if self.projection not in ("linear", "nonlinear"):
            raise ValueError(
                "SegmentationHead.projection must be 'linear' or 'nonlinear', "
                f"got {self.projection!r}"
            )
        c = feats.shape[-1]

        def drop(name: str) -> Array:
            # broadcast over H, W (axes 1, 2) = Dropout2d on NCHW: whole channels per image.
            return nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), name=name)(
                feats, deterministic=not train
            )

        code = _dense(self.dim, c, "linear")(drop("dropout_linear"))
        if self.projection == "nonlinear":
            h = nn.relu(_dense(c, c, "nonlinear_0")(drop("dropout_nonlinear")))
            code = code + _dense(self.dim, c, "nonlinear_1")(h)
        feats_out = drop("dropout_feats") if self.feature_dropout else feats
        return feats_out, code


class ClusterProbe(nn.Module):
    """Cosine cluster probe (official ``ClusterLookup``): centroids ``clusters [n_clusters, D]``,
    initialised standard normal like the official ``torch.randn``."""

    n_clusters: int

    @nn.compact
    def __call__(self, code: Array) -> Array:
        """Cosine similarity of each code to each centroid.

        Args:
          code: ``[..., D]``.
        Returns:
          ``[..., n_clusters]``.
        """
        clusters = self.param(
            "clusters", nn.initializers.normal(1.0), (self.n_clusters, code.shape[-1]), jnp.float32
        )
        # F.normalize's default eps (1e-12) here, unlike the 1e-10 of the correspondence loss.
        return norm(code, 1e-12) @ norm(clusters, 1e-12).T


class LinearProbe(nn.Module):
    """Linear probe (official 1x1 ``Conv2d(D, n_classes)``), PyTorch default init."""

    n_classes: int

    @nn.compact
    def __call__(self, code: Array) -> Array:
        """Class logits: ``code [..., D] -> [..., n_classes]``."""
        return _dense(self.n_classes, code.shape[-1], "dense")(code)


def cluster_probs(cos: Array, alpha: float = 2.0) -> Array:
    """Soft cluster assignment used as the CRF unary at evaluation: ``softmax(alpha * cos)``.

    Args:
      cos: ``[..., K]`` cluster-probe cosines.
    Returns:
      ``[..., K]`` probabilities.
    """
    return jax.nn.softmax(alpha * cos, axis=-1)
