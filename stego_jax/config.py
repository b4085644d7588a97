"""Default experiment configuration (`base_config`) and its validation at the edge."""

from __future__ import annotations

import json
import math
import os

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Defaults = the values of the official STEGO `src/configs/train_config.yml`."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 5000
    c.batch_size = 16  # global batch (official: 16 per process on one GPU)

    c.data = ml_collections.ConfigDict()
    c.data.name = "cocostuff27"
    c.data.root = ""
    c.data.res = 224
    c.data.crop_type = "five"
    c.data.crop_ratio = 0.5
    c.data.n_classes = 27
    c.data.skip_corrupt = False
    c.data.num_workers = 8

    c.model = ml_collections.ConfigDict()
    c.model.featurizer = "dino"
    c.model.backbone = "dino_vits8_300ep"
    c.model.num_heads = 0  # 0: inferred (width // 64, as DINO); set for other local checkpoints
    c.model.patch_size = 8
    c.model.dtype = "float32"
    c.model.dim = 70
    c.model.projection = "nonlinear"
    c.model.dropout = True
    c.model.extra_clusters = 0

    c.loss = ml_collections.ConfigDict()
    c.loss.feature_samples = 11
    c.loss.neg_samples = 5
    c.loss.pointwise = True
    c.loss.zero_clamp = True
    c.loss.stabilize = False
    c.loss.correspondence_weight = 1.0
    # "Cocostuff27 vit small 1/31/22" block of the official train_config.yml.
    set_loss(c, pos_intra=(0.67, 0.08), pos_inter=(0.25, 0.02), neg_inter=(0.63, 0.66))

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-4  # head, Adam, no schedule (official)
    c.optim.probe_lr = 5e-3  # linear and cluster probes, Adam (official)

    c.knn = ml_collections.ConfigDict()
    c.knn.k = 30
    c.knn.num_neighbors = 7
    c.knn.dir = ""  # default: <data.root>/nns
    c.knn.splits = ("train",)  # training reads only the train table (the official script also writes val)

    c.feature_cache = ml_collections.ConfigDict()
    c.feature_cache.enabled = False
    c.feature_cache.dir = ""  # non-empty: bf16 shards on disk (stego_jax/feature_cache.py); empty: in memory
    c.feature_cache.dtype = "bfloat16"  # "float32" stores the features exactly
    c.feature_cache.shard_rows = 0  # 0: automatic

    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 400
    c.keep_checkpoints = 2
    c.num_val_images = 0  # 0 = whole validation split during training

    c.eval = ml_collections.ConfigDict()
    c.eval.res = 320
    c.eval.batch_size = 16
    c.eval.flip = True
    c.eval.crf = True
    c.eval.crf_backend = "jax"
    c.eval.crf_processes = 0  # pydensecrf backend: worker processes, 0 = one per CPU core
    c.eval.num_overlays = 8
    c.eval.kmeans_restarts = 5

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.auto = False
    c.distributed.cpu_devices = 0  # >0: simulate this many local CPU devices (tests, debugging)
    return c


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def set_loss(
    config: ml_collections.ConfigDict,
    *,
    pos_intra: tuple[float, float],
    pos_inter: tuple[float, float],
    neg_inter: tuple[float, float],
) -> None:
    """Set the (weight, shift) of the three STEGO loss terms: `config.loss.<term>_weight` and
    `config.loss.<term>_shift`. Raise ValueError on a non-pair, a non-finite number or a
    negative weight."""
    terms = {"pos_intra": pos_intra, "pos_inter": pos_inter, "neg_inter": neg_inter}
    for term, pair in terms.items():
        ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(_finite, pair))
        if not ok or pair[0] < 0:
            raise ValueError(f"{term}={pair!r} must be a (weight, shift) pair of finite numbers, "
                             "weight >= 0")
    for term, (weight, _) in terms.items():
        config.loss[f"{term}_weight"] = float(weight)
    for term, (_, shift) in terms.items():
        config.loss[f"{term}_shift"] = float(shift)


_CHOICES = {
    "model.featurizer": ("dino", "descriptor"),
    "model.projection": ("linear", "nonlinear"),
    "model.dtype": ("float32", "bfloat16"),
    "data.name": ("cocostuff27", "cityscapes27", "potsdam3", "potsdam", "image_folder", "synthetic"),
    "data.crop_type": ("five", None, "none"),
    "eval.crf_backend": ("jax", "pydensecrf"),
}

_POSITIVE = ("num_steps", "batch_size", "data.res", "data.n_classes", "model.dim", "loss.feature_samples",
             "loss.neg_samples", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
             "knn.k", "knn.num_neighbors", "eval.res", "eval.batch_size")


