"""Import a released STEGO checkpoint: `python -m stego_jax.official CKPT --workdir W [--data_root DIR] [--num_heads N]`.

CKPT is a PyTorch Lightning `.ckpt` of the official `LitUnsupervisedSegmenter`
(mhamilton723/STEGO, src/train_segmentation.py), or the name of one of the released checkpoints
(cocostuff27_vit_base_5, cityscapes_vit_base_1, potsdam_test), downloaded once into the weights
cache ($STEGO_JAX_CACHE or ~/.cache/stego_jax/weights) from the official host (or
$STEGO_JAX_RELEASED_URL). The file is read without torch, omegaconf or Lightning, and without running
anything from it (see stego_jax/weights/torch_pickle.py).

W becomes an ordinary run directory that `stego_jax.evaluate --workdir W` and
`stego_jax.predict --workdir W ...` take as they are: `config.json` (architecture, dataset and training
settings from the checkpoint's hyper-parameters), `backbone.npz` (the checkpoint's own DINO ViT,
`net.model.*`, in the DINO key layout; `config.model.backbone` names it relative to W), one orbax
checkpoint with recorded checksums holding the head (`net.cluster1`, `net.cluster2`), the cluster
probe and the linear probe, and `official.json` (where the parameters came from). The training-time
cluster probe, the decoder, optimizer and callback states are not imported.

The head count of the ViT is not stored in the checkpoint: it is width / 64 as in every official
model (ViT-S 6, ViT-B 12); `--num_heads` sets it for other widths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from stego_jax import cli
from stego_jax.checkpoints import Checkpoints
from stego_jax.config import base_config, validate
from stego_jax.model import create_state
from stego_jax.run_config import CONFIG, prepare_workdir, save_config
from stego_jax.weights import CheckpointError, load_torch_checkpoint
from stego_jax.weights.convert import convert_state_dict, to_dino_layout
from stego_jax.weights.download import default_cache_dir, fetch, sha256_file, sidecar_path

# mhamilton723/STEGO: src/download_models.py (saved_model_url_root).
RELEASED_BASE_URL = "https://marhamilresearch4.blob.core.windows.net/stego-public/saved_models"
BACKBONE_FILE = "backbone.npz"
PROVENANCE_FILE = "official.json"


@dataclasses.dataclass(frozen=True)
class ReleasedCheckpoint:
    """One of the checkpoints the STEGO authors released, and the setting it was trained for.

    `sha256` pins the file when a digest is published (none is: the first file downloaded is trusted,
    its digest recorded next to it and every later use checked against that record).
    """

    name: str
    dataset: str  # our data.name
    backbone: str  # as the paper names it
    sha256: str | None = None
    sha256_source: str | None = None

    @property
    def filename(self) -> str:
        return self.name + ".ckpt"

    def url(self, base_url: str | None = None) -> str:
        base = base_url or os.environ.get("STEGO_JAX_RELEASED_URL") or RELEASED_BASE_URL
        return base.rstrip("/") + "/" + self.filename


RELEASED: dict[str, ReleasedCheckpoint] = {
    c.name: c
    for c in (
        ReleasedCheckpoint("cocostuff27_vit_base_5", "cocostuff27", "ViT-B/8"),
        ReleasedCheckpoint("cityscapes_vit_base_1", "cityscapes27", "ViT-B/8"),
        ReleasedCheckpoint("potsdam_test", "potsdam3", "ViT-S/8"),
    )
}

# Official cfg.dataset_name -> our data.name.
DATASETS = {
    "cocostuff27": "cocostuff27",
    "cityscapes": "cityscapes27",
    "potsdam": "potsdam3",
    "directory": "image_folder",
}

_UNPINNED_WARNED: set[str] = set()


def fetch_released(name: str, *, cache_dir: str | Path | None = None, progress: bool = True,
                   base_url: str | None = None) -> Path:
    """The cached path of released checkpoint `name`, downloaded first when not cached (resumable,
    retried, checked against the pinned or recorded SHA-256; see `weights.download.fetch`)."""
    if name not in RELEASED:
        raise ValueError(f"unknown released checkpoint {name!r}: known names are {sorted(RELEASED)}; "
                         "or pass the path of a local .ckpt file")
    spec = RELEASED[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = cache / spec.filename
    if spec.sha256 is None and name not in _UNPINNED_WARNED:
        _UNPINNED_WARNED.add(name)
        warnings.warn(f"{name}: no published SHA-256 is pinned, so the first file seen at {dest} is "
                      f"trusted and its digest recorded in {sidecar_path(dest)}; later uses are "
                      "checked against that record only.", stacklevel=2)
    return fetch(spec.url(base_url), dest, sha256=spec.sha256, progress=progress)


# ----------------------------------------------------------------------------------------
# Reading the Lightning checkpoint
# ----------------------------------------------------------------------------------------

def _field(cfg: Mapping, key: str, where: str, allowed: tuple | None = None) -> Any:
    if key not in cfg:
        raise CheckpointError(where, f"{where}: hyper_parameters.cfg has no {key!r}; is this a "
                                     "checkpoint of the official LitUnsupervisedSegmenter?")
    value = cfg[key]
    if allowed is not None and value not in allowed:
        raise CheckpointError(where, f"{where}: cfg.{key}={value!r} is not supported by stego_jax "
                                     f"(supported: {list(allowed)})")
    return value


def _conv1x1(sd: Mapping[str, np.ndarray], key: str, shape: tuple[int, int], where: str) -> dict:
    """A 1x1 Conv2d `key` (weight [out, in, 1, 1], bias [out]) -> Dense params {kernel [in, out], bias}."""
    w, b = sd.get(key + ".weight"), sd.get(key + ".bias")
    if w is None or b is None:
        raise CheckpointError(where, f"{where}: state_dict has no {key}.weight / {key}.bias "
                                     f"(expected a 1x1 convolution {shape[1]} -> {shape[0]})")
    if w.shape != (*shape, 1, 1) or b.shape != shape[:1]:
        raise CheckpointError(where, f"{where}: {key}.weight has shape {list(w.shape)} and bias "
                                     f"{list(b.shape)}, expected {[*shape, 1, 1]} and {[shape[0]]}")
    return {"kernel": np.ascontiguousarray(w[:, :, 0, 0].T.astype(np.float32)),
            "bias": b.astype(np.float32)}


def read_official(path: str | Path, *, num_heads: int | None = None) -> dict:
    """Reads an official `.ckpt` (no torch): {"config": our run config, "backbone": DINO-layout
    state dict, "params": head and probe params, "info": provenance}. Raises CheckpointError naming
    the file and what is missing or unsupported."""
    path = Path(path)
    where = str(path)
    ckpt = load_torch_checkpoint(path)
    if not (isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping)
            and isinstance(ckpt.get("hyper_parameters"), Mapping)):
        keys = sorted(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(where, f"{where} is not a PyTorch Lightning checkpoint with "
                                     f"'state_dict' and 'hyper_parameters' (found {keys}); for DINO "
                                     "backbone weights use config.model.backbone instead")
    hp, sd = ckpt["hyper_parameters"], dict(ckpt["state_dict"])
    cfg = hp.get("cfg")
    if not isinstance(cfg, Mapping) or not isinstance(hp.get("n_classes"), int):
        raise CheckpointError(where, f"{where}: hyper_parameters lack 'n_classes' and the 'cfg' "
                                     "of the official LitUnsupervisedSegmenter")
    n_classes = hp["n_classes"]
    _field(cfg, "arch", where, ("dino",))
    _field(cfg, "dino_feat_type", where, ("feat",))
    projection = _field(cfg, "projection_type", where, ("linear", "nonlinear"))
    patch = _field(cfg, "dino_patch_size", where)
    extra = int(cfg.get("extra_clusters") or 0)
    dim = int(_field(cfg, "dim", where)) if _field(cfg, "continuous", where) else n_classes
    dataset = _field(cfg, "dataset_name", where)
    if dataset not in DATASETS:
        raise CheckpointError(where, f"{where}: cfg.dataset_name={dataset!r} has no stego_jax "
                                     f"dataset (known: {sorted(DATASETS)})")

    backbone = {k[len("net.model."):]: v for k, v in sd.items() if k.startswith("net.model.")}
    if not backbone:
        raise CheckpointError(where, f"{where}: state_dict has no 'net.model.*' entries (the DINO ViT)")
    try:
        vit, _ = convert_state_dict(backbone, f"{where} (net.model)", num_heads)
    except ValueError as e:
        raise CheckpointError(where, str(e)) from None
    if vit.patch_size != patch:
        raise CheckpointError(where, f"{where}: cfg.dino_patch_size={patch} but the ViT's patch "
                                     f"embedding is {vit.patch_size}x{vit.patch_size}")
    width = vit.embed_dim
    head = {"linear": _conv1x1(sd, "net.cluster1.0", (dim, width), where)}
    if projection == "nonlinear":
        head["nonlinear_0"] = _conv1x1(sd, "net.cluster2.0", (width, width), where)
        head["nonlinear_1"] = _conv1x1(sd, "net.cluster2.2", (dim, width), where)
    clusters = sd.get("cluster_probe.clusters")
    if clusters is None or clusters.shape != (n_classes + extra, dim):
        got = None if clusters is None else list(clusters.shape)
        raise CheckpointError(where, f"{where}: cluster_probe.clusters has shape {got}, expected "
                                     f"{[n_classes + extra, dim]}")
    params = {"head": head,
              "cluster_probe": {"clusters": clusters.astype(np.float32)},
              "linear_probe": {"dense": _conv1x1(sd, "linear_probe", (n_classes, dim), where)}}

    config = base_config()
    config.data.name = DATASETS[dataset]
    config.data.n_classes = n_classes
    config.model.featurizer = "dino"
    config.model.backbone = BACKBONE_FILE
    config.model.num_heads = vit.num_heads
    config.model.patch_size = vit.patch_size
    config.model.dim = dim
    config.model.projection = projection
    config.model.dropout = bool(cfg.get("dropout", True))
    config.model.extra_clusters = extra
    _training_settings(config, cfg)
    validate(config)
    dino, _ = to_dino_layout(backbone, where)
    info = {
        "source": os.path.abspath(path), "sha256": sha256_file(path),
        "pytorch-lightning_version": ckpt.get("pytorch-lightning_version"),
        "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step"),
        "n_classes": n_classes, "cfg": _jsonable(cfg),
        "vit": dataclasses.asdict(vit),
        "num_heads": "given" if num_heads else "width / 64 (the official models')",
    }
    return {"config": config, "backbone": {k: np.asarray(v, np.float32) for k, v in dino.items()},
            "params": params, "info": info}


def _training_settings(config, cfg: Mapping) -> None:
    """The checkpoint's training settings, where our config has them (a record; evaluation and
    prediction do not use them)."""
    def put(section, field: str, key: str, kind) -> None:
        value = cfg.get(key)
        if kind is bool:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
        if ok:
            (config[section] if section else config)[field] = kind(value)

    put(None, "batch_size", "batch_size", int)
    put(None, "num_steps", "max_steps", int)
    put("data", "res", "res", int)
    put("data", "crop_ratio", "crop_ratio", float)
    if cfg.get("crop_type") in ("five", None):
        config.data.crop_type = cfg.get("crop_type")
    put("optim", "lr", "lr", float)
    put("knn", "num_neighbors", "num_neighbors", int)
    for ours, theirs in (("feature_samples", "feature_samples"), ("neg_samples", "neg_samples")):
        put("loss", ours, theirs, int)
    for ours, theirs in (("pointwise", "pointwise"), ("zero_clamp", "zero_clamp"), ("stabilize", "stabalize")):
        put("loss", ours, theirs, bool)
    for key in ("correspondence_weight", "pos_intra_weight", "pos_inter_weight", "neg_inter_weight",
                "pos_intra_shift", "pos_inter_shift", "neg_inter_shift"):
        value = cfg.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            config.loss[key] = float(value)
    if config.data.res % config.model.patch_size:
        config.data.res = 224


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x if isinstance(x, (str, int, float, bool, type(None))) else repr(x)


# ----------------------------------------------------------------------------------------
# Writing the run directory
# ----------------------------------------------------------------------------------------

def import_checkpoint(path: str | Path, workdir: str, *, num_heads: int | None = None,
                      data_root: str = "", cache_dir: str | Path | None = None,
                      progress: bool = True) -> dict:
    """Imports an official STEGO `.ckpt` (a path, or a name in `RELEASED`, downloaded first) into a
    new run directory `workdir` (see the module docstring); returns the written config as a dict.
    `data_root` is where the run's dataset lives (config.data.root; evaluation needs it).

    Raises FileExistsError when `workdir` already holds a run, CheckpointError (a ValueError) when the
    file is not an official checkpoint stego_jax can run, naming what is missing or unsupported.
    """
    if isinstance(path, str) and path in RELEASED and not os.path.exists(path):
        path = fetch_released(path, cache_dir=cache_dir, progress=progress)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (released names: {sorted(RELEASED)})")
    if os.path.exists(os.path.join(workdir, CONFIG)):
        raise FileExistsError(f"{workdir} already holds a run ({CONFIG}); import into a new --workdir")
    read = read_official(path, num_heads=num_heads)
    config, params = read["config"], read["params"]
    config.data.root = str(data_root or "")
    prepare_workdir(workdir)
    tmp = os.path.join(workdir, BACKBONE_FILE + ".tmp.npz")
    np.savez(tmp, **read["backbone"])
    os.replace(tmp, os.path.join(workdir, BACKBONE_FILE))

    width = read["info"]["vit"]["embed_dim"]
    state = create_state(config, width, jax.random.key(0))
    want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), state["params"])
    have = jax.tree_util.tree_map(lambda x: (x.shape, jnp.float32), params)
    if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(have) or want != have:
        raise CheckpointError(path, f"{path}: the imported parameters {have} do not fit the model "
                                    f"of the config ({want})")
    state["params"] = jax.tree_util.tree_map(jnp.asarray, params)
    step = int(read["info"].get("global_step") or 0)
    state["step"] = jnp.asarray(step, jnp.int32)
    save_config(config, workdir)
    ckpts = Checkpoints(workdir, config.keep_checkpoints)
    try:
        ckpts.save(step, state)
    finally:
        ckpts.close()
    info = {**read["info"], "imported": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step}
    with open(os.path.join(workdir, PROVENANCE_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return config.to_dict()


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def _define(fv, argv) -> None:
    flags.DEFINE_string("workdir", None, "new run directory to write", flag_values=fv, required=True)
    flags.DEFINE_integer("num_heads", None, "ViT head count (default: width / 64, as the official "
                         "models)", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("data_root", "", "where the checkpoint's dataset lives, prepared "
                        "(config.data.root, needed by evaluate)", flag_values=fv)
    flags.DEFINE_string("cache_dir", None, "where released checkpoints are downloaded (default: "
                        "$STEGO_JAX_CACHE or ~/.cache/stego_jax/weights)", flag_values=fv)


def _main(fv, args) -> int:
    config = import_checkpoint(args[0], fv.workdir, num_heads=fv.num_heads, data_root=fv.data_root,
                               cache_dir=fv.cache_dir)
    m = config["model"]
    print(f"imported {args[0]} into {fv.workdir}: {config['data']['name']} ({config['data']['n_classes']} "
          f"classes), DINO ViT patch {m['patch_size']} with {m['num_heads']} heads, code dim {m['dim']}, "
          f"{m['projection']} head, {m['extra_clusters']} extra cluster(s). Next:\n"
          f"  python -m stego_jax.evaluate --workdir {fv.workdir}"
          f"{'' if fv.data_root else '   (after --data_root DIR at import, or data.root set in config.json)'}\n"
          f"  python -m stego_jax.predict --workdir {fv.workdir} --images DIR --out OUT")
    return 0


def main(argv=None) -> int:
    """`python -m stego_jax.official CKPT --workdir W`; returns the exit status."""
    return cli.run("stego_jax.official", __doc__, _define, _main, argv, positional=1)


if __name__ == "__main__":
    sys.exit(main())
