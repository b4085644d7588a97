"""Sweep speed: K settings trained together from the feature cache (`stego_jax.sweep`) vs K
single runs one after the other from the cache, vs K single runs streamed (no cache), and peak
memory for several K.

All on the demo config (synthetic scenes, the 'descriptor' featurizer, features in memory) with
the production programs:

  sweep       `sweep.train_sweep`: K settings (loss.pos_intra_shift x seed), one compiled step,
              every setting validated at the end; wall time end to end (features, compile,
              training, validation, reports, checkpoints).
  sequential  `train.train_and_evaluate` once per setting, one after the other in this process
              with the persistent compilation cache on (as `python -m stego_jax.train` has it), so
              later runs load the compiled programs; each run computes its features again, as a
              run does.
  streamed    the same runs without the feature cache: each step featurizes its images and their
              k-NN partners (`feature_sources.StreamedFeatures`). Estimated: the sequential run's
              wall time plus K x num_steps x (streamed step - cached step), the step times
              measured over --streamed-steps steps after a warm-up.
  memory      one subprocess per K (--memory-k): the process's max RSS after a short sweep and
              XLA's memory analysis of the compiled step (arguments + outputs + temporaries).

With `--backbone vits8` the featurizer is a ViT-S/8 of `dino_vits8`'s shapes with random weights
(the same FLOPs as the real one; no download) instead of the demo's descriptor, on a smaller set
(--n-train training images): its features are cached on disk once (`feature_cache.dir`, timed as
`cache_build_s`) with its k-NN table (`knn_s`), and the sweep and every single run read that cache, as
a user's would. The streamed row then carries the backbone's real cost per step.

  python experiments/benchmarks/bench_sweep.py                 # K=16, 300 steps (the demo's)
  python experiments/benchmarks/bench_sweep.py --backbone vits8 --steps 100 --memory-ks ""
  python experiments/benchmarks/bench_sweep.py --backbone vits8 --shapes paper --steps 50 --memory-ks ""
  python experiments/benchmarks/bench_sweep.py --quick         # tiny: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def demo_config(steps: int, quick: bool):
    from stego_jax.config import load_config_file

    c = load_config_file(os.path.join(ROOT, "configs", "demo.py"))
    c.num_steps = steps
    c.log_every = max(1, min(50, steps))
    c.eval_every = steps
    c.checkpoint_every = steps
    if quick:
        c.data.n_train, c.data.n_val, c.batch_size = 64, 16, 8
    return c


def random_vits8(path: str) -> None:
    """A ViT-S/8 in the official DINO layout, `dino_vits8`'s shapes, random weights."""
    import numpy as np

    from stego_jax.models.vit import ViTConfig
    from stego_jax.weights.convert import random_dino_state_dict

    np.savez(path, **random_dino_state_dict(ViTConfig(patch_size=8, embed_dim=384, depth=12, num_heads=6)))


