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
from scipy import ndimage
from skimage import data, transform

from stego_jax import crf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def photo(name: str, h: int, w: int) -> np.ndarray:
    """Centre crop of a scikit-image sample photo resized to [h, w, 3] uint8."""
    im = getattr(data, name)()
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    im = im[..., :3]
    ih, iw = im.shape[:2]
    s = min(ih / h, iw / w)
    ch, cw = int(h * s), int(w * s)
    y0, x0 = (ih - ch) // 2, (iw - cw) // 2
    im = transform.resize(im[y0 : y0 + ch, x0 : x0 + cw], (h, w), anti_aliasing=True)
    return (im * 255).round().astype(np.uint8)


def stego_like_logits(image: np.ndarray, k: int, seed: int) -> np.ndarray:
    """logits = 2·cos(pixel embedding, centroid) + smooth noise, as STEGO's cluster probe gives."""
    rng = np.random.default_rng(seed)
    h, w, _ = image.shape
    col = ndimage.gaussian_filter(image.astype(np.float32) / 255, (2, 2, 0))
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    emb = np.tanh(np.concatenate([col, 0.5 * yy[..., None], 0.5 * xx[..., None]], -1) @ rng.normal(size=(5, 16)) * 2)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    cent = emb.reshape(-1, 16)[rng.choice(h * w, k, replace=False)]
    noise = ndimage.gaussian_filter(rng.normal(size=(h, w, k)), (6, 6, 0))
    return (2 * emb @ cent.T + 0.3 * noise / noise.std()).astype(np.float32)


def timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", nargs="+", default=["astronaut", "chelsea", "coffee"])
    ap.add_argument("--configs", nargs="+", default=["160x240x5", "320x320x27"], help="HxWxK")
    ap.add_argument("--spatial", nargs="+", default=["lattice", "conv"], help="lattice: the default of dense_crf")
    ap.add_argument("--capacity", type=float, default=None, help="lattice capacity as a multiple of H·W")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=0, help="also time jit(vmap) over this many images")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    try:
        import pydensecrf.densecrf  # noqa: F401

        have_ref = True
    except ImportError:
        have_ref = False

    load_start = os.getloadavg()
    rows = []
    for cfg in args.configs:
        h, w, k = (int(x) for x in cfg.split("x"))
        cap = None if args.capacity is None else int(args.capacity * h * w)
        for spatial in args.spatial:
            fn = jax.jit(lambda im, lg, s=spatial: crf.dense_crf(im, lg, spatial=s, capacity=cap))
            for i, name in enumerate(args.images):
                im = photo(name, h, w)
                lg = stego_like_logits(im, k, i)
                im_j, lg_j = jnp.asarray(im), jnp.asarray(lg)
                t0 = time.perf_counter()
                ours = np.asarray(fn(im_j, lg_j))
                first = time.perf_counter() - t0
                row = {"config": cfg, "spatial": spatial, "image": name, "first_call_s": first}
                # Reference and ours alternate within the same loop so load changes hit both.
                t_ours, t_ref = [], []
                for _ in range(args.repeats):
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
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.batch:
                ims = np.stack([photo(args.images[j % len(args.images)], h, w) for j in range(args.batch)])
                lgs = np.stack([stego_like_logits(ims[j], k, j) for j in range(args.batch)])
                bfn = jax.jit(jax.vmap(lambda a, b, s=spatial: crf.dense_crf(a, b, spatial=s, capacity=cap)))
                t0 = time.perf_counter()
                jax.block_until_ready(bfn(ims, lgs))
                first = time.perf_counter() - t0
                tb = timed(lambda: bfn(ims, lgs), max(1, args.repeats // 2))
                row = {"config": cfg, "spatial": spatial, "image": f"vmap{args.batch}", "first_call_s": first,
                       "ours_s": tb / args.batch}
                rows.append(row)
                print(json.dumps(row), flush=True)
                ims_j, lgs_j = jnp.asarray(ims), jnp.asarray(lgs)
                t0 = time.perf_counter()
                jax.block_until_ready(crf.dense_crf_batch(ims_j, lgs_j, spatial=spatial, capacity=cap))
                first = time.perf_counter() - t0
                tb = timed(lambda: crf.dense_crf_batch(ims_j, lgs_j, spatial=spatial, capacity=cap), max(1, args.repeats // 2))
                row = {"config": cfg, "spatial": spatial, "image": f"dense_crf_batch{args.batch} (lax.map)",
                       "first_call_s": first, "ours_s": tb / args.batch}
                rows.append(row)
                print(json.dumps(row), flush=True)

    env = common.machine(load_start)
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
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "args": vars(args), "records": rows, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
