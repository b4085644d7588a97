"""Backbone throughput benchmark: DINO / DINOv2 ViT forward images/s on the default JAX device.

Models are DINO v1 variant names (vits8, vitb8, vits16, vitb16, vitt16) or DINOv2 hub names
(dinov2_vits14, dinov2_vitb14_reg, ...), built with `stego_jax.models.build_backbone`. Random
weights have the same FLOPs as the real ones, so no checkpoint is needed. Example:

  python experiments/benchmarks/bench_backbone.py --models vits8,vitb8 --res 224,448 \
      --dtypes float32,bfloat16 --batch 16 --iters 20 --out experiments/benchmarks/backbone.json
  python experiments/benchmarks/bench_backbone.py --models dinov2_vits14,dinov2_vitb14 \
      --res 224,322 --dtypes float32 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stego_jax.models import build_backbone, num_prefix_tokens, vit
from stego_jax.models.dinov2 import DINOV2_VARIANTS, dinov2_config


def model_config(name: str):
    """The architecture of a DINO v1 variant name or a DINOv2 hub name."""
    return dinov2_config(name) if name in DINOV2_VARIANTS else vit.vit_config(name)


def count_params(params: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def _random_params(model, seed: int) -> Any:
    """Parameters of the model's shapes without compiling `init` (which costs a full compile)."""
    cfg = model.config
    p = cfg.patch_size  # one patch: every parameter shape, the least tracing
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, p, p, 3)))["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)]
    )


def _peak_memory_mb(device: jax.Device) -> tuple[float | None, str]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
    # CPU: the process high-water mark (KiB on Linux), cumulative over all configs run so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def bench_one(name: str, res: int, dtype: str, batch: int, iters: int, warmup: int) -> dict:
    """Time one (model, resolution, dtype) forward pass; returns a JSON-able record."""
    cfg = model_config(name)
    model = build_backbone(cfg, dtype=jnp.dtype(dtype))
    params = _random_params(model, seed=0)
    x = jax.random.normal(jax.random.key(1), (batch, res, res, 3), jnp.float32)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))

    t0 = time.perf_counter()
    compiled = fwd.lower(params, x).compile()
    compile_s = time.perf_counter() - t0

    for _ in range(warmup):
        compiled(params, x).block_until_ready()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        compiled(params, x).block_until_ready()
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    mem = compiled.memory_analysis()
    xla_mb = None
    if mem is not None:
        xla_mb = (
            mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        ) / 2**20
    device = jax.devices()[0]
    peak_mb, peak_kind = _peak_memory_mb(device)
    h, w = vit.grid_size((res, res), cfg.patch_size)
    return {
        "model": name,
        "res": res,
        "tokens": num_prefix_tokens(cfg) + h * w,
        "params": count_params(params),
        "dtype": dtype,
        "batch": batch,
        "iters": iters,
        "images_per_s": batch / step,
        "ms_per_batch_median": 1e3 * step,
        "ms_per_batch_min": 1e3 * min(times),
        "compile_s": compile_s,
        "gflop_per_image": flops / batch / 1e9 if flops else None,
        "achieved_tflops": flops / step / 1e12 if flops else None,
        "xla_buffers_mb": xla_mb,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
    }


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _load(avg: tuple[float, ...]) -> str:
    return "/".join(f"{a:.2f}" for a in avg)


def markdown_table(records: list[dict], env: dict) -> str:
    """Render benchmark records as a markdown table with an environment line."""
    lines = [
        f"device: {env['device_kind']} ({env['platform']}, {env['n_devices']} device(s)), "
        f"jax {env['jax']}, load avg (1/5/15 min) {_load(env['loadavg_start'])} at start, "
        f"{_load(env['loadavg'])} at end, {env['cpu_count']} CPUs",
        "",
        "| model | res | tokens | dtype | batch | images/s | ms/batch (median) | compile s "
        "| GFLOP/img | TFLOP/s | XLA buffers MB | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {r['res']} | {r['tokens']} | {r['dtype']} | {r['batch']} "
            f"| {r['images_per_s']:.2f} | {r['ms_per_batch_median']:.0f} | {r['compile_s']:.1f} "
            f"| {_fmt(r['gflop_per_image'], '.1f')} | {_fmt(r['achieved_tflops'], '.3f')} "
            f"| {_fmt(r['xla_buffers_mb'], '.0f')} | {_fmt(r['peak_memory_mb'], '.0f')} |"
        )
    if records:
        lines.append(f"\npeak MB = {records[-1]['peak_memory_kind']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vits8,vitb8", help="comma list of VIT_VARIANTS or DINOv2 names")
    ap.add_argument("--res", default="224", help="comma list of square input sizes")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of compute dtypes")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5, help="timed forward passes (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="experiments/benchmarks/backbone.json")
    args = ap.parse_args(argv)

    for name in args.models.split(","):
        model_config(name)  # fail before any compile on a typo
    device = jax.devices()[0]
    load_start = os.getloadavg()
    records = []
    for name in args.models.split(","):
        for res in (int(r) for r in args.res.split(",")):
            for dtype in args.dtypes.split(","):
                rec = bench_one(name, res, dtype, args.batch, args.iters, args.warmup)
                print(json.dumps(rec), flush=True)
                records.append(rec)
    env = {
        "jax": jax.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "n_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg": os.getloadavg(),
        "host": platform.platform(),
    }
    table = markdown_table(records, env)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"env": env, "records": records, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
