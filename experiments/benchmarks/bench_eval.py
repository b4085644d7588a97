"""Evaluation-throughput benchmark: images/s of the official eval path, stage by stage.

Per batch of `--batch` images at `--res` (paper: 320), with random weights (same FLOPs):
  codes   flip-TTA codes: backbone + head on the image and on its mirror, averaged
          (`stego_jax.featurize.make_code_fn`, flip=True)
  heads   codes upsampled bilinearly to res x res, cluster (2 cos) and linear logits
          (`stego_jax.evaluate.make_heads_fn`)
  crf     `stego_jax.crf.crf_labels` on the cluster and the linear logits, as `evaluate`
          calls it (the official eval runs the dense CRF twice per image; the jax backend
          refines both label sets over one lattice): backend jax, and pydensecrf if installed
Totals: images/s of codes + heads + 2 CRFs, one per CRF backend. Inputs are smooth synthetic
images (random 10x10 colour grids, upsampled, +-8 noise: the lattice size of the bilateral
kernel depends on the image), already in host memory; decoding/resizing is not included.

  python experiments/benchmarks/bench_eval.py --models vits8 --res 320 --batch 16 \
      --out experiments/benchmarks/eval.json
  python experiments/benchmarks/bench_eval.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def synthetic_images(rng, batch: int, res: int):
    import numpy as np

    grid = rng.integers(0, 256, (batch, 10, 10, 3)).astype(np.float32)
    idx = (np.arange(res) * 10) // res
    img = grid[:, idx][:, :, idx] + rng.uniform(-8, 8, (batch, res, res, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def bench_model(model: str, dtype: str, batch: int, res: int, iters: int, warmup: int,
                crf_backends: list[str], crf_processes: int,
                images: np.ndarray | None = None) -> list[dict]:
    """Stage and total records of one model; `images` [batch,res,res,3] uint8 (default:
    `synthetic_images`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_train import make_config, random_featurizer

    from stego_jax import parallel
    from stego_jax.evaluate import make_heads_fn
    from stego_jax.featurize import make_code_fn, make_featurize
    from stego_jax.model import build_modules, create_state

    config = make_config(model, dtype, batch, res)
    config.eval.res = res
    mesh = parallel.make_mesh()
    rep, dat = parallel.replicated(mesh), parallel.data_sharding(mesh)
    featurizer = random_featurizer(config)
    modules = build_modules(config)
    params = create_state(config, featurizer.dim, jax.random.key(0))["params"]
    fparams = jax.device_put(featurizer.params, rep)
    code_fn = make_code_fn(modules, make_featurize(featurizer, mesh), flip=True)
    heads = make_heads_fn(modules)
    rng = np.random.default_rng(0)
    images_np = (synthetic_images(rng, batch, res) if images is None
                 else np.asarray(images, np.uint8))
    images = jax.device_put(images_np, dat)
    labels = jnp.zeros((batch, res, res), jnp.int32)

    base = {"model": model, "dtype": dtype, "res": res, "batch": batch, "iters": iters}
    records = []

    t0 = time.perf_counter()
    c_code = code_fn.lower(fparams, params["head"], images).compile()
    code_compile = time.perf_counter() - t0
    c = c_code(fparams, params["head"], images)
    t0 = time.perf_counter()
    c_heads = heads.lower(params, c, labels).compile()
    heads_compile = time.perf_counter() - t0
    cl, li, _ = c_heads(params, c, labels)

    t = common.timed(lambda: jax.block_until_ready(c_code(fparams, params["head"], images)),
                     iters, warmup)
    flops = common.compiled_flops(c_code)
    peak = common.peak_tflops(jax.devices()[0].device_kind, dtype) \
        if jax.devices()[0].platform != "cpu" else None
    ach = flops / t["median_s"] / 1e12 if flops else None
    records.append({**base, "stage": "codes (flip TTA: 2 forwards)", "s_per_batch": t["median_s"],
                    "compile_s": code_compile, "achieved_tflops_per_device": ach,
                    "mfu": ach / peak if (ach and peak) else None})
    t = common.timed(lambda: jax.block_until_ready(c_heads(params, c, labels)), iters, warmup)
    records.append({**base, "stage": "heads (upsample + probes)", "s_per_batch": t["median_s"],
                    "compile_s": heads_compile})

    cl_np, li_np = np.asarray(cl), np.asarray(li)
    try:
        from stego_jax.crf import crf_labels
    except ImportError as e:  # a colleague's module; report instead of failing the whole run
        crf_labels = None
        crf_error = f"stego_jax.crf.crf_labels not importable: {e}"
    for backend in crf_backends:
        rec = {**base, "stage": f"crf x2 ({backend})"}
        if crf_labels is None:
            records.append({**rec, "error": crf_error})
            continue
        if backend == "pydensecrf":
            try:
                import pydensecrf.densecrf  # noqa: F401
            except ImportError:
                records.append({**rec, "error": "pydensecrf not installed (pip install stego_jax[crf])"})
                continue
        kw = {"backend": backend}
        if backend == "pydensecrf":
            kw["processes"] = crf_processes

        def both():
            crf_labels(images_np, [cl_np, li_np], **kw)

        try:
            t0 = time.perf_counter()
            both()  # jax: compiles; pydensecrf: starts the pool
            first = time.perf_counter() - t0
            t = common.timed(both, iters, max(warmup - 1, 0))
        except Exception as e:  # noqa: BLE001 - report the failing stage, keep the others
            records.append({**rec, "error": f"{type(e).__name__}: {e}"})
            continue
        records.append({**rec, "s_per_batch": t["median_s"], "first_call_s": first,
                        "processes": crf_processes if backend == "pydensecrf" else None})

    ok = {r["stage"]: r for r in records if "error" not in r}
    base_s = sum(r["s_per_batch"] for k, r in ok.items() if not k.startswith("crf"))
    totals = [{**base, "stage": "TOTAL without CRF", "s_per_batch": base_s}]
    for k, r in ok.items():
        if k.startswith("crf"):
            totals.append({**base, "stage": f"TOTAL with {k}", "s_per_batch": base_s + r["s_per_batch"]})
    for r in records + totals:
        if "s_per_batch" in r:
            r["images_per_s"] = batch / r["s_per_batch"]
    peak_mb, kind = common.device_peak_memory_mb()
    for r in records + totals:
        r["peak_memory_mb"], r["peak_memory_kind"] = peak_mb, kind
    return records + totals


def markdown_table(records: list[dict], env: dict) -> str:
    lines = [common.machine_line(env), "",
             "| model | dtype | res | batch | stage | images/s | ms/batch (median) | compile / first call s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['res']} | {r['batch']} | {r['stage']} "
                         f"| skipped: {r['error'][:140]} ||||")
            continue
        first = r.get("compile_s", r.get("first_call_s"))
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else (
            "n/a" if r["stage"].startswith("codes") else "")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['res']} | {r['batch']} | {r['stage']} "
                     f"| {r['images_per_s']:.2f} | {1e3 * r['s_per_batch']:.0f} "
                     f"| {common.fmt(first, '.1f') if first is not None else ''} | {mfu} |")
    ok = [r for r in records if "peak_memory_kind" in r]
    if ok:
        lines.append(f"\nPeak memory ({ok[-1]['peak_memory_kind']}, whole process): "
                     f"{ok[-1]['peak_memory_mb']:.0f} MB. CRF rows: two dense CRFs per image "
                     "(cluster and linear), 10 mean-field iterations, official parameters.")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vits8", help="comma list of VIT_VARIANTS names")
    ap.add_argument("--dtype", default="float32", help="backbone compute dtype")
    common.add_shape_args(ap, res=320, res_help="eval resolution (paper: 320)", iters=3,
                          quick_help="tiny check: res 64, batch 2, 1 iter")
    ap.add_argument("--crf-backends", default="jax,pydensecrf")
    ap.add_argument("--crf-processes", type=int, default=os.cpu_count() or 1,
                    help="process pool size of the pydensecrf backend")
    return common.parse_bench_args(ap, argv, out="experiments/benchmarks/eval.json", quick_iters=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    load_start = os.getloadavg()
    records = []
    for model in args.models.split(","):
        recs = bench_model(model, args.dtype, args.batch, args.res, args.iters, args.warmup,
                           args.crf_backends.split(","), args.crf_processes)
        for r in recs:
            print(json.dumps(r), flush=True)
        records += recs
    return common.finish("eval", args, records, markdown_table, load_start)


if __name__ == "__main__":
    main()
