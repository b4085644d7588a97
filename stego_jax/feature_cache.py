"""On-disk cache of the frozen backbone's training features: built once, checksummed, read by
memory-mapped rows each step; also `python -m stego_jax.feature_cache --config <file>`.

Valid because the backbone is frozen and the official training crops are deterministic, so the
features of item i never change. Layout of `config.feature_cache.dir`:

    manifest.json                 written last: its presence means the cache is complete
    shard-00000.feats.npy         [rows, h, w, C] bfloat16 (stored as its uint16 bits) or float32
    shard-00000.labels.npy        [rows, res, res] int8/int16 labels (-1 = ignore)
    shard-00000.desc.npy          [rows, C] float32 global descriptors (for k-NN tables)
    ...

The manifest holds the fingerprint of everything the features depend on (featurizer, its
weights, data source and transform, dataset ids) and a sha256 per file. Opening a cache built
for another configuration is a ValueError naming the differing fields; a shard whose bytes do
not match its checksum (verified lazily, when a process first reads it) is a ValueError naming
the file. Neither is ever silently rebuilt over.

bfloat16 (the default `feature_cache.dtype`) halves disk, page cache and host-to-device bytes,
and is a deliberate difference from the official code, whose features are float32: the step
upcasts to float32, but the stored values carry bf16 rounding (relative error <= 2^-9).
`feature_cache.dtype = "float32"` stores them exactly.

Multi-process build: every process featurizes and writes its own shards (shard s by process
s mod P) on its own devices, with no cross-process traffic; after a barrier, process 0 writes the
manifest. The directory must be on a filesystem all processes see (each later reads any row).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import flags

from stego_jax import knn as knn_lib
from stego_jax import cli, parallel, run_config
from stego_jax.config import validate
from stego_jax.data import build_dataset
from stego_jax.featurize import local_featurize_fn, run_featurizer
from stego_jax.featurizers import params_sha256  # noqa: F401  (also this module's name for it)
from stego_jax.weights.errors import UnreadableFileError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTS = ("feats", "labels", "desc")
DTYPES = ("bfloat16", "float32")
# Data fields that cannot change the training items (workers, the validation split's size).
_DATA_FIELDS_IGNORED = ("num_workers", "n_val")
_SHARD_BYTES = 256 << 20  # default shard size: big sequential files, few of them


def cache_dir(config) -> str:
    """The on-disk cache directory of `config` ("" = none: in-memory cache or streamed images)."""
    fc = config.feature_cache
    d = str(fc.get("dir", "") or "")
    if d and not fc.enabled:
        raise ValueError(
            f"config.feature_cache.dir={d!r} is set but config.feature_cache.enabled is False; set "
            "enabled=True to train from the on-disk cache, or dir='' to compute features every step")
    if d:
        cache_dtype(config)  # fail before any featurizing
    return d


def cache_dtype(config) -> str:
    dtype = str(config.feature_cache.get("dtype", "bfloat16"))
    if dtype not in DTYPES:
        raise ValueError(f"config.feature_cache.dtype={dtype!r} is not allowed; choose one of {list(DTYPES)}")
    return dtype


def fingerprint(config, featurizer, dataset) -> dict:
    """Everything the cached training features and labels depend on, JSON-normalised."""
    data = {k: v for k, v in config.data.to_dict().items() if k not in _DATA_FIELDS_IGNORED}
    if data.get("root"):
        data["root"] = os.path.abspath(data["root"])
    fp = {
        "format_version": FORMAT_VERSION,
        "dtype": cache_dtype(config),
        "featurizer": str(config.model.featurizer),
        "backbone": str(featurizer.name),
        "patch_size": int(featurizer.patch_size),
        "feature_dim": int(featurizer.dim),
        "model_dtype": str(config.model.get("dtype", "float32")),
        "featurizer_params_sha256": params_sha256(featurizer.params),
        "data": data,
        "split": "train",
        "n": len(dataset),
        "ids_fingerprint": knn_lib.ids_fingerprint(dataset.ids),
    }
    return json.loads(json.dumps(fp))


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_name(s: int, part: str) -> str:
    return f"shard-{s:05d}.{part}.npy"


def _rebuild_hint(directory: str) -> str:
    return (f"delete {directory} (or point config.feature_cache.dir elsewhere) and rebuild it: rerun "
            f"training, or `python -m stego_jax.feature_cache --config <config>`")


def _label_dtype(n_classes: int):
    return np.int8 if n_classes <= 127 else np.int16


def _save_npy(path: str, array: np.ndarray) -> str:
    """Write atomically (temp + rename: a killed build never leaves a plausible file); sha256."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
    digest = _file_sha256(tmp)
    os.replace(tmp, path)
    return digest


