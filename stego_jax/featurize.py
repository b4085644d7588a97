"""Running the frozen featurizer: the run's featurizer, jitted and sharded feature extraction
(one program per shape, rows padded to it), and eval-mode codes from images."""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stego_jax import parallel
from stego_jax.data import build_dataset
from stego_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from stego_jax.featurizers import Featurizer, build_featurizer
from stego_jax.model import codes

FEATURIZER_STATS = "featurizer.npz"


# ----------------------------------------------------------------------------------------
# The run's featurizer
# ----------------------------------------------------------------------------------------

def backbone_in_workdir(config, workdir: str | None):
    """`config` with `model.backbone` resolved against `workdir` when it names a file there by a
    relative path (a run that carries its own backbone, e.g. an imported official checkpoint's
    `backbone.npz`); otherwise `config` itself (a registry name, or a path from the current directory)."""
    backbone = str(config.model.get("backbone", ""))
    if not workdir or not backbone or os.path.isabs(backbone):
        return config
    path = os.path.join(workdir, backbone)
    if not os.path.isfile(path):
        return config
    resolved = config.copy_and_resolve_references()
    resolved.model.backbone = os.path.abspath(path)
    return resolved


def run_featurizer(config, workdir: str | None, *, fit: bool = False, train_ds=None,
                   train_images: np.ndarray | None = None) -> Featurizer:
    """The frozen featurizer of the run in `workdir`.

    A DINO featurizer depends on the config alone (its `model.backbone` read relative to `workdir`
    when the run carries the file, see `backbone_in_workdir`). The 'descriptor' demo featurizer z-scores
    with statistics fitted on the training images and kept in `<workdir>/featurizer.npz`:
    they are read from there when present; otherwise, with `fit=True` (training), fitted on the
    training split (`train_images`, else `train_ds`, else the config's dataset; the fit is
    deterministic) and written there when `workdir` is given; with `fit=False` (a finished run)
    their absence is an error naming the file.
    """
    if config.model.featurizer != "descriptor":
        return build_featurizer(backbone_in_workdir(config, workdir))
    path = os.path.join(workdir, FEATURIZER_STATS) if workdir else None
    have = bool(path) and os.path.exists(path)
    if not fit:
        if not have:
            raise FileNotFoundError(f"{path} is missing: the descriptor statistics are saved by training")
        return build_featurizer(config, stats=dict(np.load(path)))
    # Every process looks before process 0 may write, so none reads a half-written file.
    parallel.barrier("stego_featurizer_stats_checked")
    if have:
        return build_featurizer(config, stats=dict(np.load(path)))
    if train_images is None:
        ds = train_ds if train_ds is not None else build_dataset(config, "train")
        train_images = np.stack([ds[i]["image"] for i in range(len(ds))])
    featurizer = build_featurizer(config, fit_images=normalize(train_images))
    if path and jax.process_index() == 0:
        tmp = path + ".tmp.npz"
        np.savez(tmp, **{k: np.asarray(v) for k, v in featurizer.params.items()})
        os.replace(tmp, path)
    return featurizer


# ----------------------------------------------------------------------------------------
# Features on a mesh
# ----------------------------------------------------------------------------------------

def make_featurize(featurizer: Featurizer, mesh):
    """`featurize(params, uint8 images [B,H,W,3] sharded) -> frozen features [B,h,w,C]`;
    ImageNet normalisation on device."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)

    def featurize(params, images):
        x = (images.astype(jnp.float32) / 255.0 - mean) / std
        return jax.lax.stop_gradient(featurizer.apply(params, x))

    rep = parallel.replicated(mesh)
    dat = parallel.data_sharding(mesh)
    return jax.jit(featurize, in_shardings=(rep, dat), out_shardings=dat)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_rows(x: np.ndarray, size: int, fill=None) -> np.ndarray:
    """`x` grown to `size` rows: copies of its last row, or rows of `fill` (e.g. label -1)."""
    pad = size - len(x)
    if pad <= 0:
        return x
    tail = np.repeat(x[-1:], pad, 0) if fill is None else np.full((pad,) + x.shape[1:], fill, x.dtype)
    return np.concatenate([x, tail])


def chunk_size(n: int, batch: int, mesh) -> int:
    """Rows per featurizer call: a multiple of the device count, no larger than needed for `n`."""
    n_dev = mesh.devices.size
    return max(n_dev, round_up(min(max(batch, 1), n), n_dev))


def featurize_sharded(featurize, fparams, images: np.ndarray, mesh) -> jax.Array:
    """Features of one chunk of uint8 images [B,H,W,3] (B a multiple of the device count), every
    process passing the same chunk: each puts only its own rows on its devices, so the call is
    one data-parallel program over all processes. Returns the global sharded features."""
    rows = parallel.process_rows(mesh, len(images))
    local = jax.make_array_from_process_local_data(parallel.data_sharding(mesh), images[rows])
    return featurize(fparams, local)


def compute_features(featurize, fparams, images: np.ndarray, mesh, batch: int) -> np.ndarray:
    """Frozen features [N,h,w,C] float32 of a uint8 image array [N,H,W,3], whole on every process.

    Every process must call it with the same `images`; each featurizes its share of every chunk
    and the shares are all-gathered. Chunks are padded to one size, so one program is compiled.
    With a `parallel.local_mesh()` it runs on this process's devices alone.
    """
    size = chunk_size(len(images), batch, mesh)
    out = []
    for i in range(0, len(images), size):
        chunk = images[i:i + size]
        f = parallel.gather_to_host(featurize_sharded(featurize, fparams, pad_rows(chunk, size), mesh))
        out.append(f[:len(chunk)])
    return np.concatenate(out)


def local_featurize_fn(featurizer: Featurizer, batch: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [B<=batch,H,W,3] -> float32 features on this process's devices alone (no
    collectives): for work processes split among themselves, such as building the on-disk
    feature cache. Calls are padded to one size, so one program is compiled."""
    mesh = parallel.local_mesh()
    featurize = make_featurize(featurizer, mesh)
    size = chunk_size(batch, batch, mesh)

    def run(images: np.ndarray) -> np.ndarray:
        out = [compute_features(featurize, featurizer.params, pad_rows(images[i:i + size], size), mesh, size)
               [:len(images[i:i + size])] for i in range(0, len(images), size)]
        return np.concatenate(out)

    return run


# ----------------------------------------------------------------------------------------
# Codes from images (evaluation and prediction)
# ----------------------------------------------------------------------------------------

def make_code_fn(modules, featurize, flip: bool):
    """`code_fn(fparams, head_params, uint8 images) -> eval codes [B,h,w,D]`, averaged with the
    horizontally flipped image's codes when `flip` (as the official evaluation)."""
    head = modules[0]

    @jax.jit
    def code_fn(fparams, head_params, images):
        c = codes(head, head_params, featurize(fparams, images))
        if flip:
            c_flip = codes(head, head_params, featurize(fparams, images[:, :, ::-1]))
            c = (c + c_flip[:, :, ::-1]) / 2
        return c

    return code_fn
