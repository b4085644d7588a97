"""The offline demo (`make demo`): synthetic scenes -> frozen features once -> STEGO training over
several seeds -> cluster/k-means/linear evaluation beside the trivial and k-means baselines.

Needs no internet and no weights. The featurizer is a fixed patch descriptor, not DINO: see
configs/demo.py and docs/demo.md for why.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from stego_jax import cli, kmeans as kmeans_lib
from stego_jax import metrics, ops, parallel
from stego_jax.config import validate
from stego_jax.data import build_dataset
from stego_jax.data.transforms import normalize
from stego_jax.evaluate import evaluate
from stego_jax.featurize import run_featurizer
from stego_jax.train import train_and_evaluate


def _scores(pred, labels, n, hungarian=True) -> dict:
    stats = np.asarray(metrics.confusion(jnp.asarray(pred, jnp.int32), jnp.asarray(labels), n, n))
    return metrics.scores_from_confusion(stats, n, hungarian=hungarian)


def baselines(config, workdir: str) -> dict:
    """Trivial (one class everywhere), k-means on raw RGB pixels, k-means on the frozen features;
    all clusterings fitted on training data and chosen by their objective, never by labels."""
    n = config.data.n_classes
    train = build_dataset(config, "train")
    val = build_dataset(config, "val")
    tr_img = np.stack([train[i]["image"] for i in range(len(train))])
    va_img = np.stack([val[i]["image"] for i in range(len(val))])
    va_lab = np.stack([val[i]["label"] for i in range(len(val))]).astype(np.int32)
    rng = np.random.default_rng(0)
    out = {"trivial (one class)": _scores(np.zeros_like(va_lab), va_lab, n)}

    key = jax.random.key(0)
    px = tr_img.reshape(-1, 3).astype(np.float32) / 255.0
    px = px[rng.choice(len(px), 100_000, replace=False)]
    km = kmeans_lib.kmeans_fit(key, jnp.asarray(px), n, iters=30, metric="euclidean", restarts=5)
    pred = kmeans_lib.assign(jnp.asarray(va_img.reshape(-1, 3).astype(np.float32) / 255.0),
                             km.centroids, "euclidean").reshape(va_lab.shape)
    out["k-means on RGB pixels"] = _scores(pred, va_lab, n)

    feat = run_featurizer(config, workdir)
    f_tr = np.asarray(feat(jnp.asarray(normalize(tr_img))))
    f_va = feat(jnp.asarray(normalize(va_img)))
    x = f_tr.reshape(-1, f_tr.shape[-1])
    x = x[rng.choice(len(x), min(len(x), 100_000), replace=False)]
    km = kmeans_lib.kmeans_fit(key, jnp.asarray(x), n, iters=30, metric="cosine",
                               restarts=config.eval.kmeans_restarts)
    up = ops.upsample_bilinear(f_va, va_lab.shape[1:3])
    pred = kmeans_lib.assign(up.reshape(-1, up.shape[-1]), km.centroids, "cosine").reshape(va_lab.shape)
    out[f"k-means on frozen features ({feat.name})"] = _scores(pred, va_lab, n)
    return {k: {"mIoU": float(v["mIoU"]), "Accuracy": float(v["Accuracy"])} for k, v in out.items()}


def run(config, workdir: str, seeds: int, devices: list | None = None) -> dict:
    """Trains and evaluates `seeds` runs, computes the baselines, writes results.md/json.

    `devices` defaults to all devices (one on a plain CPU host)."""
    validate(config)
    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    per_seed = []
    for s in range(seeds):
        cfg = config.copy_and_resolve_references()
        cfg.seed = s
        d = os.path.join(workdir, f"seed{s}")
        print(f"== training seed {s} -> {d}", flush=True)
        result = train_and_evaluate(cfg, d, devices)
        ev = evaluate(cfg, d, params=result["params"], step=result["step"], quiet=True, devices=devices)
        per_seed.append({k: {"mIoU": v["mIoU"], "Accuracy": v["Accuracy"]} for k, v in ev.items()})
    base = baselines(config, os.path.join(workdir, "seed0"))
    elapsed = time.time() - t0

    def spread(key, metric):
        vals = np.array([r[key][metric] for r in per_seed])
        return vals.mean(), vals.min(), vals.max()

    feat = run_featurizer(config, os.path.join(workdir, "seed0"))
    lines = [
        "# stego_jax offline demo",
        "",
        f"Data: synthetic textured scenes, {config.data.n_classes} classes, {config.data.n_train} train / "
        f"{config.data.n_val} val images of {config.data.size}px. Featurizer: {feat.description}.",
        f"STEGO: {config.num_steps} steps, batch {config.batch_size}, code dim {config.model.dim}, "
        f"{seeds} seed(s). Wall time {elapsed:.0f} s on {jax.devices()[0].device_kind}.",
        "",
        "| method | mIoU (%) | Accuracy (%) |",
        "|---|---:|---:|",
    ]
    for k, v in base.items():
        lines.append(f"| baseline: {k} | {v['mIoU']:.1f} | {v['Accuracy']:.1f} |")
    labels = {"cluster": "STEGO cluster probe", "kmeans": "STEGO codes + k-means (restarts by objective)",
              "linear": "STEGO linear probe (supervised upper reference)"}
    for k, name in labels.items():
        m, lo, hi = spread(k, "mIoU")
        a, alo, ahi = spread(k, "Accuracy")
        lines.append(f"| {name} | {m:.1f} ({lo:.1f}–{hi:.1f}) | {a:.1f} ({alo:.1f}–{ahi:.1f}) |")
    lines += ["", "STEGO rows: mean over seeds (min–max). Overlays (image | truth | cluster | k-means | "
              "linear): seed*/overlays/."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"baselines": base, "seeds": per_seed, "wall_s": elapsed}, f, indent=2)
    print(text)
    return {"baselines": base, "seeds": per_seed, "wall_s": elapsed}


def _define(fv, argv) -> None:
    cli.define_config(fv, argv, default=cli.packaged_config("demo.py"), required=False,
                      help_string="demo config (default: the demo config shipped with stego_jax; "
                                  "`demo.py:tiny` for a shorter run)")
    flags.DEFINE_string("workdir", "runs/demo", "output folder (one run per seed, results.md)", flag_values=fv)
    flags.DEFINE_integer("seeds", None, "number of seeds (default: config.demo_seeds)", lower_bound=1,
                         flag_values=fv)


def _main(fv, _) -> int:
    parallel.enable_compilation_cache()
    run(fv.config, fv.workdir, fv.seeds or fv.config.get("demo_seeds", 1))
    return 0


def main(argv=None) -> int:
    """`python -m stego_jax.demo [--workdir runs/demo] [--seeds N] [--config C]`; returns the exit status."""
    return cli.run("stego_jax.demo", __doc__, _define, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
