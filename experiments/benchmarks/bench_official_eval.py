"""Side by side: the official STEGO evaluation with CRF vs ours, same machine, same run.

The official side does, per batch, what the loop of the checkout's `src/eval_segmentation.py`
does (`--official PATH`, imported at run time from that path, under `--torch-python`; the net
and probes are built as in bench_official_stego.py: random-init DINO of the chosen size, nothing
downloaded): `net(img)` and `net(img.flip(dims=[3]))` under `no_grad`, the averaged code
upsampled bilinearly to the label size, linear-probe `log_softmax` and cluster-probe log probs
(alpha 2), then the official `batched_crf` on both maps: `pool.map` of the official
`src/crf.py` `dense_crf` (pydensecrf) over the images, with a fork `multiprocessing.Pool`
opened before the loop as the official one (forked before the model is built: see
`torch_worker`; its size: `--crf-processes`, default the machine's cores; the official
eval_config.yml asks for num_workers + 5 = 29), and the argmax of both results.
`src/eval_segmentation.py` itself cannot be imported (hydra, seaborn, torchvision), so that
loop body and its two-line `batched_crf` are written out here; `dense_crf`, the featurizer and
the probes come from the checkout. `src/crf.py` takes
`unnorm` from `utils` (given by the stand-in of bench_official_stego.py) and `to_pil_image`
from torchvision: without torchvision a stand-in doing what torchvision does to a float CHW
tensor (x * 255 to uint8, HWC, RGB) is registered.

Ours: bench_eval.py's stages on the same images: flip-TTA codes, upsample + probes, the CRF of
both label maps as `evaluate` runs it (backend jax: both over one lattice per image, and
pydensecrf with a pool of `--crf-processes`); the
totals are sums of the per-stage medians. Both sides exclude data loading, the first batch
(warm-up, compile) and the metrics update (a confusion-matrix bincount). Images: scikit-image
sample photos, centre-cropped and resized to res (`stego_jax.testing.sample_photo`): the CRF cost
depends on the image, and noise images make the bilateral lattice abnormally large. Reported
as images/s and the ratio ours/official; without --official the official row is skipped.

  python experiments/benchmarks/bench_official_eval.py --official /tmp/stego_official \
      --models vits8 --res 320 --batch 4 --out experiments/benchmarks/official_eval.json
  python experiments/benchmarks/bench_official_eval.py --official /tmp/stego_official --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (stdlib only: also imported by the torch worker)
from bench_official_stego import (add_official_args, build_official, import_official,  # noqa: E402
                                  side_by_side, torch_device_info)

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
OFFICIAL = "official STEGO (PyTorch)"


def photos(batch: int, res: int):
    """[batch, res, res, 3] uint8 RGB: PHOTOS in turn (driver only: needs scikit-image)."""
    import numpy as np
    from stego_jax.testing import sample_photo

    return np.stack([sample_photo(PHOTOS[i % len(PHOTOS)], res, res) for i in range(batch)])


# ------------------------------------------------------------------------------------------
# PyTorch worker (runs under --torch-python; imports no jax)
# ------------------------------------------------------------------------------------------

def stand_in_torchvision() -> None:
    """Register `torchvision.transforms.functional.to_pil_image` (all src/crf.py takes from
    torchvision) when torchvision is not installed."""
    try:
        import torchvision.transforms.functional  # noqa: F401
        return
    except ImportError:
        pass
    from PIL import Image

    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
    mods = [types.ModuleType(n) for n in names]
    mods[0].transforms, mods[1].functional = mods[1], mods[2]
    mods[2].to_pil_image = lambda pic: Image.fromarray(
        pic.mul(255).byte().permute(1, 2, 0).cpu().numpy())
    sys.modules.update(zip(names, mods))


def torch_worker(args) -> dict:
    import multiprocessing

    import numpy as np
    import torch
    import torch.multiprocessing
    import torch.nn.functional as F
    import yaml

    src = import_official(args.official)
    stand_in_torchvision()
    import crf  # noqa: E402  (official src/crf.py)

    torch.multiprocessing.set_sharing_strategy("file_system")  # as eval_segmentation.py
    with open(os.path.join(src, "configs", "eval_config.yml")) as f:
        official_pool = yaml.safe_load(f)["num_workers"] + 5
    processes = args.crf_processes or official_pool
    # The pool is forked before torch's first CPU op: a child forked after torch's CPU thread
    # pool has run deadlocks in its own first parallel op (libgomp). The official eval forks it
    # after loading the model, which on its GPU runs no CPU parallel region in the parent.
    with multiprocessing.Pool(processes) as pool:
        parts = build_official(args)
        net, linear_probe, cluster_probe, dev = (parts.net, parts.linear_probe,
                                                 parts.cluster_probe, parts.dev)
        for m in (net, linear_probe, cluster_probe):
            m.eval()
        rgb = torch.from_numpy(np.load(args.images)).permute(0, 3, 1, 2).float() / 255
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        img = ((rgb - mean[:, None, None]) / std[:, None, None]).to(dev)  # as get_transform
        label_hw = img.shape[-2:]
        stage: dict[str, list[float]] = {"net": [], "crf": []}

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize()

        def batched_crf(img_tensor, prob_tensor):  # eval_segmentation.batched_crf
            outputs = pool.starmap(crf.dense_crf, zip(img_tensor.detach().cpu(),
                                                      prob_tensor.detach().cpu()))
            return torch.cat([torch.from_numpy(arr).unsqueeze(0) for arr in outputs], dim=0)

        def step() -> tuple:  # the body of eval_segmentation.py's loop, run_crf: True
            t0 = time.perf_counter()
            with torch.no_grad():
                feats, code1 = net(img)
                feats, code2 = net(img.flip(dims=[3]))
                code = (code1 + code2.flip(dims=[3])) / 2
                code = F.interpolate(code, label_hw, mode="bilinear", align_corners=False)
                linear_probs = torch.log_softmax(linear_probe(code), dim=1)
                cluster_probs = cluster_probe(code, 2, log_probs=True)
                sync()
                t1 = time.perf_counter()
                linear_preds = batched_crf(img, linear_probs).argmax(1).to(dev)
                cluster_preds = batched_crf(img, cluster_probs).argmax(1).to(dev)
                sync()
            stage["net"].append(t1 - t0)
            stage["crf"].append(time.perf_counter() - t1)
            return linear_preds, cluster_preds

        t0 = time.perf_counter()
        step()
        first_s = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = common.timed(step, args.iters, max(args.warmup - 1, 0))
    med = {k: statistics.median(v[-args.iters:]) for k, v in stage.items()}
    return {
        "impl": OFFICIAL,
        "model": args.model,
        "dtype": "float32",
        "res": args.res,
        "batch": args.batch,
        "iters": args.iters,
        "crf": f"pydensecrf, Pool({processes})",
        "images_per_s": args.batch / t["median_s"],
        "ms_per_batch_median": 1e3 * t["median_s"],
        "ms_per_batch_min": 1e3 * t["min_s"],
        "ms_net_probes_median": 1e3 * med["net"],
        "ms_crf_x2_median": 1e3 * med["crf"],
        "first_batch_s": first_s,
        "crf_processes": processes,
        "official_pool_size": official_pool,
        **torch_device_info(dev),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------
# Driver (runs in the project's venv)
# ------------------------------------------------------------------------------------------

def ours_rows(model: str, images, args) -> tuple[list[dict], list[dict]]:
    """(rows, stages): bench_eval.py's stage records on `images`, and its CRF totals (the rows
    of the table)."""
    import bench_eval

    stages = bench_eval.bench_model(model, args.dtype, args.batch, args.res, args.iters,
                                    args.warmup, args.crf_backends.split(","), args.crf_processes,
                                    images=images)
    rows = []
    for r in stages:
        if r["stage"].startswith("TOTAL with crf x2 ("):
            backend = r["stage"][len("TOTAL with crf x2 ("):-1]
            crf = f"pydensecrf, spawn Pool({args.crf_processes})" if backend == "pydensecrf" \
                else backend
            rows.append({**r, "impl": "stego_jax", "crf": crf,
                         "ms_per_batch_median": 1e3 * r["s_per_batch"]})
        elif r["stage"].startswith("crf") and "error" in r:
            rows.append({**r, "impl": "stego_jax", "crf": r["stage"][len("crf x2 ("):-1]})
    return rows, stages


def markdown_table(rows: list[dict], stages: list[dict], env: dict, skipped: str | None) -> str:
    lines = [common.machine_line(env), "",
             "| model | implementation | CRF | backbone dtype | res | batch | images/s "
             "| ms/batch (median) | ours / official |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['impl']} | {r.get('crf', '')} | | | "
                         f"| failed: {r['error'][:160]} |||")
            continue
        ratio = r.get("ratio_vs_official")
        lines.append(
            f"| {r['model']} | {r['impl']} | {r['crf']} | {r['dtype']} | {r['res']} | {r['batch']} "
            f"| {r['images_per_s']:.3f} | {r['ms_per_batch_median']:.0f} "
            f"| {'' if ratio is None else f'{ratio:.2f}x'} |")
    if skipped:
        lines.append(f"\nofficial row skipped: {skipped}")
    for o in (r for r in rows if r["impl"] == OFFICIAL and "error" not in r):
        lines.append(
            f"\nofficial ({o['model']}): torch {o['torch']} on {o['torch_device']} "
            f"({o['torch_threads']} threads); per batch {o['ms_net_probes_median']:.0f} ms "
            f"forwards + probes, {o['ms_crf_x2_median']:.0f} ms CRF x2 (the official config's "
            f"pool has {o['official_pool_size']} processes).")
    ours = [s for s in stages if "s_per_batch" in s and not s["stage"].startswith("TOTAL")]
    if ours:
        lines.append("\nours per batch: " + "; ".join(
            f"{s['model']} {s['stage']} {1e3 * s['s_per_batch']:.0f} ms" for s in ours)
            + ". Totals are sums of stage medians.")
    lines.append(f"\nImages: scikit-image photos ({', '.join(PHOTOS)}) cropped to res. Both sides: "
                 "flip TTA (2 forwards), bilinear upsample, linear + cluster probes, dense CRF "
                 "(10 iterations) on both maps; data loading, the first batch (warm-up / "
                 "compile) and the metrics update not included.")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_official_args(ap, "pyyaml, pillow, pydensecrf2")
    ap.add_argument("--dtype", default="float32", help="our backbone dtype")
    common.add_shape_args(ap, batch=4, res=320, iters=2, iters_help="timed batches",
                          res_help="eval resolution (official: 320)",
                          batch_help="images per batch (official loader: 16)",
                          quick_help="tiny check: res 64, batch 2, 1 batch")
    ap.add_argument("--crf-processes", type=int, default=os.cpu_count() or 1,
                    help="CRF process pool size, both sides (official config: 29)")
    ap.add_argument("--crf-backends", default="jax,pydensecrf", help="our CRF backends")
    ap.add_argument("--images", default="", help=argparse.SUPPRESS)  # worker: .npy of the photos
    return common.parse_bench_args(ap, argv, out="experiments/benchmarks/official_eval.json",
                                   quick_iters=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if common.ran_as_worker(args, torch_worker):
        return {}
    import numpy as np

    load_start = os.getloadavg()
    images = photos(args.batch, args.res)
    stages = []

    def ours(model: str) -> list[dict]:
        rows, st = ours_rows(model, images, args)
        stages.extend(st)
        return rows

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.npy")
        np.save(path, images)
        rows, skipped = side_by_side(args, ours, __file__,
                                     ("--images", path, "--crf-processes", str(args.crf_processes)))
    return common.finish("official_eval", args, rows,
                         lambda records, env: markdown_table(records, stages, env, skipped),
                         load_start, stages=stages, skipped=skipped)


if __name__ == "__main__":
    main()