def _get(config, dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


# Fields a config may add to `base_config` (dataset- or program-specific); any other field is a typo.
OPTIONAL_FIELDS = {
    "data.n_train": "synthetic set: training images", "data.n_val": "synthetic set: validation images",
    "data.size": "synthetic set: image side", "data.seed": "synthetic set: generator seed",
    "demo_seeds": "demo: seeds to train", "knn.dropout": "k-NN precompute: channel dropout rate",
    "knn.seed": "k-NN precompute: dropout seed",
}
_LOSS_WEIGHTS = ("pos_intra_weight", "pos_inter_weight", "neg_inter_weight", "correspondence_weight")
_LOSS_SHIFTS = ("pos_intra_shift", "pos_inter_shift", "neg_inter_shift")


def _unknown_fields(config) -> list[str]:
    known = flatten(base_config())
    sections = {k.rpartition(".")[0] for k in known}
    out = []
    for field in flatten(config):
        if field in known or field in OPTIONAL_FIELDS:
            continue
        section = field.rpartition(".")[0]
        allowed = sorted(k.rpartition(".")[2] for k in list(known) + list(OPTIONAL_FIELDS)
                         if k.rpartition(".")[0] == section)
        where = f"config.{section}" if section else "the config"
        hint = f"; {where} has {allowed}" if section in sections or not section else ""
        out.append(f"config.{field} is not a known field{hint}")
    return out


def validate(config) -> None:
    """Raise ValueError naming the field and the allowed values for a bad config."""
    unknown = _unknown_fields(config)
    if unknown:
        raise ValueError(unknown[0] + (f" (and {len(unknown) - 1} more unknown field(s))" if len(unknown) > 1 else ""))
    for name in _LOSS_WEIGHTS:
        value = config.loss[name]
        if not _finite(value) or value < 0:
            raise ValueError(f"config.loss.{name}={value!r} must be a finite number >= 0")
    for name in _LOSS_SHIFTS:
        if not _finite(config.loss[name]):
            raise ValueError(f"config.loss.{name}={config.loss[name]!r} must be a finite number")
    for field, allowed in _CHOICES.items():
        value = _get(config, field)
        if value not in allowed:
            raise ValueError(f"config.{field}={value!r} is not allowed; choose one of {list(allowed)}")
    for field in _POSITIVE:
        value = _get(config, field)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.{field}={value!r} must be a positive integer")
    procs = config.eval.get("crf_processes", 0)
    if not isinstance(procs, int) or isinstance(procs, bool) or procs < 0:
        raise ValueError(f"config.eval.crf_processes={procs!r} must be an integer >= 0 (0 = one per CPU core)")
    if config.batch_size < 2:
        raise ValueError("config.batch_size must be >= 2: the random-negative term pairs images of one batch")
    if config.knn.num_neighbors >= config.knn.k:
        raise ValueError(
            f"config.knn.num_neighbors={config.knn.num_neighbors} must be < config.knn.k={config.knn.k}"
        )
    for name in ("lr", "probe_lr"):
        if not config.optim[name] > 0:
            raise ValueError(f"config.optim.{name}={config.optim[name]!r} must be > 0")
    if config.data.res % config.model.patch_size:
        raise ValueError(
            f"config.data.res={config.data.res} must be a multiple of config.model.patch_size="
            f"{config.model.patch_size}"
        )


def eval_config(config) -> ml_collections.ConfigDict:
    """The data config for evaluation: validation split at eval.res, no crops."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.res = config.eval.res
    c.data.crop_type = None
    return c


# ----------------------------------------------------------------------------------------
# A run's config against another one (resume, evaluation of a finished run)
# ----------------------------------------------------------------------------------------

# Where and how the data are read, not what they are: may change for an existing run.
LOCATION_FIELDS = ("data.root", "data.num_workers", "data.skip_corrupt", "knn.dir", "feature_cache.dir")
# What evaluation may change on a finished run (besides LOCATION_FIELDS).
EVAL_PREFIXES = ("eval.", "distributed.")


def flatten(config) -> dict:
    """{"a.b.c": value} of a ConfigDict or nested dict, JSON-normalised (tuples -> lists)."""
    tree = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
    out: dict = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(tree, "")
    return out


def changes(old, new) -> dict[str, tuple]:
    """{field: (old value, new value)} where two configs differ ("<absent>" for a missing field)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")}


def defines_the_run(field: str) -> bool:
    """True for the fields that make a different model or different data (model.*, data.* but
    where the data live): an existing run cannot change them."""
    return field.startswith(("model.", "data.")) and field not in LOCATION_FIELDS


def _describe(diff: dict[str, tuple]) -> str:
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


def check_same_run(old, new, *, what: str, path: str) -> dict[str, tuple]:
    """The changes from `old` (a run's saved config) to `new`; ValueError naming each field that
    defines the run (`defines_the_run`)."""
    diff = changes(old, new)
    refused = {k: v for k, v in diff.items() if defines_the_run(k)}
    if refused:
        raise ValueError(
            f"{what} would change what the run in {os.path.dirname(path) or '.'} is: {_describe(refused)} "
            f"(its config is {path}). These fields define the model and the data; use a new --workdir "
            f"for a different run, or drop those overrides")
    return diff


def config_for_finished_run(run_config, given, path: str = "config.json") -> ml_collections.ConfigDict:
    """The config to evaluate (or predict with) a finished run: the run's own config with the
    evaluation fields (eval.*, distributed.*, where the data live) of `given`; fields that define
    the run must not differ (ValueError naming them); training fields of `given` are ignored."""
    diff = check_same_run(run_config, given, what="the given --config", path=path)
    out = ml_collections.ConfigDict(run_config.to_dict())
    g = flatten(given)
    for field in diff:
        if field.startswith(EVAL_PREFIXES) or field in LOCATION_FIELDS:
            node = out
            *parents, leaf = field.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = g[field]
    return out


def load_config_file(path: str, arg: str = "") -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file given by path (for programs that don't use absl flags)."""
    import importlib.util
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found; configs live in configs/<name>.py")
    spec = importlib.util.spec_from_file_location("_stego_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()