def vit_config(config, workdir: str, n_train: int):
    """`config` with the random ViT-S/8 as the featurizer and an on-disk feature cache in `workdir`."""
    random_vits8(os.path.join(workdir, "vits8_random.npz"))
    config.model.featurizer = "dino"
    config.model.backbone = os.path.join(workdir, "vits8_random.npz")
    config.model.num_heads = 6
    config.model.patch_size = 8
    config.data.n_train = n_train
    config.data.n_val = max(n_train // 4, 8)
    config.knn.dir = os.path.join(workdir, "nns")
    config.feature_cache.enabled = True
    config.feature_cache.dir = os.path.join(workdir, "cache")
    config.feature_cache.dtype = "float32"
    return config


def paper_shapes(config):
    """The paper's COCO-Stuff ViT-S/8 training shapes (official train_config.yml): 224 px crops,
    batch 16, code dim 70, 27 classes (the synthetic scenes drawn with 27 classes), validated at
    224 px."""
    config.data.res = config.data.size = config.eval.res = 224
    config.batch_size = 16
    config.model.dim = 70
    config.data.n_classes = 27
    return config


def settings_for(config, k: int) -> list[dict]:
    from stego_jax import sweep

    seeds = 4 if k % 4 == 0 else 1
    shifts = ",".join(f"{0.08 + 0.1 * i:.2f}" for i in range(k // seeds))
    return sweep.make_settings(config, [f"loss.pos_intra_shift={shifts}", "seed=" + ",".join(map(str, range(seeds)))])


def step_times(config, n: int) -> dict:
    """Median seconds of one training step with features from the cache and streamed."""
    import jax

    from stego_jax import parallel
    from stego_jax.feature_sources import StreamedFeatures, build_training_data
    from stego_jax.featurize import make_featurize
    from stego_jax.model import build_modules, create_state, make_optimizer
    from stego_jax.steps import make_train_step

    mesh = parallel.make_mesh()
    with tempfile.TemporaryDirectory() as d:
        featurizer, cached, _ = build_training_data(config, d, mesh)
    from stego_jax.data import build_dataset

    streamed = StreamedFeatures(build_dataset(config, "train"), cached.knn, config, make_featurize(featurizer, mesh),
                                featurizer.params, mesh)
    modules = build_modules(config)
    step = make_train_step(config, mesh, modules, make_optimizer(config))
    key = jax.random.key(1)
    out = {}
    for name, source in (("cached", cached), ("streamed", streamed)):
        holder = {"state": create_state(config, featurizer.dim, jax.random.key(0)), "i": 0}

        def run():
            holder["state"], m = step(holder["state"], source.batch(holder["i"]), key)
            holder["i"] += 1
            jax.block_until_ready(m)

        out[name] = common.timed(run, n, 2)["median_s"]
    return out


def memory_worker(k: int, steps: int, quick: bool) -> dict:
    import resource

    import jax

    from stego_jax import sweep

    config = demo_config(steps, quick)
    settings = settings_for(config, k)
    captured = {}
    real = sweep._check_memory

    def spy(compiled, *a, **kw):
        captured["xla_mb"] = (sweep.program_bytes(compiled) or 0) / 2**20
        return real(compiled, *a, **kw)

    sweep._check_memory = spy
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        sweep.train_sweep(config, d, settings, quiet=True)
        wall = time.perf_counter() - t0
    return {"k": k, "steps": steps, "wall_s": wall, "xla_step_mb": captured.get("xla_mb"),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "jax": jax.__version__}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", type=int, default=16, help="K of the sweep (a multiple of 4: 4 seeds)")
    ap.add_argument("--steps", type=int, default=300, help="training steps per setting (the demo's 300)")
    ap.add_argument("--streamed-steps", type=int, default=10, help="steps timed for the streamed estimate")
    ap.add_argument("--memory-ks", default="1,4,16", help="K values of the memory rows")
    ap.add_argument("--memory-steps", type=int, default=20)
    ap.add_argument("--backbone", choices=("descriptor", "vits8"), default="descriptor",
                    help="the demo's descriptor, or a random-weight ViT-S/8 with an on-disk cache")
    ap.add_argument("--n-train", type=int, default=200, help="training images with --backbone vits8")
    ap.add_argument("--shapes", choices=("demo", "paper"), default="demo",
                    help="the demo's (96 px, batch 32, code dim 32, 5 classes) or the paper's COCO-Stuff "
                         "ViT-S/8 shapes (224 px, batch 16, code dim 70, 27 classes)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    ap.add_argument("--memory-k", type=int, default=0, help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "benchmarks", "results", "sweep.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.settings, args.steps, args.streamed_steps, args.memory_steps = 4, 10, 3, 3
        args.memory_ks = "1,4"
    if args.memory_k:
        print(json.dumps(memory_worker(args.memory_k, args.memory_steps, args.quick)), flush=True)
        return {}
    load_start = os.getloadavg()

    from stego_jax import parallel, sweep, train

    # As the programs do: a persistent compilation cache (fresh here), so that the single runs after
    # the first load their compiled steps rather than compile them again.
    parallel.enable_compilation_cache(tempfile.mkdtemp(prefix="bench_sweep_xla_"))
    config = demo_config(args.steps, args.quick)
    if args.shapes == "paper":
        config = paper_shapes(config)
    settings = settings_for(config, args.settings)
    k = len(settings)
    prep = {}
    with tempfile.TemporaryDirectory() as d:
        if args.backbone == "vits8":
            from stego_jax import knn
            from stego_jax.feature_sources import build_training_data

            config = vit_config(config, d, 32 if args.quick else args.n_train)
            t0 = time.perf_counter()
            knn.run(config)
            prep["knn_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            build_training_data(config, os.path.join(d, "build"), parallel.make_mesh())  # builds the cache
            prep["cache_build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sweep.train_sweep(config, os.path.join(d, "sweep"), settings, quiet=True)
        sweep_s = time.perf_counter() - t0
        seq = []
        for i, s in enumerate(settings):
            t0 = time.perf_counter()
            train.train_and_evaluate(sweep.setting_config(config, s), os.path.join(d, f"run{i}"))
            seq.append(time.perf_counter() - t0)
        sequential_s = sum(seq)
        st = step_times(config, args.streamed_steps)
    streamed_s = sequential_s + k * args.steps * max(st["streamed"] - st["cached"], 0.0)

    memory = []
    for mk in [int(x) for x in args.memory_ks.split(",") if x]:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-k", str(mk), "--memory-steps",
               str(args.memory_steps)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT})
        try:
            memory.append(common.last_json_line(proc.stdout))
        except ValueError:
            memory.append({"k": mk, "error": (proc.stderr or proc.stdout)[-300:]})

    record = {"k": k, "steps": args.steps, "backbone": args.backbone, "shapes": args.shapes,
              "res": config.data.res, "batch": config.batch_size, "dim": config.model.dim,
              "n_classes": config.data.n_classes, **prep, "sweep_s": sweep_s, "sequential_s": sequential_s,
              "sequential_first_run_s": seq[0], "sequential_later_runs_median_s": sorted(seq[1:])[len(seq[1:]) // 2]
              if len(seq) > 1 else None, "streamed_estimate_s": streamed_s,
              "step_cached_ms": 1e3 * st["cached"], "step_streamed_ms": 1e3 * st["streamed"],
              "speedup_vs_sequential": sequential_s / sweep_s, "speedup_vs_streamed": streamed_s / sweep_s,
              "memory": memory}

    def table(records, env):
        r = records[0]
        lines = [common.machine_line(env), "",
                 (f"Demo config (synthetic, 'descriptor' featurizer, features in memory, batch {config.batch_size}, "
                  if r.get("backbone", "descriptor") == "descriptor" else
                  f"Demo config with a random-weight ViT-S/8 featurizer (dino_vits8 shapes), "
                  f"{config.data.n_train} training images, features cached on disk once "
                  f"({r['cache_build_s']:.1f} s; k-NN table {r['knn_s']:.1f} s, not in the rows), "
                  f"batch {config.batch_size}, ") + f"{config.data.res} px, code dim {config.model.dim}, "
                 f"{config.data.n_classes} classes, {r['steps']} steps "
                 f"per setting), K = {r['k']} settings (loss.pos_intra_shift x seed).", "",
                 "| how the K settings are trained | wall s | sweep speed-up |", "|---|---:|---:|",
                 f"| one sweep from the cache (`stego_jax.sweep`) | {r['sweep_s']:.1f} | 1.0x |",
                 f"| K single runs from the cache, one after the other | {r['sequential_s']:.1f} | "
                 f"{r['speedup_vs_sequential']:.1f}x |",
                 f"| K single runs streamed, no cache (estimated) | {r['streamed_estimate_s']:.1f} | "
                 f"{r['speedup_vs_streamed']:.1f}x |", "",
                 f"Single-run step: {r['step_cached_ms']:.1f} ms from the cache, {r['step_streamed_ms']:.1f} ms "
                 f"streamed (median of {args.streamed_steps}); the streamed row is the sequential wall time plus "
                 f"K x steps x the difference. First single run {r['sequential_first_run_s']:.1f} s (compiles).",
                 "", "| K | XLA step buffers MB | process max RSS MB | wall s (short sweep) |", "|---:|---:|---:|---:|"]
        for m in r["memory"]:
            if "error" in m:
                lines.append(f"| {m['k']} | failed: {m['error'][:80]} | | |")
            else:
                lines.append(f"| {m['k']} | {common.fmt(m['xla_step_mb'], '.1f')} | {m['max_rss_mb']:.0f} | "
                             f"{m['wall_s']:.1f} |")
        return "\n".join(lines)

    return common.finish("sweep", args, [record], table, load_start)


if __name__ == "__main__":
    main()
