"""Training-step benchmark: images/s, compile time, peak memory and MFU of the STEGO train step.

Two modes, on a mesh of all devices of the default backend, with random weights (same FLOPs as
DINO's; no download):

  full  what streamed training does each step: the frozen backbone on img and on img_pos
        (2 x batch images, `stego_jax.featurize.make_featurize`), then the jitted head + loss +
        probes + Adam update (`stego_jax.steps.make_train_step`). Inputs are uint8 images
        already on the device: the input pipeline (JPEG decode, crops) is not included.
  head  the same update from cached features (what `feature_cache.enabled` gives): the step
        alone on float32 features [B, res/p, res/p, C]. The backbone dtype does not matter.

images/s = anchor images per second (each full step also featurizes the batch's k-NN
positives). Each (model, dtype, mode) runs in its own subprocess so that peak memory is that
configuration's own. MFU = XLA cost-analysis FLOPs of the programs / step time / the device's
peak for the backbone dtype (common.PEAK_TFLOPS); n/a on CPU. Paper setting (default):

  python experiments/benchmarks/bench_train.py --models vits8,vitb8 --res 224 --batch 16 \
      --dtypes float32,bfloat16 --modes full,head --out experiments/benchmarks/train.json
  python experiments/benchmarks/bench_train.py --quick      # tiny shapes, checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def make_config(model: str, dtype: str, batch: int, res: int, n_classes: int = 27):
    """The paper's training config (base_config = official train_config.yml values) with the
    benchmark's model, backbone dtype, batch and resolution."""
    from stego_jax.config import base_config, validate
    from stego_jax.models import vit

    c = base_config()
    c.model.backbone = model
    c.model.patch_size = vit.vit_config(model).patch_size
    c.model.dtype = dtype
    c.batch_size = batch
    c.data.res = res
    c.data.n_classes = n_classes
    validate(c)
    return c


def random_featurizer(config, seed: int = 0):
    """`featurizers.build_dino(config)` (the production code path: dtype, float32 output) with
    `load_backbone` replaced by random parameters of the named variant's shapes."""
    import jax.numpy as jnp
    from bench_backbone import _random_params

    from stego_jax import featurizers
    from stego_jax.models import vit

    cfg = vit.vit_config(config.model.backbone)
    params = _random_params(vit.VisionTransformer(cfg, dtype=jnp.float32), seed)
    with mock.patch("stego_jax.featurizers.load_backbone", lambda name, **kw: (cfg, params)):
        return featurizers.build_dino(config)


def bench_one(model: str, dtype: str, mode: str, batch: int, res: int, iters: int,
              warmup: int) -> dict:
    import jax
    import numpy as np

    from stego_jax import parallel
    from stego_jax.featurize import make_featurize
    from stego_jax.model import build_modules, create_state, make_optimizer
    from stego_jax.steps import make_train_step

    config = make_config(model, dtype, batch, res)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(batch, mesh)
    rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
    featurizer = random_featurizer(config)
    modules = build_modules(config)
    step = make_train_step(config, mesh, modules, make_optimizer(config))
    state = jax.jit(lambda k: create_state(config, featurizer.dim, k), out_shardings=rep)(
        jax.random.key(0))
    base_key = jax.device_put(jax.random.key(1), rep)
    rng = np.random.default_rng(0)
    labels = jax.device_put(rng.integers(0, config.data.n_classes, (batch, res, res), np.int32), dat)
    g = res // featurizer.patch_size

    compile_s = 0.0
    flops = 0.0
    have_flops = True
    buffers = []
    if mode == "full":
        fparams = jax.device_put(featurizer.params, rep)
        images = jax.device_put(rng.integers(0, 256, (batch, res, res, 3), np.uint8), dat)
        images_pos = jax.device_put(rng.integers(0, 256, (batch, res, res, 3), np.uint8), dat)
        featurize = make_featurize(featurizer, mesh)
        t0 = time.perf_counter()
        cf = featurize.lower(fparams, images).compile()
        compile_s += time.perf_counter() - t0
        f = cf(fparams, images)
        example = {"feats": f, "feats_pos": f, "label": labels}
        fl = common.compiled_flops(cf)
        have_flops &= fl is not None
        flops += 2 * (fl or 0.0)
        buffers.append(common.compiled_buffers_mb(cf))

        def get_batch():
            return {"feats": cf(fparams, images), "feats_pos": cf(fparams, images_pos),
                    "label": labels}
    elif mode == "head":
        feats = jax.device_put(rng.standard_normal((batch, g, g, featurizer.dim), np.float32), dat)
        feats_pos = jax.device_put(rng.standard_normal((batch, g, g, featurizer.dim), np.float32), dat)
        example = {"feats": feats, "feats_pos": feats_pos, "label": labels}

        def get_batch():
            return example
    else:
        raise ValueError(f"mode must be 'full' or 'head', got {mode!r}")

    t0 = time.perf_counter()
    cs = step.lower(state, example, base_key).compile()
    compile_s += time.perf_counter() - t0
    fl = common.compiled_flops(cs)
    have_flops &= fl is not None
    flops += fl or 0.0
    buffers.append(common.compiled_buffers_mb(cs))

    holder = {"state": state}

    def run():
        holder["state"], out = cs(holder["state"], get_batch(), base_key)
        jax.block_until_ready((holder["state"], out))

    t = common.timed(run, iters, warmup)
    step_s = t["median_s"]
    device = jax.devices()[0]
    peak_mb, peak_kind = common.device_peak_memory_mb()
    per_device_flops = flops if have_flops else None
    peak = common.peak_tflops(device.device_kind, dtype) if device.platform != "cpu" else None
    achieved = per_device_flops / step_s / 1e12 if per_device_flops else None
    return {
        "model": model,
        "mode": mode,
        "dtype": dtype if mode == "full" else "(cached fp32 feats)",
        "res": res,
        "batch": batch,
        "iters": iters,
        "n_devices": mesh.devices.size,
        "images_per_s": batch / step_s,
        "ms_per_step_median": 1e3 * step_s,
        "ms_per_step_min": 1e3 * t["min_s"],
        "compile_s": compile_s,
        "gflop_per_step_per_device": per_device_flops / 1e9 if per_device_flops else None,
        "achieved_tflops_per_device": achieved,
        "peak_tflops_per_device": peak,
        "mfu": achieved / peak if (achieved and peak) else None,
        "xla_buffers_mb": max((b for b in buffers if b is not None), default=None),
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
    }


