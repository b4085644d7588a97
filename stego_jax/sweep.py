"""Hyper-parameter sweeps: `python -m stego_jax.sweep --config C --workdir W --sweep FIELD=V1,V2 ...`.

Trains K settings of one config together, from the feature cache, in one compiled program: the
heads, probes and Adam states of all settings are stacked along a leading K axis and the train
step of `steps.py` is `jax.vmap`ped over it. Every step reads its cached features and k-NN
partners once and all K settings share them.

  --sweep loss.pos_intra_shift=0.08,0.18,0.28 --sweep seed=0,1     a grid (3 x 2 = 6 settings)
  --sweep loss.neg_inter_shift=0.3:0.8 --sweep optim.lr=1e-4:1e-3:log --sample 16
                                                                   16 points drawn from ranges

Only values the compiled step treats as data can be swept: the loss weights and shifts, the
learning rates and the seed. Each setting k is exactly a `python -m stego_jax.train` run of its
config (same initialisation, same random draws, same batches: a setting's seed also sets its own
data order, gathered from the shared cache). Outputs in W: sweep.{md,csv,json} (sorted by
validation cluster mIoU), heatmaps of each pair of swept fields, loss_curves.png, per-setting
TensorBoard events in settings/<k>/tb, and the stacked state's checkpoints in state/ (a killed
sweep resumes exactly). `--export best` (or a setting's number) writes an ordinary run directory
that `stego_jax.evaluate` and `stego_jax.predict` take as it is.

Several processes (a pod): every process runs the same command with the distributed settings of
training (`config.distributed.*` or $STEGO_COORDINATOR...); K (or each batch, `--shard batch`) is
split over the devices of all processes, process 0 alone writes the reports and logs, and the
processes write the stacked state's checkpoints together.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from stego_jax import cli, parallel, steps
from stego_jax.checkpoints import Checkpoints
from stego_jax.config import flatten, validate
from stego_jax.data import plan_step
from stego_jax.feature_sources import DiskFeatures, build_training_data
from stego_jax.featurize import FEATURIZER_STATS
from stego_jax.model import build_modules, create_state, make_optimizer
from stego_jax.run_config import save_config
from stego_jax.writers import MetricWriter, eta, keep_steps_up_to

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# What one compiled step can take as data: traced scalars (the loss weights and shifts, the
# learning rates: optax is built inside the step from them) and the seed (keys and batch plans).
LOSS_FIELDS = tuple(f"loss.{t}_{w}" for t in ("pos_intra", "pos_inter", "neg_inter") for w in ("weight", "shift")) \
    + ("loss.correspondence_weight",)
TRACED_FIELDS = LOSS_FIELDS + ("optim.lr", "optim.probe_lr")
SWEEPABLE = TRACED_FIELDS + ("seed",)
SWEEP_FILE = "sweep.json"
STATE_DIR = "state"


# ----------------------------------------------------------------------------------------
# Settings: grids and samples
# ----------------------------------------------------------------------------------------

def _field_name(raw: str, config) -> str:
    name = raw.strip()
    name = name[len("config."):] if name.startswith("config.") else name
    known = flatten(config)
    if name not in known:
        raise ValueError(f"--sweep {raw}: config.{name} is not a field of the config; sweepable: {list(SWEEPABLE)}")
    if name not in SWEEPABLE:
        raise ValueError(
            f"--sweep {raw}: config.{name} cannot be swept: it changes the shapes or the program of the "
            f"train step, and a sweep trains all its settings in one compiled step. Run one sweep per "
            f"value of config.{name} (--config.{name}=...). Sweepable: {list(SWEEPABLE)}")
    return name


def _number(text: str, field: str, spec: str) -> float | int:
    try:
        return int(text) if field == "seed" else float(text)
    except ValueError:
        kind = "an integer" if field == "seed" else "a number"
        raise ValueError(f"--sweep {spec}: {text!r} is not {kind}") from None


def parse_spec(spec: str, config) -> tuple[str, dict]:
    """`FIELD=V1,V2,...` -> (field, {"values": [...]}); `FIELD=A:B[:log]` -> (field, {"range": (A, B, log)})."""
    if "=" not in spec:
        raise ValueError(f"--sweep {spec}: expected FIELD=V1,V2,... or FIELD=LOW:HIGH[:log]")
    raw, _, rhs = spec.partition("=")
    field = _field_name(raw, config)
    rhs = rhs.strip()
    if ":" in rhs:
        parts = rhs.split(":")
        log = len(parts) == 3 and parts[2] == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise ValueError(f"--sweep {spec}: a range is LOW:HIGH or LOW:HIGH:log")
        lo, hi = (_number(p, field, spec) for p in parts[:2])
        if not lo < hi:
            raise ValueError(f"--sweep {spec}: a range needs LOW < HIGH")
        if log and lo <= 0:
            raise ValueError(f"--sweep {spec}: a log range needs LOW > 0")
        return field, {"range": (lo, hi, log)}
    values = [_number(v, field, spec) for v in rhs.split(",") if v.strip()]
    if not values:
        raise ValueError(f"--sweep {spec}: no values")
    return field, {"values": values}


def make_settings(config, specs: list[str], sample: int = 0, sample_seed: int = 0) -> list[dict]:
    """The settings of a sweep, each {field: value}: the grid (product) of the specs' values, or
    with `sample` N points drawn (seeded by `sample_seed`): a range uniformly (log-uniformly with
    `:log`; seeds as integers in [LOW, HIGH)), a value list by a uniform choice. Every setting is
    checked as a config (e.g. a weight < 0 or a learning rate <= 0 names the field)."""
    parsed: dict[str, dict] = {}
    for spec in specs:
        field, how = parse_spec(spec, config)
        if field in parsed:
            raise ValueError(f"--sweep {spec}: config.{field} is swept twice")
        parsed[field] = how
    if not parsed:
        raise ValueError("no --sweep given: name at least one field, e.g. --sweep seed=0,1,2")
    if sample:
        rng = np.random.default_rng(sample_seed)
        settings = []
        for _ in range(sample):
            s: dict[str, Any] = {}
            for field, how in parsed.items():
                if "values" in how:
                    s[field] = how["values"][int(rng.integers(len(how["values"])))]
                else:
                    lo, hi, log = how["range"]
                    if field == "seed":
                        s[field] = int(rng.integers(lo, hi))
                    elif log:
                        s[field] = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
                    else:
                        s[field] = float(rng.uniform(lo, hi))
            settings.append(s)
    else:
        ranges = [f for f, how in parsed.items() if "range" in how]
        if ranges:
            raise ValueError(f"--sweep config.{ranges[0]}=LOW:HIGH is a range: add --sample N to draw N "
                             f"settings from it, or give a list of values")
        fields = list(parsed)
        settings = [dict(zip(fields, combo)) for combo in itertools.product(*(parsed[f]["values"] for f in fields))]
    for s in settings:
        validate(setting_config(config, s))
    return settings


def setting_config(config, setting: dict) -> ml_collections.ConfigDict:
    """`config` with the values of one setting: the config of the equivalent single run."""
    c = ml_collections.ConfigDict(config.to_dict())
    for field, value in setting.items():
        node = c
        *parents, leaf = field.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = int(value) if field == "seed" else float(value)
    return c


def describe(setting: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


# ----------------------------------------------------------------------------------------
# The stacked step
# ----------------------------------------------------------------------------------------

class _Overlay:
    """A config whose some values are replaced (traced sweep values); the rest read `base`.
    Reads by attribute and by key, as steps.loss_fn, LossWeights.from_config and make_optimizer do."""

    def __init__(self, base, values: dict):
        self._base, self._values = base, values

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._values:
            v = self._values[name]
            return _Overlay(self._base[name], v) if isinstance(v, dict) else v
        return getattr(self._base, name)

    __getitem__ = __getattr__


def _nest(flat: dict) -> dict:
    out: dict = {}
    for field, v in flat.items():
        section, _, name = field.partition(".")
        out.setdefault(section, {})[name] = v
    return out


def seed_groups(seeds: list[int]) -> tuple[np.ndarray, int, int] | None:
    """`(order, U, M)` when each of the U distinct seeds has the same number M of settings (any grid
    sweep): `order` lists the settings seed by seed (distinct seeds ascending); else None."""
    distinct = sorted(set(seeds))
    counts = {seeds.count(s) for s in distinct}
    if len(counts) != 1:
        return None
    order = np.concatenate([np.flatnonzero(np.asarray(seeds) == s) for s in distinct])
    return order, len(distinct), counts.pop()


def make_sweep_step(config, modules, mesh, *, shard: str, groups: tuple[np.ndarray, int, int] | None):
    """`step(states, batch, step_keys, hparams, data_index) -> (states, metrics)`, every leaf of
    states/metrics with a leading K axis. `batch` holds one batch per distinct seed ([U,B,...]).
    `shard="settings"` splits K over the mesh (the batch replicated), `"batch"` splits the batch
    (the K states replicated), as training does.

    With `groups` (see `seed_groups`) the settings of one seed share its batch and step key, so the
    step is vmapped twice: over the U seeds, then over the M settings of a seed with the batch and
    key unbatched. Whatever depends only on them -- the dropped-out features, the random sample
    points and negative draws, the features' correlations, the labels -- is then computed once per
    seed rather than once per setting. Otherwise setting k reads batch `data_index[k]`."""

    def one(state, batch, key, hp):
        cfg = _Overlay(config, _nest(hp))
        return steps.train_step(state, batch, key, config=cfg, modules=modules, optimizer=make_optimizer(cfg))

    def step(states, batch, keys, hparams, data_index):
        if groups is None:
            b = jax.tree_util.tree_map(lambda x: x[data_index], batch)
            return jax.vmap(one, in_axes=(0, 0, 0, 0))(states, b, keys, hparams)
        order, u, m = groups
        same = bool(np.all(order == np.arange(len(order))))
        inverse = np.argsort(order)

        def regroup(x):
            return (x if same else x[order]).reshape(u, m, *x.shape[1:])

        def ungroup(x):
            x = x.reshape(u * m, *x.shape[2:])
            return x if same else x[inverse]

        # The step counter, folded into the key, is the same for all settings (they train in
        # lockstep): passed unbatched, so that the key and every draw made with it stay unbatched.
        count = states["step"][0]
        rest = {name: v for name, v in states.items() if name != "step"}
        grouped = jax.tree_util.tree_map(regroup, (rest, hparams))
        seed_keys = keys[order[::m]]  # every setting of a seed has that seed's key

        def at_count(state, count, batch, key, hp):
            return one({**state, "step": count}, batch, key, hp)

        per_seed = jax.vmap(at_count, in_axes=(0, None, None, None, 0))
        new, out = jax.vmap(per_seed, in_axes=(0, None, 0, 0, 0))(grouped[0], count, batch, seed_keys,
                                                                   grouped[1])
        return jax.tree_util.tree_map(ungroup, (new, out))

    k_sh, b_sh = shardings(mesh, shard)
    return jax.jit(step, in_shardings=(k_sh, b_sh, k_sh, k_sh, k_sh), out_shardings=(k_sh, k_sh),
                   donate_argnums=(0,))


def shardings(mesh, shard: str) -> tuple[NamedSharding, NamedSharding]:
    """(sharding of K-axis arrays, sharding of [U,B,...] batches)."""
    if shard == "settings":
        return NamedSharding(mesh, P(parallel.DATA_AXIS)), parallel.replicated(mesh)
    if shard == "batch":
        return parallel.replicated(mesh), NamedSharding(mesh, P(None, parallel.DATA_AXIS))
    raise ValueError(f"shard={shard!r}: choose 'settings' (K over the devices) or 'batch'")


# ----------------------------------------------------------------------------------------
# Memory: refuse a K that does not fit
# ----------------------------------------------------------------------------------------

def program_bytes(compiled) -> int | None:
    """Bytes one device needs to run a compiled program (arguments, outputs not aliased to
    donated arguments, temporaries), from XLA's memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def available_bytes(mesh) -> tuple[int, str]:
    """Memory one device of `mesh` may still use: an accelerator's free memory, or on CPU the
    host's available memory shared by its (possibly simulated) devices."""
    d = next(x for x in mesh.devices.flat if x.process_index == jax.process_index())  # one of this process's
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), f"free memory of {d.device_kind}"
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    n_local = sum(1 for x in mesh.devices.flat if x.process_index == jax.process_index())
    return avail // max(n_local, 1), "available host memory"


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------

