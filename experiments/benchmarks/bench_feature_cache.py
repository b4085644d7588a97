"""Training speed with the frozen backbone run every step vs read from the on-disk feature cache.

Both runs are the production program, `stego_jax.train.train_and_evaluate`, on the synthetic
dataset with a DINO ViT of random weights (a named variant's shapes, written once as a flat-Flax
`.npz` and loaded through `load_dino` like a real checkpoint; same FLOPs as DINO, no download):

  streamed  feature_cache.enabled=False: images decoded by the input pipeline, the backbone on
            the anchors and their k-NN positives every step, then the head update.
  cache     feature_cache.dir set: features built once (timed separately: "build"), then each
            step reads its rows from memory-mapped bf16 (or --cache-dtype float32) shards.

steps/s is the Logger's perf/steps_per_sec (metrics.jsonl) over every logging window after the
first (the first one holds the compilation); validation runs only after the last window.

  python experiments/benchmarks/bench_feature_cache.py                      # ViT-S/8, res 224, batch 16
  python experiments/benchmarks/bench_feature_cache.py --quick              # tiny: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def write_random_backbone(variant: str, path: str, seed: int = 0) -> None:
    """A flat-Flax `.npz` of random weights with the shapes of ViT `variant` (vits8, vitb8, ...)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from stego_jax.models import vit
    from stego_jax.weights.convert import flatten_params

    cfg = vit.vit_config(variant)
    model = vit.VisionTransformer(cfg)
    # eval_shape: the shapes without compiling init (a whole ViT forward).
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, cfg.img_size, cfg.img_size, 3)))["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    params = jax.tree.unflatten(treedef, [(0.02 * rng.standard_normal(s.shape)).astype(np.float32) for s in leaves])
    np.savez(path, **flatten_params(params))


def make_config(args, backbone_path: str, knn_dir: str):
    from stego_jax.config import base_config, validate
    from stego_jax.models import vit

    c = base_config()
    c.seed = 0
    c.batch_size = args.batch
    c.num_steps = args.steps
    c.log_every = args.log_every
    c.eval_every = args.steps
    c.checkpoint_every = args.steps
    c.num_val_images = args.batch
    c.data.name = "synthetic"
    c.data.res = args.res
    c.data.crop_type = None
    c.data.n_classes = 5
    c.data.n_train = args.n_train
    c.data.n_val = args.batch
    c.data.size = args.res
    c.data.seed = 0
    c.data.num_workers = args.workers
    c.model.featurizer = "dino"
    c.model.backbone = backbone_path
    c.model.patch_size = vit.vit_config(args.model).patch_size
    c.model.dtype = args.backbone_dtype
    c.knn.dir = knn_dir
    c.knn.k = min(c.knn.k, args.n_train)
    c.knn.num_neighbors = min(c.knn.num_neighbors, c.knn.k - 1)
    c.knn.splits = ("train",)
    c.eval.res = args.res
    c.eval.batch_size = args.batch
    validate(c)
    return c


def steps_per_sec(workdir: str) -> list[float]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["perf/steps_per_sec"] for r in rows if "perf/steps_per_sec" in r]


def du_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vits8", help="ViT variant of the random backbone (vits8, vitb8, ...)")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=16, help="global batch (a multiple of the device count)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="input pipeline threads (streamed mode)")
    p.add_argument("--backbone-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cache-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--workdir", default="", help="scratch directory (default: a temp dir, removed after)")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks that the script works")
    args = p.parse_args()
    if args.quick:
        args.res, args.batch, args.steps, args.log_every, args.n_train = 32, 8, 6, 2, 16

    load_start = os.getloadavg()
    import jax

    from stego_jax import feature_cache, featurize, knn, train
    from stego_jax.data import build_dataset

    scratch = args.workdir or tempfile.mkdtemp(prefix="bench_feature_cache_")
    os.makedirs(scratch, exist_ok=True)
    try:
        backbone = os.path.join(scratch, f"{args.model}_random.npz")
        write_random_backbone(args.model, backbone)
        config = make_config(args, backbone, os.path.join(scratch, "nns"))
        knn.run(config)  # the k-NN table both runs train with

        results = {}
        streamed_dir = os.path.join(scratch, "run_streamed")
        train.train_and_evaluate(config, streamed_dir)
        results["streamed"] = steps_per_sec(streamed_dir)

        cached = config.copy_and_resolve_references()
        cached.feature_cache.enabled = True
        cached.feature_cache.dir = os.path.join(scratch, "cache")
        cached.feature_cache.dtype = args.cache_dtype
        train_ds = build_dataset(cached, "train")
        featurizer = featurize.run_featurizer(cached, None, fit=True, train_ds=train_ds)
        t0 = time.perf_counter()
        feature_cache.open_or_build(cached.feature_cache.dir, cached, featurizer, train_ds,
                                    featurize.local_featurize_fn(featurizer, batch=args.batch), log=lambda m: None)
        build_s = time.perf_counter() - t0
        cache_mb = du_mb(cached.feature_cache.dir)
        cached_dir = os.path.join(scratch, "run_cache")
        train.train_and_evaluate(cached, cached_dir)
        results["cache"] = steps_per_sec(cached_dir)
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    env = common.machine(load_start)
    rate = {k: mean(v) for k, v in results.items()}
    print(f"\n{common.machine_line(env)}")
    print(f"{args.model} (random weights, backbone {args.backbone_dtype}), res {args.res}, global batch "
          f"{args.batch}, {args.steps} steps, {args.n_train} training images, {jax.device_count()} device(s)\n")
    print("| mode | steps/s | ms/step | speed-up |")
    print("|---|---|---|---|")
    for k in ("streamed", "cache"):
        print(f"| {k}{' (' + args.cache_dtype + ')' if k == 'cache' else ''} | {rate[k]:.3f} | "
              f"{1e3 / rate[k]:.1f} | {rate[k] / rate['streamed']:.2f}x |")
    print(f"\ncache build: {build_s:.1f} s for {args.n_train} images "
          f"({args.n_train / build_s:.1f} images/s), {cache_mb:.1f} MB on disk; per-window steps/s: {results}")
    if args.out:
        common.write_json(args.out, {"machine": env, "args": vars(args), "steps_per_sec": results,
                                     "mean_steps_per_sec": rate, "cache_build_s": build_s,
                                     "cache_mb": cache_mb})


if __name__ == "__main__":
    main()
