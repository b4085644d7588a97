"""Nearest-neighbour precompute for the correspondence loss: global image descriptors, exact cosine
top-k tables, their `.npz` files, and the `python -m stego_jax.knn` command line."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import warnings
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stego_jax import cli, data, featurizers, parallel, run_config
from stego_jax.config import validate
from stego_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from stego_jax.weights.errors import UnreadableFileError
from stego_jax.weights.safetensors_io import read_npz

# Metadata compared on load; `n` and `ids_fingerprint` are what makes a table stale, and
# `featurizer_params_sha256` (the backbone's content, not its file name) what makes it wrong.
META_KEYS = ("dataset", "split", "crop", "backbone", "patch_size", "res", "n", "ids_fingerprint",
             "featurizer_params_sha256")


def global_descriptors(
    patch_feats: jax.Array,
    *,
    dropout_key: jax.Array | None = None,
    dropout_rate: float = 0.1,
) -> jax.Array:
    """Image descriptors: global average pool over the patch grid, L2-normalised.

    Args:
      patch_feats: `[B, h, w, C]` backbone patch features (CLS not included).
      dropout_key: if given, apply channel dropout (`Dropout2d`: one keep/drop draw per image and
        channel, survivors scaled by `1 / (1 - rate)`) before pooling. The official precompute
        extracts through the head's `Dropout2d(0.1)` left in training mode, so its descriptors
        are dropout-affected; pass a key to reproduce that quirk, `None` for clean descriptors.
      dropout_rate: channel drop probability.

    Returns:
      `[B, C]` float32 unit vectors (`x / max(|x|, 1e-12)`, as `F.normalize`).
    """
    f = jnp.asarray(patch_feats, jnp.float32)
    if dropout_key is not None and dropout_rate > 0:
        keep = jax.random.bernoulli(
            dropout_key, 1.0 - dropout_rate, (f.shape[0], 1, 1, f.shape[-1])
        )
        f = jnp.where(keep, f / (1.0 - dropout_rate), 0.0)
    g = jnp.mean(f, axis=(1, 2))
    return g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-12)


def _normalize_np(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_rows(q: jax.Array, d: jax.Array, k: int) -> jax.Array:
    """Indices of the k most similar database rows for each query row (follows the inputs'
    shardings: query rows sharded, database replicated). Module level so repeated calls reuse
    the compiled program."""
    sims = jnp.matmul(q, d.T, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(sims, k)[1]


def knn_table(desc: Any, k: int = 30, chunk: int = 1024) -> np.ndarray:
    """Exact cosine k nearest neighbours of every descriptor within the same set.

    Args:
      desc: `[N, C]` descriptors (normalised here, so any scale works).
      k: neighbours per item (the official table keeps 30; training samples ranks 1..7).
      chunk: query rows per step (rounded up to a multiple of the device count); memory is
        `chunk x N` similarities, never `N x N`.

    Returns:
      int32 `[N, k]` database indices by decreasing similarity. Query set = database set, so
      column 0 is normally the item itself (not when an exact duplicate has a lower index).
      Ties are broken towards the lower index (`lax.top_k` is stable); the official
      `torch.topk` does not specify tie order.

    With several devices the query rows of each chunk are sharded over a 1-D mesh of
    `jax.local_devices()` and the database is replicated; rows are independent, so no communication.
    """
    db = _normalize_np(desc)
    n = db.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in [1, N={n}]")
    # This process's devices: with several processes every one needs the whole table, and an
    # output sharded over all processes' devices could not be read back here.
    devices = jax.local_devices()
    n_dev = len(devices)
    chunk = max(1, min(chunk, n))
    chunk = -(-chunk // n_dev) * n_dev
    mesh = Mesh(np.array(devices), ("q",))
    rows, repl = NamedSharding(mesh, P("q")), NamedSharding(mesh, P())

    top = functools.partial(_top_k_rows, k=k)
    db_dev = jax.device_put(db, repl)
    out = np.empty((n, k), np.int32)
    for start in range(0, n, chunk):
        q = db[start : start + chunk]
        m = q.shape[0]
        if m < chunk:  # pad the last chunk: one compiled shape for all chunks
            q = np.pad(q, ((0, chunk - m), (0, 0)))
        out[start : start + m] = np.asarray(top(jax.device_put(q, rows), db_dev))[:m]
    return out


def ids_fingerprint(ids: Sequence[Any]) -> str:
    """sha256 hex of the ordered list of image ids (order matters: table rows are indices)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode("utf-8") + b"\n")
    return h.hexdigest()