def _stack_keys(keys: list) -> jax.Array:
    return jax.random.wrap_key_data(jnp.stack([jax.random.key_data(k) for k in keys]))


def _host_slice(tree, k: int):
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[k], tree)


def _global(x: np.ndarray, sharding) -> jax.Array:
    """A host array every process holds whole -> a global array with `sharding`: each process
    places the pieces its own devices hold (no cross-process traffic, unlike `jax.device_put`,
    which with several processes first checks that they all hold the same value)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _global_keys(keys: list, sharding) -> jax.Array:
    return jax.random.wrap_key_data(_global(np.asarray(jax.random.key_data(_stack_keys(keys))), sharding))


def checkpoint_shapes(config, feat_dim: int, k: int, sharding) -> dict:
    """The abstract tree of a sweep's checkpoint: {"state": the k stacked train states,
    "diverged_at": int32 [k]}, every leaf with `sharding` (to restore it into)."""
    state = jax.eval_shape(jax.vmap(lambda key: create_state(config, feat_dim, key)),
                           _stack_keys([jax.random.key(0)] * k))
    tree = {"state": state, "diverged_at": jax.ShapeDtypeStruct((k,), jnp.int32)}
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _to_host(tree):
    """A tree of (possibly multi-process) arrays -> numpy, whole, on every process."""
    return jax.tree_util.tree_map(parallel.gather_to_host, tree)


class _Batches:
    """Per step, the batch of each distinct seed (each seed's own `plan_step`, as its single run
    would draw it), read from the shared cache once: the union of the rows."""

    def __init__(self, source, seeds: list[int], config, sharding):
        self.source, self.seeds, self.config, self.sharding = source, seeds, config, sharding

    def _read(self, rows: np.ndarray, what: str) -> np.ndarray:
        if isinstance(self.source, DiskFeatures):
            return self.source.cache.features(rows) if what == "feats" else self.source.cache.labels(rows)
        return self.source.feats[rows] if what == "feats" else self.source.labels[rows]

    def __call__(self, step: int) -> dict:
        c, knn = self.config, self.source.knn
        plans = [plan_step(len(knn), step, global_batch=c.batch_size, seed=s, knn=knn,
                           num_neighbors=c.knn.num_neighbors) for s in self.seeds]
        idx = np.stack([p["index"] for p in plans])
        pos = np.stack([p["index_pos"] for p in plans])
        rows, inv = np.unique(np.concatenate([idx.ravel(), pos.ravel()]), return_inverse=True)
        feats = self._read(rows, "feats")
        a_rows, a_inv = np.unique(idx.ravel(), return_inverse=True)
        labels = self._read(a_rows, "labels")
        n = idx.size
        shape = idx.shape
        batch = {"feats": feats[inv[:n]].reshape(shape + feats.shape[1:]),
                 "feats_pos": feats[inv[n:]].reshape(shape + feats.shape[1:]),
                 "label": labels[a_inv].reshape(shape + labels.shape[1:]).astype(np.int32)}
        return {name: _global(v, self.sharding) for name, v in batch.items()}


def _sweep_record(config, settings, feat_dim, padded_k, shard) -> dict:
    return {"config": json.loads(config.to_json_best_effort()), "settings": settings,
            "feat_dim": int(feat_dim), "padded_k": int(padded_k), "shard": shard}


def _check_same_sweep(workdir: str, record: dict) -> None:
    path = os.path.join(workdir, SWEEP_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    if old.get("settings") != record["settings"]:
        raise ValueError(f"{workdir} holds a sweep of other settings ({path}); resume it with the same --sweep "
                         f"and --sample flags, or use a new --workdir")
    if old.get("padded_k", record["padded_k"]) != record["padded_k"]:
        raise ValueError(f"{workdir} holds a sweep stacked as {old['padded_k']} settings ({old.get('shard')} "
                         f"split), this start would stack {record['padded_k']}: resume it with --shard "
                         f"{old.get('shard')} on the same number of devices")
    a, b = flatten(old["config"]), flatten(record["config"])
    moving = {"num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "num_val_images"}
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in moving
                  and not k.startswith(("eval.", "distributed.")) and k not in ("data.root", "data.num_workers",
                                                                                 "knn.dir", "feature_cache.dir"))
    if diff:
        raise ValueError(f"{workdir} holds a sweep of another config: {', '.join(f'config.{k}' for k in diff)} "
                         f"differ from {path}; use a new --workdir")


def train_sweep(config, workdir: str, settings: list[dict], *, devices: list | None = None,
                shard: str = "settings", memory_limit_mb: float | None = None, quiet: bool = False) -> dict:
    """Train (or resume) every setting of a sweep together in `workdir` and validate each.

    Returns {"step", "results": one dict per setting (in settings order: its values, validation
    scores, last training loss, `diverged_at`), "params": the stacked parameters [K,...]}.

    Multi-process (config.distributed or $STEGO_COORDINATOR...): every process calls this with the
    same arguments and workdir (a shared filesystem) and gets the same result.
    """
    parallel.initialize_distributed(config)  # first: the JAX backend must not have started yet
    validate(config)
    for s in settings:
        for field in s:
            _field_name(field, config)
    if not (config.feature_cache.enabled or config.feature_cache.dir):
        raise ValueError("a sweep trains from the feature cache: set --config.feature_cache.enabled=True "
                         "(in memory) or --config.feature_cache.dir=DIR (on disk)")
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    quiet = quiet or not is_main
    mesh = parallel.make_mesh(devices)
    n_dev = mesh.devices.size
    if shard == "batch":
        parallel.check_batch_size(config.batch_size, mesh)
    k = len(settings)
    kp = -(-k // n_dev) * n_dev if shard == "settings" else k  # padded with copies of the last setting
    padded = settings + [settings[-1]] * (kp - k)

    featurizer, source, val_batches = build_training_data(config, workdir, mesh)
    record = _sweep_record(config, settings, featurizer.dim, kp, shard)
    _check_same_sweep(workdir, record)

    modules = build_modules(config)
    k_sh, b_sh = shardings(mesh, shard)
    seeds = [int(s.get("seed", config.seed)) for s in padded]
    distinct = sorted(set(seeds))
    data_index = _global(np.asarray([distinct.index(s) for s in seeds], np.int32), k_sh)
    swept = [f for f in TRACED_FIELDS if any(f in s for s in settings)]
    hparams = {f: _global(np.asarray([s.get(f, flatten(config)[f]) for s in padded], np.float32), k_sh)
               for f in swept}
    roots = [jax.random.split(jax.random.key(s)) for s in seeds]  # as train: (init key, step key)
    init_keys = _stack_keys([r[0] for r in roots])
    step_keys = _global_keys([r[1] for r in roots], k_sh)
    state = jax.jit(jax.vmap(lambda key: create_state(config, featurizer.dim, key)), out_shardings=k_sh)(init_keys)

    batches = _Batches(source, distinct, config, b_sh)
    example = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                     batches(0))
    step_jit = make_sweep_step(config, modules, mesh, shard=shard, groups=seed_groups(seeds))
    compiled = step_jit.lower(state, example, step_keys, hparams, data_index).compile()
    _check_memory(compiled, kp, config, modules, mesh, shard, example, featurizer.dim, memory_limit_mb)
    if is_main:
        with open(os.path.join(workdir, SWEEP_FILE + ".tmp"), "w") as f:
            json.dump(record, f, indent=1)
        os.replace(os.path.join(workdir, SWEEP_FILE + ".tmp"), os.path.join(workdir, SWEEP_FILE))

    ckpts = Checkpoints(os.path.join(workdir, STATE_DIR), config.keep_checkpoints)
    diverged = np.zeros(kp, np.int64)  # first non-finite step of each setting, 0 = none
    start = 0
    rep = parallel.replicated(mesh)
    holder = {"state": state, "diverged_at": _global(np.zeros(kp, np.int32), rep)}
    if ckpts.last.all_steps():
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                          holder)
        _, start, restored = ckpts.restore_newest_intact(abstract, move_damaged=True)
        state = restored["state"]
        diverged = parallel.gather_to_host(restored["diverged_at"]).astype(np.int64)
        if not quiet:
            print(f"resumed the sweep from step {start} in {workdir}", flush=True)

    writers = [MetricWriter(os.path.join(workdir, "settings", str(i)), config.num_steps, is_main, start_step=start)
               for i in range(k)]
    curves_path = os.path.join(workdir, "loss_curves.jsonl")
    if is_main:
        keep_steps_up_to(curves_path, start)
    if not quiet:
        print(f"sweep of {k} setting(s) x {config.num_steps} steps in one compiled step "
              f"({n_dev} device(s), split by {shard}); {len(distinct)} distinct data order(s)", flush=True)
    confusion_fn = steps.make_confusion_fn(config, modules, mesh)
    last_eval: list[dict] = [{} for _ in range(k)]
    last_loss = [float("nan")] * k
    window: list = []
    t0, done = time.time(), start
    curves = open(curves_path, "a") if is_main else None  # process 0 alone writes the reports
    try:
        for step in range(start, config.num_steps):
            state, out = compiled(state, batches(step), step_keys, hparams, data_index)
            window.append(out)
            done = step + 1
            end = done == config.num_steps
            if done % config.log_every == 0 or done % config.checkpoint_every == 0 or end:
                # [steps, K] per metric; with several processes each holds only its settings' part.
                host = _to_host(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *window))
                window = []
                for j, bad in enumerate(host["nonfinite"]):
                    bad = bad & (diverged == 0)
                    diverged[bad] = done - len(host["nonfinite"]) + j + 1
                mean = {key: np.mean(v, axis=0) for key, v in host.items() if key != "nonfinite"}
                for i in range(k):
                    writers[i].scalars(done, {key: float(v[i]) for key, v in mean.items()}, "train/")
                    last_loss[i] = float(mean["loss"][i])
                if curves is not None:
                    curves.write(json.dumps({"step": done, "loss": [float(x) for x in mean["loss"][:k]]}) + "\n")
                    curves.flush()
                if not quiet:
                    _progress(done, config.num_steps, start, t0, k, mean["loss"][:k])
            if done % config.eval_every == 0 or end:
                params = _to_host(state["params"])
                for i in range(k):
                    last_eval[i] = steps.validate_probes(config, _host_slice(params, i), confusion_fn, val_batches)
                    writers[i].scalars(done, last_eval[i], "val/")
            if done % config.checkpoint_every == 0 or end:
                ckpts.save(done, {"state": state, "diverged_at": _global(diverged.astype(np.int32), rep)})
    finally:
        if curves is not None:
            curves.close()
        ckpts.wait()
        ckpts.close()
        for w in writers:
            w.close()

    if start == config.num_steps or not last_eval[0]:  # nothing left to train: validate the restored state
        params = _to_host(state["params"])
        last_eval = [steps.validate_probes(config, _host_slice(params, i), confusion_fn, val_batches)
                     for i in range(k)]
    if last_loss[0] != last_loss[0] and os.path.exists(curves_path):  # resumed after the end: the log
        with open(curves_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if rows:
            last_loss = rows[-1]["loss"]
    results = []
    for i, s in enumerate(settings):
        results.append({"setting": i, **s, **last_eval[i], "train/loss": last_loss[i],
                        "diverged_at": int(diverged[i]) or None})
    if is_main:
        write_reports(workdir, config, settings, results, done)
    return {"step": int(done), "results": results,
            "params": jax.tree_util.tree_map(lambda x: x[:k], _to_host(state["params"]))}


def _check_memory(compiled, kp, config, modules, mesh, shard, example, feat_dim, limit_mb) -> None:
    need = program_bytes(compiled)
    if need is None:
        return
    avail, what = (int(limit_mb * 2**20), "the given memory limit") if limit_mb else available_bytes(mesh)
    if need <= avail:
        return
    n_dev = mesh.devices.size
    unit = n_dev if shard == "settings" else 1
    largest = 0
    if kp > unit:
        k_sh, _ = shardings(mesh, shard)
        small = checkpoint_shapes(config, feat_dim, unit, k_sh)["state"]
        keys = jax.ShapeDtypeStruct((unit,), jax.random.key(0).dtype, sharding=k_sh)
        idx = jax.ShapeDtypeStruct((unit,), jnp.int32, sharding=k_sh)
        hp = {}
        # `unit` settings of one seed: the cost of a setting beside others sharing its batch.
        step_jit = make_sweep_step(config, modules, mesh, shard=shard, groups=(np.arange(unit), 1, unit))
        ex = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype, sharding=x.sharding), example)
        m1 = program_bytes(step_jit.lower(small, ex, keys, hp, idx).compile()) or 0
        per = max((need - m1) / (kp - unit), 1.0) * unit  # bytes per `unit` settings
        largest = int(max(0, (avail - (m1 - per)) // per)) * unit
    raise ValueError(
        f"a sweep of K={kp} settings needs about {need / 2**20:.0f} MiB per device (XLA memory analysis of "
        f"the compiled step) but {what} is {avail / 2**20:.0f} MiB: the largest K that fits is {largest}. "
        f"Sweep fewer settings (or several sweeps), or use more devices")


def _progress(done, total, start, t0, k, losses) -> None:
    elapsed = time.time() - t0
    rate = (done - start) / elapsed if elapsed > 0 else float("nan")
    finite = np.asarray(losses)[np.isfinite(losses)]
    lo = f"{finite.min():.4f}" if finite.size else "nan"
    med = f"{np.median(finite):.4f}" if finite.size else "nan"
    print(f"step {done:>6d}/{total} | {k} settings | loss min {lo} median {med} | {rate:6.2f} steps/s "
          f"({rate * k:.1f} setting-steps/s) | ETA {eta(total - done, rate)}", flush=True)


# ----------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------

SCORES = ("cluster/mIoU", "cluster/Accuracy", "linear/mIoU", "linear/Accuracy")


def write_reports(workdir: str, config, settings: list[dict], results: list[dict], step: int) -> None:
    """sweep.md / sweep.csv / sweep.json (sorted by cluster mIoU), heatmaps, loss curves."""
    fields = list(dict.fromkeys(f for s in settings for f in s))
    ranked = sorted(results, key=lambda r: -r["cluster/mIoU"] if r["cluster/mIoU"] == r["cluster/mIoU"] else 1e9)
    with open(os.path.join(workdir, SWEEP_FILE)) as f:
        record = json.load(f)
    record.update(step=int(step), results=ranked)
    with open(os.path.join(workdir, SWEEP_FILE), "w") as f:
        json.dump(record, f, indent=1)
    cols = ["setting"] + fields + list(SCORES) + ["train/loss", "diverged_at"]
    with open(os.path.join(workdir, "sweep.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in ranked:
            w.writerow([r.get(c, "") if r.get(c) is not None else "" for c in cols])

    def cell(v):
        if v is None:
            return "-"
        return f"{v:g}" if isinstance(v, float) else str(v)

    lines = [f"# Sweep: {len(results)} settings x {step} steps", "",
             f"Validation scores (%) of each setting at step {step}, best cluster mIoU first. "
             f"`python -m stego_jax.sweep --workdir {workdir} --config ... --export K` writes setting K as a run.",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in ranked:
        vals = [cell(r.get(c)) for c in cols[:1 + len(fields)]]
        vals += [f"{r[c]:.2f}" for c in SCORES] + [f"{r['train/loss']:.4f}", cell(r["diverged_at"])]
        lines.append("| " + " | ".join(vals) + " |")
    with open(os.path.join(workdir, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    for a, b in itertools.combinations(fields, 2):
        _heatmap(workdir, results, a, b)
    _loss_plot(workdir, settings)


def _heatmap(workdir: str, results: list[dict], a: str, b: str) -> None:
    xs = sorted({r[a] for r in results})
    ys = sorted({r[b] for r in results})
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    if len(xs) <= 12 and len(ys) <= 12:  # a grid: mean over the other fields
        grid = np.full((len(ys), len(xs)), np.nan)
        for yi, y in enumerate(ys):
            for xi, x in enumerate(xs):
                v = [r["cluster/mIoU"] for r in results if r[a] == x and r[b] == y]
                if v:
                    grid[yi, xi] = np.mean(v)
        im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
        for yi in range(len(ys)):
            for xi in range(len(xs)):
                if grid[yi, xi] == grid[yi, xi]:
                    ax.text(xi, yi, f"{grid[yi, xi]:.1f}", ha="center", va="center", color="w", fontsize=8)
    else:  # sampled: one point per setting
        im = ax.scatter([r[a] for r in results], [r[b] for r in results],
                        c=[r["cluster/mIoU"] for r in results], cmap="viridis", s=40)
    fig.colorbar(im, ax=ax, label="validation cluster mIoU (%)")
    ax.set_xlabel(a)
    ax.set_ylabel(b)
    ax.set_title("cluster mIoU (mean over the other fields)")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, f"heatmap_{a}__{b}.png"), dpi=100)
    plt.close(fig)


def _loss_plot(workdir: str, settings: list[dict]) -> None:
    path = os.path.join(workdir, "loss_curves.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    steps_ = [r["step"] for r in rows]
    losses = np.asarray([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i in range(losses.shape[1]):
        ax.plot(steps_, losses[:, i], lw=1, label=f"{i}: {describe(settings[i])}" if len(settings) <= 12 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (window mean)")
    ax.set_title(f"{len(settings)} settings")
    if len(settings) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "loss_curves.png"), dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Export one setting as a run directory
# ----------------------------------------------------------------------------------------

def export_setting(workdir: str, which: str | int = "best", out_dir: str | None = None) -> str:
    """Write setting `which` (its number, or "best": the best validation cluster mIoU) of the
    finished sweep in `workdir` as an ordinary run directory (config.json, checkpoints/ and
    best/ with recorded checksums, featurizer.npz of the demo featurizer); returns its path."""
    path = os.path.join(workdir, SWEEP_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a sweep?")
    with open(path) as f:
        record = json.load(f)
    if "results" not in record:
        raise ValueError(f"the sweep in {workdir} has not finished (no results in {path}); run it to the end first")
    results = {r["setting"]: r for r in record["results"]}
    if which == "best":
        k = record["results"][0]["setting"]
    else:
        try:
            k = int(which)
        except ValueError:
            raise ValueError(f"--export {which!r}: give a setting number or 'best'") from None
        if k not in results:
            raise ValueError(f"--export {k}: the sweep has settings 0..{len(results) - 1}")
    config = setting_config(ml_collections.ConfigDict(record["config"]), record["settings"][k])
    out = out_dir or os.path.join(workdir, "export", f"setting_{k}")
    if os.path.exists(os.path.join(out, "checkpoints")):
        raise ValueError(f"{out} already holds a run; choose another export directory")
    mesh = parallel.make_mesh()
    kp = record["padded_k"]
    rep = parallel.replicated(mesh)
    ckpts = Checkpoints(os.path.join(workdir, STATE_DIR), config.keep_checkpoints)
    try:
        _, step, stacked = ckpts.restore_newest_intact(checkpoint_shapes(config, record["feat_dim"], kp, rep))
    finally:
        ckpts.close()
    state = jax.device_put(_host_slice(stacked["state"], k), rep)
    os.makedirs(out, exist_ok=True)
    save_config(config, out, step=int(step))
    stats = os.path.join(workdir, FEATURIZER_STATS)
    if os.path.exists(stats):
        shutil.copyfile(stats, os.path.join(out, FEATURIZER_STATS))
    scores = {key: float(results[k][key]) for key in SCORES}
    run = Checkpoints(out, config.keep_checkpoints)
    try:
        run.save(int(step), state, scores)
    finally:
        run.close()
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": int(step), **{"val/" + key: v for key, v in scores.items()}}) + "\n")
    return out


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def _define(fv, argv) -> None:
    cli.define_config(fv, argv, required=False)
    flags.DEFINE_string("workdir", None, "directory of the sweep (an existing sweep resumes)", flag_values=fv,
                        required=True)
    flags.DEFINE_multi_string("sweep", [], "FIELD=V1,V2,... (a grid axis) or FIELD=LOW:HIGH[:log] (a range, "
                              f"with --sample); repeatable. Sweepable: {', '.join(SWEEPABLE)}", flag_values=fv)
    flags.DEFINE_integer("sample", 0, "draw this many settings from the --sweep ranges/lists instead of the grid",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("sample_seed", 0, "seed of the --sample draws", flag_values=fv)
    flags.DEFINE_enum("shard", "settings", ["settings", "batch"], "with several devices: split the K settings "
                      "over them, or split each batch as training does", flag_values=fv)
    flags.DEFINE_float("memory_limit_mb", None, "memory one device may use (default: what is free)", flag_values=fv)
    flags.DEFINE_string("export", None, "after the sweep: write setting K (a number, or 'best') as a run "
                        "directory for stego_jax.evaluate / predict", flag_values=fv)
    flags.DEFINE_string("export_dir", None, "where --export writes (default W/export/setting_K)", flag_values=fv)


def _main(fv, _) -> int:
    parallel.enable_compilation_cache()
    path = os.path.join(fv.workdir, SWEEP_FILE)
    finished = False
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        finished = "results" in record and record.get("step") == record["config"]["num_steps"]
    if fv.export is not None and parallel.distributed_requested(fv.config):
        raise ValueError(f"--export writes one run directory from one process: run the sweep with several "
                         f"processes without it, then once, in one process: python -m stego_jax.sweep "
                         f"--workdir {fv.workdir} --export {fv.export}")
    if fv.export is not None and finished and not fv.sweep:
        pass  # export only
    else:
        if fv.config is None:
            raise flags.ValidationError("--config is required to run a sweep")
        settings = make_settings(fv.config, fv.sweep, fv.sample, fv.sample_seed)
        train_sweep(fv.config, fv.workdir, settings, shard=fv.shard, memory_limit_mb=fv.memory_limit_mb)
        if jax.process_index() == 0:
            with open(os.path.join(fv.workdir, "sweep.md")) as f:
                print(f.read())
    if fv.export is not None:
        out = export_setting(fv.workdir, fv.export, fv.export_dir)
        print(f"exported to {out}: python -m stego_jax.evaluate --workdir {out}", flush=True)
    return 0


def main(argv=None) -> int:
    """`python -m stego_jax.sweep --config C --workdir W --sweep F=V1,V2 [...]`; returns the exit status."""
    return cli.run("stego_jax.sweep", __doc__, _define, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
