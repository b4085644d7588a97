"""Cost of calling stego_jax.crf.dense_crf as documented: directly on NumPy arrays, next to the
same call under an explicit `jax.jit` and to pydensecrf2 (when installed), on real photos.

python experiments/benchmarks/bench_api_calls.py [--config 160x240x5] [--images astronaut chelsea]
    [--repeats 5] [--out r.json]

The three calls alternate within one loop so that load changes hit all of them; each figure is
the median (and min) of `--repeats` calls after one warm-up call, whose time is reported as the
first call. "same as jit" compares the direct call's probabilities with the jitted call's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

from stego_jax import crf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from stego_jax.testing import sample_photo as photo, stego_like_logits  # noqa: E402


def _once(fn) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(fn()))
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="160x240x5", help="HxWxK")
    ap.add_argument("--images", nargs="+", default=["astronaut", "chelsea", "coffee"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-ref", action="store_true", help="skip pydensecrf even if installed")
    ap.add_argument("--out", default=None, help="write the records as JSON here")
    args = ap.parse_args(argv)
    have_ref = False
    if not args.no_ref:
        try:
            import pydensecrf.densecrf  # noqa: F401

            have_ref = True
        except ImportError:
            pass

    load_start = os.getloadavg()
    h, w, k = (int(x) for x in args.config.split("x"))
    jitted = jax.jit(crf.dense_crf)
    records = []
    for i, name in enumerate(args.images):
        im = photo(name, h, w)
        lg = stego_like_logits(im, k, i)
        calls = {"direct": lambda: crf.dense_crf(im, lg), "jax.jit": lambda: jitted(im, lg)}
        if have_ref:
            calls["pydensecrf"] = lambda: crf._pydensecrf_one(im, lg)
        first, outs, times = {}, {}, {m: [] for m in calls}
        for mode, fn in calls.items():
            first[mode], outs[mode] = _once(fn)
        for _ in range(args.repeats):
            for mode, fn in calls.items():
                times[mode].append(_once(fn)[0])
        for mode in calls:
            rec = {"image": name, "config": args.config, "call": mode, "first_call_s": first[mode],
                   "median_s": statistics.median(times[mode]), "min_s": min(times[mode])}
            if mode == "direct":
                rec["same_as_jit"] = bool(np.array_equal(outs["direct"], outs["jax.jit"]))
            if mode != "pydensecrf":
                rec["max_abs_dq_vs_jit"] = float(np.abs(outs[mode] - outs["jax.jit"]).max())
            records.append(rec)
        ref = {r["call"]: r["median_s"] for r in records if r["image"] == name}
        for r in records:
            if r["image"] == name:
                r["speed_vs_jit"] = ref["jax.jit"] / r["median_s"]
                if have_ref:
                    r["speed_vs_pydensecrf"] = ref["pydensecrf"] / r["median_s"]
        print(f"{name}: " + ", ".join(f"{m} {1e3 * ref[m]:.1f} ms" for m in calls), flush=True)

    def table(recs: list[dict], env: dict) -> str:
        lines = [common.machine_line(env), "",
                 "| image | HxWxK | call | first call s | median ms | min ms | speed vs jax.jit "
                 "| speed vs pydensecrf | same as jit |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in recs:
            sp_ref = common.fmt(r.get("speed_vs_pydensecrf"), ".2f")
            sp_ref += "x" if sp_ref != "n/a" else ""
            same = {True: "yes", False: "no"}.get(r.get("same_as_jit"), "–")
            lines.append(f"| {r['image']} | {r['config']} | {r['call']} | {r['first_call_s']:.2f} "
                         f"| {1e3 * r['median_s']:.1f} | {1e3 * r['min_s']:.1f} "
                         f"| {r['speed_vs_jit']:.2f}x | {sp_ref} | {same} |")
        return "\n".join(lines)

    return common.finish("api_calls", args, records, table, load_start)


if __name__ == "__main__":
    main()
