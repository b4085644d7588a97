"""Benchmark of stego_jax.crf.dense_crf against pydensecrf2 on real photos with STEGO-like unaries.

python experiments/benchmarks/bench_crf.py [--repeats 5] [--images astronaut chelsea coffee] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from stego_jax import crf
from stego_jax.testing import sample_photo, stego_like_logits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", nargs="+", default=["astronaut", "chelsea", "coffee"])
    ap.add_argument("--configs", nargs="+", default=["160x240x5", "320x320x27"], help="HxWxK")
    ap.add_argument("--spatial", nargs="+", default=["lattice", "conv"], help="lattice: the default of dense_crf")
    ap.add_argument("--capacity", type=float, default=None, help="lattice capacity as a multiple of H·W")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=0, help="also time jit(vmap) over this many images")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    return ap.parse_args()


def have_pydensecrf() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def bench_one(fn, im: np.ndarray, lg: np.ndarray, repeats: int, have_ref: bool, **row) -> dict:
    """One image: ours (`fn`) against pydensecrf when present, timings and agreement."""
    im_j, lg_j = jnp.asarray(im), jnp.asarray(lg)
    t0 = time.perf_counter()
    ours = np.asarray(fn(im_j, lg_j))
    row["first_call_s"] = time.perf_counter() - t0
    # Reference and ours alternate within the same loop so load changes hit both.
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t_ours.append(timed(lambda: fn(im_j, lg_j), 1))
        if have_ref:
            t_ref.append(timed(lambda: crf._pydensecrf_one(im, lg), 1))
    row["ours_s"] = statistics.median(t_ours)
    if have_ref:
        ref = crf._pydensecrf_one(im, lg)
        row["ref_s"] = statistics.median(t_ref)
        row["speed_vs_ref"] = row["ref_s"] / row["ours_s"]
        row["agree"] = float((ours.argmax(-1) == ref.argmax(-1)).mean())
        row["mean_abs_dq"] = float(np.abs(ours - ref).mean())
    return row


def bench_batch(args: argparse.Namespace, cfg: str, spatial: str, cap: int | None) -> list[dict]:
    """`--batch` images at once: jit(vmap(dense_crf)) and dense_crf_batch (lax.map), per image."""
    h, w, k = (int(x) for x in cfg.split("x"))
    ims = np.stack([sample_photo(args.images[j % len(args.images)], h, w) for j in range(args.batch)])
    lgs = np.stack([stego_like_logits(ims[j], k, j) for j in range(args.batch)])
    ims_j, lgs_j = jnp.asarray(ims), jnp.asarray(lgs)
    vmapped = jax.jit(jax.vmap(lambda a, b: crf.dense_crf(a, b, spatial=spatial, capacity=cap)))
    variants = [
        (f"vmap{args.batch}", lambda: vmapped(ims, lgs)),
        (f"dense_crf_batch{args.batch} (lax.map)",
         lambda: crf.dense_crf_batch(ims_j, lgs_j, spatial=spatial, capacity=cap)),
    ]
    rows = []
    for image, fn in variants:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - t0
        tb = timed(fn, max(1, args.repeats // 2))
        rows.append({"config": cfg, "spatial": spatial, "image": image, "first_call_s": first,
                     "ours_s": tb / args.batch})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], env: dict) -> str:
    lines = [common.machine_line(env), "",
             "| config | spatial | image | agree vs pydensecrf | mean\\|ΔQ\\| | pydensecrf s | ours s | speed vs ref | first call s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        agree = f"{100 * r['agree']:.2f}%" if "agree" in r else "–"
        dq = f"{r['mean_abs_dq']:.1e}" if "mean_abs_dq" in r else "–"
        ref = f"{r['ref_s']:.3f}" if "ref_s" in r else "–"
        sp = f"{r['speed_vs_ref']:.2f}×" if "speed_vs_ref" in r else "–"
        lines.append(f"| {r['config']} | {r['spatial']} | {r['image']} | {agree} | {dq} | {ref} | "
                     f"{r['ours_s']:.3f} | {sp} | {r['first_call_s']:.1f} |")
    lines += ["", "pydensecrf2 single-threaded, ours on the default JAX device; both alternate in one "
              "process so load changes hit both. spatial=lattice is dense_crf's default."]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    have_ref = have_pydensecrf()
    load_start = os.getloadavg()
    rows = []
    for cfg in args.configs:
        h, w, k = (int(x) for x in cfg.split("x"))
        cap = None if args.capacity is None else int(args.capacity * h * w)
        for spatial in args.spatial:
            fn = jax.jit(lambda im, lg, s=spatial: crf.dense_crf(im, lg, spatial=s, capacity=cap))
            for i, name in enumerate(args.images):
                im = sample_photo(name, h, w)
                rows.append(bench_one(fn, im, stego_like_logits(im, k, i), args.repeats, have_ref,
                                      config=cfg, spatial=spatial, image=name))
                print(json.dumps(rows[-1]), flush=True)
            if args.batch:
                rows += bench_batch(args, cfg, spatial, cap)

    env = common.machine(load_start)
    text = table(rows, env)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "args": vars(args), "records": rows, "table": text}, f, indent=1)


if __name__ == "__main__":
    main()