def knn_filename(
    backbone: str, patch_size: int, dataset: str, split: str, crop: Any, res: int
) -> str:
    """`nns_{backbone}_p{patch}_{dataset}_{split}_{crop}_{res}.npz`. The official name
    `nns_{model}_{dataset}_{split}_{crop}_{res}.npz` has no patch size, so ViT-S/8 and ViT-S/16
    tables collide; ours adds it."""
    return f"nns_{backbone}_p{patch_size}_{dataset}_{split}_{crop}_{res}.npz"


def table_meta(config: Any, featurizer: Any, split: str, ids: Sequence[Any]) -> dict[str, Any]:
    """The metadata (`META_KEYS`) a table of `split` is written with and checked against on load.

    `featurizer_params_sha256` hashes the featurizer's parameters, so a table computed with other
    weights under the same backbone name is refused on load.
    """
    meta = {
        "dataset": config.data.name,
        "split": split,
        "crop": config.data.get("crop_type", None),
        "backbone": featurizer.name,
        "patch_size": int(featurizer.patch_size),
        "res": int(config.data.res),
        "n": len(ids),
        "ids_fingerprint": ids_fingerprint(ids),
    }
    if getattr(featurizer, "params", None) is not None:
        meta["featurizer_params_sha256"] = featurizers.params_sha256(featurizer.params)
    return meta


def table_path(config: Any, featurizer: Any, split: str) -> str:
    """Where the table of `split` lives: `config.knn.dir` (default `<config.data.root>/nns`) /
    `knn_filename(...)`."""
    out_dir = config.knn.get("dir", "") or os.path.join(config.data.get("root", ""), "nns")
    name = knn_filename(featurizer.name, int(featurizer.patch_size), config.data.name, split,
                        config.data.get("crop_type", None), int(config.data.res))
    return os.path.join(out_dir, name)


def save_knn(path: str, table: Any, meta: Mapping[str, Any]) -> None:
    """Write `table` int `[N, k]` under the official key `nns`, plus `meta` as JSON (key `meta`).

    `meta` should hold `META_KEYS` (dataset, split, crop, backbone, patch_size, res, n,
    ids_fingerprint); `n` must equal the number of rows.
    """
    table = np.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"k-NN table must be [N, k], got shape {table.shape}")
    if "n" in meta and int(meta["n"]) != table.shape[0]:
        raise ValueError(f"meta n={meta['n']} but the table has {table.shape[0]} rows")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"  # write then rename: an interrupted run leaves no half file
    np.savez_compressed(tmp, nns=table, meta=np.array(json.dumps(dict(meta), sort_keys=True)))
    os.replace(tmp, path)


