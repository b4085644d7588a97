"""Side by side: the official STEGO PyTorch train step vs ours, same machine, same run.

The official side runs the modules of a checkout of mhamilton723/STEGO (`--official PATH`, the
repository root or its `src/`), imported at run time from that path, in a separate Python
environment (`--torch-python`, default /work/torchvenv/bin/python): `DinoFeaturizer`
(random-init ViT of the chosen size, the same FLOPs as DINO's: `torch.hub.load_state_dict_from_url`
is replaced by the state dict of a freshly built `dino.vision_transformer` model, so nothing is
downloaded and the official strict load still runs), `ContrastiveCorrelationLoss` and
`ClusterLookup`, with the values of the checkout's `src/configs/train_config.yml` (Adam 5e-4 on
the featurizer, 5e-3 on each probe, batch 16, res 224 unless overridden). The step follows the
official `training_step` (img and img_pos through the net, correspondence loss, linear-probe CE
on bilinearly upsampled logits of the detached code, cluster-probe loss, one backward, three
optimizer steps), without logging. CUDA when torch sees a GPU, else CPU.

Nothing of the official code is copied here. Its `src/utils.py` cannot be imported without
torchvision (and `torch._six`, gone in torch 2): `modules.py` only takes `torch`, `nn`, `F` and
`np` from its `from utils import *`, so a stand-in `utils` module providing exactly those is
registered before the import. `dino/utils.py` needs Pillow.

Ours: bench_train.py's `full` step (fp32 and bf16 backbone) in this environment. Reported as
images/s and the ratio ours/official. Without --official the official row is skipped (with the
reason) and ours is still reported.

  python experiments/benchmarks/bench_official_stego.py --official /tmp/stego_official \
      --models vits8 --out experiments/benchmarks/official.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (stdlib only: also imported by the torch worker)

ARCH = {"vits8": ("vit_small", 8), "vits16": ("vit_small", 16), "vitb8": ("vit_base", 8),
        "vitb16": ("vit_base", 16)}


def official_src(path: str) -> str:
    for cand in (os.path.join(path, "src"), path):
        if os.path.exists(os.path.join(cand, "modules.py")) and \
                os.path.exists(os.path.join(cand, "dino", "vision_transformer.py")):
            return os.path.abspath(cand)
    raise FileNotFoundError(
        f"{path!r} is not a checkout of mhamilton723/STEGO (no src/modules.py and "
        f"src/dino/vision_transformer.py)")


# ------------------------------------------------------------------------------------------
# PyTorch worker (runs under --torch-python; imports no jax)
# ------------------------------------------------------------------------------------------

def import_official(path: str) -> str:
    """Put the checkout's src/ on sys.path, behind a stand-in `utils` module (see the module
    docstring; `unnorm`, which the official src/crf.py takes from it, is ImageNet un-normalising);
    returns the src/ path. Torch worker only."""
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    src = official_src(path)
    if src not in sys.path:
        sys.path.insert(0, src)
    stand_in = types.ModuleType("utils")
    stand_in.torch, stand_in.nn, stand_in.F, stand_in.np = torch, nn, F, np
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    stand_in.unnorm = lambda img: img * std[:, None, None].to(img) + mean[:, None, None].to(img)
    stand_in.__all__ = ["torch", "nn", "F", "np"]
    sys.modules["utils"] = stand_in
    return src


def build_official(args) -> types.SimpleNamespace:
    """The official `DinoFeaturizer` (random-init ViT `args.model`), `ClusterLookup` and linear
    probe as `LitUnsupervisedSegmenter` builds them, with the checkout's train_config.yml values
    (batch and res from args), on CUDA when torch sees a GPU. Torch worker only."""
    import torch
    import torch.nn as nn
    import yaml

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    src = import_official(args.official)
    import dino.vision_transformer as vits  # noqa: E402  (official)
    import modules  # noqa: E402  (official src/modules.py)

    with open(os.path.join(src, "configs", "train_config.yml")) as f:
        raw = {k: _number(v) for k, v in yaml.safe_load(f).items()}
    arch, patch = ARCH[args.model]
    raw.update(model_type=arch, dino_patch_size=patch, batch_size=args.batch, res=args.res,
               pretrained_weights=None)
    cfg = types.SimpleNamespace(**raw)
    n_classes = 27
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    def random_state_dict(url, *a, **k):
        return vits.__dict__[arch](patch_size=patch, num_classes=0).state_dict()

    patches = [mock_attr(torch.hub, "load_state_dict_from_url", random_state_dict)]
    if dev.type == "cpu":  # DinoFeaturizer.__init__ calls .cuda() unconditionally
        patches.append(mock_attr(nn.Module, "cuda", lambda self, *a, **k: self))
    try:
        net = modules.DinoFeaturizer(cfg.dim, cfg)
    finally:
        for undo in patches:
            undo()
    cluster_probe = modules.ClusterLookup(net.dim, n_classes + cfg.extra_clusters)
    linear_probe = nn.Conv2d(net.dim, n_classes, (1, 1))
    for m in (net, cluster_probe, linear_probe):
        m.to(dev)
    return types.SimpleNamespace(net=net, cluster_probe=cluster_probe, linear_probe=linear_probe,
                                 cfg=cfg, raw=raw, dev=dev, n_classes=n_classes, modules=modules)


def torch_device_info(dev) -> dict:
    """Peak memory and device name of the torch worker (CUDA allocator peak, else max RSS)."""
    import torch

    if dev.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                "peak_memory_kind": "torch max_memory_allocated",
                "torch_device": torch.cuda.get_device_name(0)}
    return {"peak_memory_mb": common.host_peak_rss_mb(), "peak_memory_kind": "process max RSS",
            "torch_device": "cpu"}


def torch_worker(args) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    parts = build_official(args)
    net, cluster_probe, linear_probe = parts.net, parts.cluster_probe, parts.linear_probe
    cfg, raw, dev, n_classes = parts.cfg, parts.raw, parts.dev, parts.n_classes
    loss_fn = parts.modules.ContrastiveCorrelationLoss(cfg)
    for m in (net, cluster_probe, linear_probe, loss_fn):
        m.to(dev).train()
    net_optim = torch.optim.Adam(list(net.parameters()), lr=cfg.lr)
    linear_optim = torch.optim.Adam(list(linear_probe.parameters()), lr=5e-3)
    cluster_optim = torch.optim.Adam(list(cluster_probe.parameters()), lr=5e-3)
    ce = nn.CrossEntropyLoss()

    g = torch.Generator().manual_seed(0)
    img = torch.randn(args.batch, 3, args.res, args.res, generator=g).to(dev)
    img_pos = torch.randn(args.batch, 3, args.res, args.res, generator=g).to(dev)
    label = torch.randint(0, n_classes, (args.batch, args.res, args.res), generator=g).to(dev)

    def step():
        for o in (net_optim, linear_optim, cluster_optim):
            o.zero_grad()
        feats, code = net(img)
        feats_pos, code_pos = net(img_pos)
        intra, _, inter, _, neg, _ = loss_fn(feats, feats_pos, None, None, code, code_pos)
        loss = cfg.correspondence_weight * (cfg.pos_inter_weight * inter.mean()
                                            + cfg.pos_intra_weight * intra.mean()
                                            + cfg.neg_inter_weight * neg.mean())
        detached = torch.clone(code.detach())
        logits = F.interpolate(linear_probe(detached), label.shape[-2:], mode="bilinear",
                               align_corners=False)
        logits = logits.permute(0, 2, 3, 1).reshape(-1, n_classes)
        flat = label.reshape(-1)
        valid = (flat >= 0) & (flat < n_classes)
        loss = loss + ce(logits[valid], flat[valid])
        cluster_loss, _ = cluster_probe(detached, None)
        loss = loss + cluster_loss
        loss.backward()
        net_optim.step()
        cluster_optim.step()
        linear_optim.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    t0 = time.perf_counter()
    first_loss = step()  # first step: allocator and kernel warm-up (PyTorch has no compile)
    first_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = common.timed(step, args.iters, max(args.warmup - 1, 0))
    return {
        "impl": "official STEGO (PyTorch)",
        "model": args.model,
        "dtype": "float32",
        "res": args.res,
        "batch": args.batch,
        "iters": args.iters,
        "images_per_s": args.batch / t["median_s"],
        "ms_per_step_median": 1e3 * t["median_s"],
        "ms_per_step_min": 1e3 * t["min_s"],
        "first_step_s": first_s,
        "first_loss": first_loss,
        **torch_device_info(dev),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loss_cfg": {k: raw[k] for k in ("pos_intra_weight", "pos_inter_weight", "neg_inter_weight",
                                          "pos_intra_shift", "pos_inter_shift", "neg_inter_shift",
                                          "feature_samples", "neg_samples", "pointwise", "dim")},
    }


def _number(v):
    """PyYAML reads '5e-4' as a string (YAML 1.1); OmegaConf, which the official code uses,
    reads it as a float."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def mock_attr(obj, name, value):
    """Set obj.name = value; returns the undo function."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    return lambda: setattr(obj, name, old)


# ------------------------------------------------------------------------------------------
# Driver (runs in the project's venv)
# ------------------------------------------------------------------------------------------

def run_official(args, model: str, script: str = __file__, extra: tuple[str, ...] = ()) -> dict:
    """One official record from `script --torch-worker` run under --torch-python."""
    cmd = [args.torch_python, os.path.abspath(script), "--torch-worker", "--official",
           args.official, "--model", model, "--batch", str(args.batch), "--res", str(args.res),
           "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--torch-threads", str(args.torch_threads), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"impl": "official STEGO (PyTorch)", "model": model, "error":
                f"rc {p.returncode}: " + " / ".join(tail)}
    return common.last_json_line(p.stdout)


def skip_reason(args) -> str | None:
    if not args.official:
        return ("no --official PATH given (a checkout of github.com/mhamilton723/STEGO, e.g. "
                "`git clone https://github.com/mhamilton723/STEGO /tmp/stego_official`)")
    try:
        official_src(args.official)
    except FileNotFoundError as e:
        return str(e)
    if not os.path.exists(args.torch_python):
        return f"--torch-python {args.torch_python} does not exist (a Python with torch, pyyaml, pillow)"
    return None


def side_by_side(args, ours, script: str = __file__, extra: tuple[str, ...] = ()
                 ) -> tuple[list[dict], str | None]:
    """For each of --models: the official record of `script --torch-worker` (unless skipped, see
    `skip_reason`), then the records of `ours(model)`, each with its ratio to the official
    images/s. Prints every record as it comes; returns (records, the skip reason or None)."""
    skipped = skip_reason(args)
    if skipped:
        print(f"official STEGO row skipped: {skipped}", flush=True)
    rows = []
    for model in args.models.split(","):
        off = None
        if not skipped:
            off = run_official(args, model, script, extra)
            print(json.dumps(off), flush=True)
            rows.append(off)
        for r in ours(model):
            if off and "error" not in off and "error" not in r:
                r["ratio_vs_official"] = r["images_per_s"] / off["images_per_s"]
            print(json.dumps(r), flush=True)
            rows.append(r)
    return rows, skipped


def markdown_table(rows: list[dict], env: dict, skipped: str | None) -> str:
    lines = [common.machine_line(env), "",
             "| model | implementation | backbone dtype | res | batch | images/s | ms/step (median) "
             "| ours / official | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['impl']} | | | | failed: {r['error'][:160]} ||||")
            continue
        ratio = r.get("ratio_vs_official")
        lines.append(
            f"| {r['model']} | {r['impl']} | {r['dtype']} | {r['res']} | {r['batch']} "
            f"| {r['images_per_s']:.2f} | {r['ms_per_step_median']:.0f} "
            f"| {'' if ratio is None else f'{ratio:.2f}x'} | {common.fmt(r['peak_memory_mb'], '.0f')} |")
    if skipped:
        lines.append(f"\nofficial row skipped: {skipped}")
    off = [r for r in rows if r.get("impl", "").startswith("official") and "error" not in r]
    if off:
        o = off[0]
        lines.append(f"\nofficial: torch {o['torch']} on {o['torch_device']} ({o['torch_threads']} "
                     f"threads), peak MB = {o['peak_memory_kind']}; ours: jax full train step "
                     f"(bench_train.py), one subprocess per row.")
    return "\n".join(lines)


def add_official_args(ap: argparse.ArgumentParser, torch_packages: str = "pyyaml, pillow") -> None:
    """The options both side-by-side scripts share: the checkout, the torch environment, models."""
    ap.add_argument("--official", default="", help="checkout of mhamilton723/STEGO (root or src/)")
    ap.add_argument("--torch-python", default="/work/torchvenv/bin/python",
                    help=f"Python of the environment with torch (+ {torch_packages})")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads for the official side (0: torch's default)")
    ap.add_argument("--models", default="vits8", help="comma list: vits8, vitb8, vits16, vitb16")
    ap.add_argument("--model", default="vits8", help=argparse.SUPPRESS)  # worker
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_official_args(ap)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="our backbone dtypes")
    common.add_shape_args(ap, quick_help="tiny check: res 64, batch 2, 2 iters")
    return common.parse_bench_args(ap, argv, out="experiments/benchmarks/official.json",
                                   quick_iters=2)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if common.ran_as_worker(args, torch_worker):
        return {}
    import bench_train

    def ours(model: str) -> list[dict]:
        rows = []
        for dtype in args.dtypes.split(","):
            rows.append(bench_train.run_isolated(model, dtype, "full", args))
            rows[-1]["impl"] = "stego_jax"
        return rows

    load_start = os.getloadavg()
    rows, skipped = side_by_side(args, ours)
    return common.finish("official_stego", args, rows,
                         lambda records, env: markdown_table(records, env, skipped), load_start,
                         skipped=skipped)


if __name__ == "__main__":
    main()