def markdown_table(records: list[dict], env: dict) -> str:
    lines = [
        common.machine_line(env),
        "",
        "| model | mode | backbone dtype | res | batch | images/s | ms/step (median) | compile s "
        "| GFLOP/step/device | TFLOP/s/device | MFU | XLA buffers MB | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['dtype']} | {r.get('res', '')} | "
                         f"{r.get('batch', '')} | failed: {r['error'][:120]} |||||||")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['res']} | {r['batch']} "
            f"| {r['images_per_s']:.2f} | {r['ms_per_step_median']:.0f} | {r['compile_s']:.1f} "
            f"| {common.fmt(r['gflop_per_step_per_device'], '.1f')} "
            f"| {common.fmt(r['achieved_tflops_per_device'], '.3f')} | {mfu} "
            f"| {common.fmt(r['xla_buffers_mb'], '.0f')} | {common.fmt(r['peak_memory_mb'], '.0f')} |"
        )
    ok = [r for r in records if "error" not in r]
    if ok:
        lines.append(
            f"\nfull = backbone on img + img_pos (2 x batch) + head/loss/probes/Adam; head = the "
            f"same update from cached features. images/s counts anchor images. peak MB = "
            f"{ok[-1]['peak_memory_kind']} (one subprocess per row). MFU vs the backbone dtype's "
            f"peak; n/a on CPU or unknown devices.")
    return "\n".join(lines)


def configs(args) -> list[tuple[str, str, str]]:
    out = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            for dtype in (args.dtypes.split(",") if mode == "full" else ["float32"]):
                out.append((model, dtype, mode))
    return out


def run_isolated(model: str, dtype: str, mode: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{model}:{dtype}:{mode}",
           "--batch", str(args.batch), "--res", str(args.res), "--iters", str(args.iters),
           "--warmup", str(args.warmup)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return {"model": model, "dtype": dtype, "mode": mode, "res": args.res, "batch": args.batch,
                "error": f"rc {p.returncode}: {tail[0]}"}
    return common.last_json_line(p.stdout)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vits8,vitb8", help="comma list of VIT_VARIANTS names")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="backbone compute dtypes")
    ap.add_argument("--modes", default="full,head", help="full (streamed) and/or head (cached)")
    common.add_shape_args(
        ap, batch_help="global batch (paper: 16)", res_help="training resolution (paper: 224)",
        iters_help="timed steps (median reported)",
        quick_help="tiny check: vits8, res 64, batch 2, 2 iters (overrides the shape args)")
    ap.add_argument("--no-isolate", action="store_true",
                    help="run all configurations in this process (peak memory is then cumulative)")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # worker: model:dtype:mode
    return common.parse_bench_args(ap, argv, out="experiments/benchmarks/train.json", quick_iters=2)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.one:
        model, dtype, mode = args.one.split(":")
        print(json.dumps(bench_one(model, dtype, mode, args.batch, args.res, args.iters,
                                   args.warmup)), flush=True)
        return {}
    from stego_jax.models import vit

    for name in args.models.split(","):
        vit.vit_config(name)  # fail before any compile on a typo
    load_start = os.getloadavg()
    records = []
    for model, dtype, mode in configs(args):
        if args.no_isolate:
            rec = bench_one(model, dtype, mode, args.batch, args.res, args.iters, args.warmup)
        else:
            rec = run_isolated(model, dtype, mode, args)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    return common.finish("train", args, records, markdown_table, load_start)


if __name__ == "__main__":
    main()