def load_knn(
    path: str,
    *,
    expect_meta: Mapping[str, Any],
    config_hint: str = "configs/<name>.py",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a table written by `save_knn` (or the official precompute) and check it is current.

    Args:
      path: `.npz` file.
      expect_meta: the values training uses (any subset of `META_KEYS`); every key present in
        both is compared, `n` is also checked against the row count.
      config_hint: config path quoted in the error's fix.

    Returns:
      (int32 `[N, k]` table, stored metadata dict).

    Raises:
      FileNotFoundError / ValueError naming the file, the mismatch and the command to rerun;
      `UnreadableFileError` (a ValueError) when the file is truncated or corrupt.
      An official file (no metadata) is checked on `n` only, like the official loader's
      `len(dataset) == nns.shape[0]` assertion, and a warning says so.
    """
    fix = f"rerun python -m stego_jax.knn --config {config_hint}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"k-NN table {path} does not exist; {fix}")
    remake = f"Delete it and {fix}"
    arrays = read_npz(path, fix=remake, error=UnreadableFileError)
    if "nns" not in arrays:
        raise UnreadableFileError(path, f"k-NN table {path} has no 'nns' array; {fix}")
    nns = arrays["nns"]
    if not (isinstance(nns, np.ndarray) and nns.ndim == 2 and np.issubdtype(nns.dtype, np.integer)):
        raise UnreadableFileError(
            path, f"k-NN table {path}: 'nns' must be an integer [N, k] array, got "
            f"{getattr(nns, 'dtype', type(nns).__name__)} {getattr(nns, 'shape', '')}; the file is "
            f"corrupt. {remake}"
        )
    if nns.size and (nns.min() < 0 or nns.max() >= nns.shape[0]):
        raise UnreadableFileError(
            path, f"k-NN table {path}: indices span [{nns.min()}, {nns.max()}], outside the "
            f"{nns.shape[0]} rows; the file is corrupt. {remake}"
        )
    table = nns.astype(np.int32)
    meta: Any = {}
    if "meta" in arrays:
        raw = arrays["meta"]
        try:
            if not (isinstance(raw, np.ndarray) and raw.ndim == 0 and raw.dtype.kind == "U"):
                raise ValueError(f"'meta' is {getattr(raw, 'dtype', type(raw).__name__)}, not a string")
            meta = json.loads(str(raw))
            if not isinstance(meta, dict):
                raise ValueError("'meta' is not a JSON object")
        except (ValueError, RecursionError) as e:
            raise UnreadableFileError(
                path, f"k-NN table {path}: unreadable metadata ({str(e)[:120]}); the file is "
                f"corrupt. {remake}"
            ) from None
    if not meta:
        warnings.warn(f"{path} has no metadata (official format?): only its row count is checked")
    meta.setdefault("n", int(table.shape[0]))
    stored_n = int(table.shape[0])
    diffs = {
        key: (meta[key], expect_meta[key])
        for key in expect_meta
        if key in meta and meta[key] != expect_meta[key]
    }
    if "n" in expect_meta and int(expect_meta["n"]) != stored_n:
        diffs["n"] = (stored_n, expect_meta["n"])
    if diffs:
        was = ", ".join(f"{key}={a!r}" for key, (a, _) in sorted(diffs.items()))
        now = ", ".join(f"{key}={b!r}" for key, (_, b) in sorted(diffs.items()))
        why = ""
        if "featurizer_params_sha256" in diffs:
            why = (" (the backbone's weights differ from those the table was computed with, "
                   "even if its name is the same)")
        raise ValueError(
            f"k-NN table {path} was computed for {was} but training uses {now}{why}; {fix}"
        )
    return table, meta


def dataset_descriptors(
    apply: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    dataset: Any,
    batch_size: int,
    *,
    dropout_key: jax.Array | None = None,
    dropout_rate: float = 0.1,
) -> tuple[np.ndarray, list[Any], tuple[int, int]]:
    """Descriptors of every item of a dataset, in dataset order.

    Args:
      apply: `apply(params, images [B, H, W, 3] float32 ImageNet-normalised) -> [B, h, w, C]`
        (a `Featurizer.apply`; params are a jit argument, not baked-in constants).
      params: its parameters.
      dataset: `len()` and `dataset[i] -> {"image": uint8 [H, W, 3], "id": ...}`.
      batch_size: images per call; the last batch is zero-padded so one shape is compiled.
      dropout_key: reproduce the official Dropout2d quirk (see `global_descriptors`); batch `b`
        uses `fold_in(dropout_key, b)`, so the draws depend on `batch_size`.
      dropout_rate: its rate.

    Returns:
      (`[N, C]` float32 descriptors, list of `N` ids, patch grid `(h, w)`).
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty")

    def describe(params, images, key):
        x = (images.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return global_descriptors(apply(params, x), dropout_key=key, dropout_rate=dropout_rate)

    describe = jax.jit(describe)
    out, ids, grid = [], [], None
    for b, start in enumerate(range(0, n, batch_size)):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        ids.extend(it["id"] for it in items)
        images = np.stack([np.asarray(it["image"], np.uint8) for it in items])
        m = images.shape[0]
        if m < batch_size:
            images = np.pad(images, ((0, batch_size - m),) + ((0, 0),) * 3)
        if grid is None:
            spec = jax.ShapeDtypeStruct(images.shape, jnp.float32)
            grid = tuple(jax.eval_shape(apply, params, spec).shape[1:3])
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, b)
        out.append(np.asarray(describe(params, images, key))[:m])
    return np.concatenate(out), ids, grid


def run(
    config: Any,
    *,
    build_featurizer: Callable[[Any], Any] | None = None,
    build_dataset: Callable[[Any, str], Any] | None = None,
) -> list[str]:
    """Compute and write the k-NN table of each configured split; returns the written paths.

    Reads `config.knn.k`, `config.knn.dir` (empty: `<config.data.root>/nns`), optional
    `config.knn.{splits=("train", "val"), dropout, seed}`, `config.data.{name, crop_type, res}`,
    `config.model.{featurizer, dropout}`, `config.batch_size`. Existing files are overwritten
    (the official script skips them, which hides stale tables). The builders default to
    `stego_jax.featurizers.build_featurizer` (-> object with `name`, `apply`, `params`,
    `patch_size`) and `stego_jax.data.build_dataset`.
    """
    if config.model.get("featurizer", "dino") == "descriptor":
        # Its z-score statistics live in a training workdir; train.py builds that table itself.
        raise ValueError(
            "config.model.featurizer='descriptor': its k-NN table is computed in-process by "
            "python -m stego_jax.train; this command is for DINO backbones"
        )
    build_featurizer = build_featurizer or featurizers.build_featurizer
    build_dataset = build_dataset or data.build_dataset

    knn_cfg = config.knn
    featurizer = build_featurizer(config)
    # The official extraction runs through the head's Dropout2d(0.1) (when cfg.dropout) left in
    # training mode; reproduced by default to be faithful.
    default_rate = 0.1 if config.model.get("dropout", True) else 0.0
    dropout = float(knn_cfg.get("dropout", default_rate))
    key = jax.random.key(int(knn_cfg.get("seed", config.get("seed", 0))))
    paths = []
    for split in tuple(knn_cfg.get("splits", ("train", "val"))):
        dataset = build_dataset(config, split)
        split_key = jax.random.fold_in(key, zlib.crc32(split.encode()) % (2**31))
        desc, ids, grid = dataset_descriptors(
            featurizer.apply,
            featurizer.params,
            dataset,
            int(config.batch_size),
            dropout_key=split_key if dropout > 0 else None,
            dropout_rate=dropout,
        )
        meta = table_meta(config, featurizer, split, ids)
        path = table_path(config, featurizer, split)
        table = knn_table(desc, k=int(knn_cfg.k))
        save_knn(path, table, meta)
        logging.info("wrote %s (%d x %d, patch grid %s)", path, *table.shape, grid)
        paths.append(path)
    return paths


def _define(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    cli.define_config(fv, argv, required=False)
    flags.DEFINE_string("workdir", None, "an existing run: use its own config.json (--config may then change "
                        "only where the data live)", flag_values=fv)


def _main(fv: flags.FlagValues, _) -> int:
    if fv.config is None and not fv.workdir:
        raise flags.ValidationError("give --config, or --workdir of an existing run")
    config = run_config.config_of_run(fv.workdir, fv.config) if fv.workdir else fv.config
    validate(config)
    parallel.enable_compilation_cache()
    for path in run(config):
        print(f"wrote {path}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m stego_jax.knn --config configs/<name>.py`; returns the exit status."""
    return cli.run("stego_jax.knn", __doc__, _define, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