def write_shard(directory: str, s: int, feats: np.ndarray, labels: np.ndarray, desc: np.ndarray,
                dtype: str, n_classes: int) -> dict:
    """Write shard `s` (`feats` float32 [r,h,w,C], `labels` int [r,H,W], `desc` float32 [r,C]);
    returns its manifest entry."""
    if dtype == "bfloat16":
        # numpy has no bfloat16 in .npy headers: store the bits, view them back on read.
        stored = np.asarray(feats, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    else:
        stored = np.asarray(feats, np.float32)
    ldt = _label_dtype(n_classes)
    info = np.iinfo(ldt)
    if labels.size and (labels.min() < info.min or labels.max() > info.max):
        raise ValueError(f"labels of shard {s} span [{labels.min()}, {labels.max()}], outside {ldt.__name__} "
                         f"chosen for config.data.n_classes={n_classes}; check config.data.n_classes")
    arrays = {"feats": stored, "labels": labels.astype(ldt), "desc": np.asarray(desc, np.float32)}
    files = {part: {"name": _shard_name(s, part),
                    "sha256": _save_npy(os.path.join(directory, _shard_name(s, part)), arrays[part])}
             for part in PARTS}
    return {"index": s, "rows": int(len(feats)), "files": files}


def build(directory: str, fp: dict, dataset, featurize: Callable[[np.ndarray], np.ndarray], *,
          feature_shape: tuple[int, int, int], n_classes: int, shard_rows: int = 0, batch: int = 64, process_index: int = 0,
          process_count: int = 1, barrier: Callable[[str], None] = lambda name: None,
          log: Callable[[str], None] = print) -> None:
    """Write the cache of `dataset` (items `{"image", "label"}`) to `directory`.

    `featurize(uint8 images [B,H,W,3]) -> float32 [B,h,w,C]` runs on this process's devices.
    Called by every process with its index: process p writes the shards s with s % P == p, then
    all meet at `barrier`, then process 0 writes the manifest. `shard_rows=0` picks ~256 MB shards.
    """
    dtype = fp["dtype"]
    n = len(dataset)
    os.makedirs(directory, exist_ok=True)
    feature_shape = tuple(int(d) for d in feature_shape)
    row_bytes = int(np.prod(feature_shape)) * (2 if dtype == "bfloat16" else 4)
    rows = int(shard_rows) or max(1, _SHARD_BYTES // max(row_bytes, 1))
    n_shards = -(-n // rows)
    t0 = time.time()
    for s in range(process_index, n_shards, process_count):
        lo, hi = s * rows, min((s + 1) * rows, n)
        feats, labels, desc = [], [], []
        for i in range(lo, hi, batch):  # host memory: one shard at a time
            items = [dataset[j] for j in range(i, min(i + batch, hi))]
            f = np.asarray(featurize(np.stack([np.asarray(it["image"], np.uint8) for it in items])), np.float32)
            if f.shape[1:] != feature_shape:
                raise ValueError(f"the featurizer gives features of shape {f.shape[1:]}, expected {feature_shape} "
                                 f"(config.data.res / patch size, feature dim)")
            feats.append(f)
            labels.append(np.stack([np.asarray(it["label"]) for it in items]))
            # Descriptors from the float32 features, so the k-NN table does not depend on `dtype`.
            desc.append(np.asarray(knn_lib.global_descriptors(jnp.asarray(f))))
        entry = write_shard(directory, s, np.concatenate(feats), np.concatenate(labels), np.concatenate(desc),
                            dtype, n_classes)
        with open(os.path.join(directory, f"shard-{s:05d}.json.tmp"), "w") as f:
            json.dump(entry, f)
        os.replace(os.path.join(directory, f"shard-{s:05d}.json.tmp"), os.path.join(directory, f"shard-{s:05d}.json"))
        log(f"feature cache: wrote shard {s + 1}/{n_shards} ({hi - lo} rows) to {directory} "
            f"[{time.time() - t0:.0f}s]")
    barrier("stego_feature_cache_shards_written")
    if process_index == 0:
        shards = []
        for s in range(n_shards):
            side = os.path.join(directory, f"shard-{s:05d}.json")
            if not os.path.exists(side):
                raise FileNotFoundError(
                    f"feature cache build: {side} is missing after all processes finished; is "
                    f"{directory} on a filesystem every process sees?")
            with open(side) as f:
                shards.append(json.load(f))
        manifest = {"fingerprint": fp, "n": n, "shard_rows": rows, "feature_shape": list(feature_shape),
                    "dtype": dtype, "label_dtype": np.dtype(_label_dtype(n_classes)).name, "shards": shards,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = os.path.join(directory, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(directory, MANIFEST))
        for s in range(n_shards):
            os.remove(os.path.join(directory, f"shard-{s:05d}.json"))
    barrier("stego_feature_cache_manifest_written")


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two JSON trees differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: cache has {a!r}, config gives {b!r}"]


def _read_manifest(path: str, directory: str) -> dict:
    """The parsed manifest; UnreadableFileError naming it and the rebuild when it is truncated,
    not JSON, or lacks the fields and types the reader relies on."""
    def bad(what: str) -> UnreadableFileError:
        return UnreadableFileError(path, f"feature cache manifest {path} {what}: the file is truncated or "
                                   f"corrupt; {_rebuild_hint(directory)}")

    try:
        with open(path, "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(m, dict):
        raise bad("is not a JSON object")
    want = {"fingerprint": dict, "n": int, "shard_rows": int, "feature_shape": list, "dtype": str, "shards": list}
    for key, kind in want.items():
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise bad(f"has no valid {key!r}")
    if m["dtype"] not in DTYPES or m["n"] < 0 or m["shard_rows"] < 1:
        raise bad(f"has dtype {m['dtype']!r:.40}, n {m['n']}, shard_rows {m['shard_rows']}")
    if not all(type(d) is int and d > 0 for d in m["feature_shape"]):
        raise bad("has an invalid feature_shape")
    if len(m["shards"]) != -(-m["n"] // m["shard_rows"]):
        raise bad(f"lists {len(m['shards'])} shards for n={m['n']} rows of {m['shard_rows']}")
    for s, shard in enumerate(m["shards"]):
        files = shard.get("files") if isinstance(shard, dict) else None
        if not isinstance(files, dict) or not all(
                isinstance(files.get(part), dict) and isinstance(files[part].get("name"), str)
                and isinstance(files[part].get("sha256"), str)
                and os.path.basename(files[part]["name"]) == files[part]["name"] for part in PARTS):
            raise bad(f"has a malformed entry for shard {s}")
    return m


class FeatureCache:
    """Read side of the cache: rows by dataset index from memory-mapped shards.

    `expect` (a `fingerprint(...)`) is compared with the manifest at open. Each shard's files are
    checked against their sha256 the first time this process reads them.
    """

    def __init__(self, directory: str, expect: dict | None = None):
        self.directory = directory
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: no complete feature cache in {directory}; build it by training with "
                f"config.feature_cache.dir={directory!r}, or `python -m stego_jax.feature_cache --config <config>`")
        self.manifest = _read_manifest(path, directory)
        if expect is not None:
            diffs = _diff(self.manifest["fingerprint"], expect)
            if diffs:
                raise ValueError(f"feature cache {directory} does not match the config: " + "; ".join(diffs)
                                 + f". To rebuild: {_rebuild_hint(directory)}")
        m = self.manifest
        self.n, self.shard_rows, self.dtype = int(m["n"]), int(m["shard_rows"]), m["dtype"]
        self.feature_shape = tuple(m["feature_shape"])
        self._open: dict[tuple[int, str], np.ndarray] = {}
        self._verified: set[tuple[int, str]] = set()

    def _array(self, s: int, part: str) -> np.ndarray:
        key = (s, part)
        if key not in self._open:
            entry = self.manifest["shards"][s]["files"][part]
            path = os.path.join(self.directory, entry["name"])
            if not os.path.exists(path):
                raise FileNotFoundError(f"feature cache shard {path} is missing; {_rebuild_hint(self.directory)}")
            if key not in self._verified:
                if _file_sha256(path) != entry["sha256"]:
                    raise ValueError(f"feature cache shard {path} is corrupt (sha256 differs from "
                                     f"{MANIFEST}); {_rebuild_hint(self.directory)}")
                self._verified.add(key)
            try:
                arr = np.load(path, mmap_mode="r")  # pages come in on demand: host memory stays bounded
            except (ValueError, OSError, EOFError) as e:
                raise UnreadableFileError(path, f"feature cache shard {path} cannot be opened ({e}); "
                                          f"{_rebuild_hint(self.directory)}") from None
            if part == "feats" and self.dtype == "bfloat16":
                arr = arr.view(ml_dtypes.bfloat16)
            self._open[key] = arr
        return self._open[key]

    def _gather(self, idx: Sequence[int], part: str) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"feature cache rows {idx.min()}..{idx.max()} out of range [0, {self.n})")
        shard, off = np.divmod(idx, self.shard_rows)
        like = self._array(int(shard[0]) if idx.size else 0, part)
        out = np.empty((len(idx),) + like.shape[1:], like.dtype)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._array(int(s), part)[off[sel]]  # reads only these rows from the mapping
        return out

    def features(self, idx: Sequence[int]) -> np.ndarray:
        """Features [len(idx), h, w, C] in the cache dtype (ml_dtypes.bfloat16 or float32)."""
        return self._gather(idx, "feats")

    def labels(self, idx: Sequence[int]) -> np.ndarray:
        """Labels [len(idx), H, W] int32 (-1 = ignore)."""
        return self._gather(idx, "labels").astype(np.int32)

    def descriptors(self) -> np.ndarray:
        """Global descriptors [N, C] float32 of every item (from the float32 features)."""
        return np.concatenate([np.asarray(self._array(s, "desc")) for s in range(len(self.manifest["shards"]))])

    def verify(self) -> None:
        """Check every file of every shard against its checksum now (rather than on first read)."""
        for s in range(len(self.manifest["shards"])):
            for part in PARTS:
                self._array(s, part)


def open_or_build(directory: str, config, featurizer, dataset,
                  featurize: Callable[[np.ndarray], np.ndarray], log: Callable[[str], None] | None = None
                  ) -> FeatureCache:
    """Open the cache in `directory`, building it first when it has no manifest. Every process
    calls it; they take the same branch (process 0's view of the directory decides)."""
    fp = fingerprint(config, featurizer, dataset)
    exists = os.path.exists(os.path.join(directory, MANIFEST))
    exists = bool(np.asarray(parallel.broadcast_from_main(np.int32(exists))))
    if not exists:
        main = jax.process_index() == 0
        g = int(config.data.res) // int(featurizer.patch_size)
        build(directory, fp, dataset, featurize, feature_shape=(g, g, int(featurizer.dim)),
              n_classes=int(config.data.n_classes),
              shard_rows=int(config.feature_cache.get("shard_rows", 0)),
              process_index=jax.process_index(), process_count=jax.process_count(), barrier=parallel.barrier,
              log=log or (print if main else (lambda msg: None)))
    return FeatureCache(directory, expect=fp)


def _define(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    cli.define_config(fv, argv)
    flags.DEFINE_string("workdir", None, "an existing run: its config.json is the config (--config may then "
                        "change only where the data live) and its featurizer.npz is used ('descriptor' "
                        "featurizer; default: fit it, as training does in a new workdir)", flag_values=fv)


def _main(fv: flags.FlagValues, _) -> int:
    config = run_config.config_of_run(fv.workdir, fv.config) if fv.workdir else fv.config
    parallel.enable_compilation_cache()
    parallel.initialize_distributed(config)  # before any JAX computation
    validate(config)
    directory = cache_dir(config)
    if not directory:
        raise ValueError("config.feature_cache.dir is empty: pass --config.feature_cache.dir=DIR "
                         "(and --config.feature_cache.enabled=True)")
    train_ds = build_dataset(config, "train")
    featurizer = run_featurizer(config, fv.workdir, fit=True, train_ds=train_ds)
    t0 = time.time()
    cache = open_or_build(directory, config, featurizer, train_ds, local_featurize_fn(featurizer))
    cache.verify()
    if jax.process_index() == 0:
        print(f"feature cache {directory}: {cache.n} items, features {cache.feature_shape} {cache.dtype}, "
              f"{len(cache.manifest['shards'])} shards, verified [{time.time() - t0:.0f}s]", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m stego_jax.feature_cache --config C --config.feature_cache.dir=DIR`; returns the exit status."""
    return cli.run("stego_jax.feature_cache", __doc__, _define, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
