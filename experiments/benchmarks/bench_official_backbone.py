"""Side by side: DINOv2 backbone forward, the official PyTorch model vs ours, same run.

The official side is `DinoVisionTransformer` as the torch.hub builders of a checkout of
facebookresearch/dinov2 build it (`--official PATH`: the checkout root, the directory holding
the `dinov2` package; imported at run time, nothing of it is copied here), with
`pretrained=False` (random weights, the same FLOPs), run by `--torch-python` under
`torch.inference_mode()` with `torch.set_num_threads(--threads)`; `forward_features`, i.e. all
tokens after the final norm, which is what ours returns. Without xFormers the official blocks
use `F.scaled_dot_product_attention`.

Ours: `stego_jax.models.build_backbone(dinov2_config(name))` with random parameters of the hub
shapes, jitted, float32.

Each side runs in its own worker process (so each has its own peak RSS and neither loads the
other's framework). The driver alternates them: per round, one block of --iters timed forwards
of ours, then one of the official model (the order swaps every round), so machine load falls on
both alike. images/s = batch / the median over all rounds' forwards. Peak memory is the worker's
max RSS (CPU) or the device allocator's peak (GPU).

  python experiments/benchmarks/bench_official_backbone.py --official /work/dinov2_src \
      --models dinov2_vits14,dinov2_vitb14 --res 224,322 --batch 4 --iters 5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (stdlib only: also imported by the torch worker)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------
# Workers: build and warm up, answer "time" with one block of timed forwards, "quit" with the
# final record. Each reply is one JSON line on stdout.
# ------------------------------------------------------------------------------------------

def _serve(args, fwd, record: dict) -> None:
    t0 = time.perf_counter()
    fwd()  # first call: compile (ours) or allocator warm-up (torch)
    record["first_call_s"] = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        fwd()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "time":
            t = common.timed(fwd, args.iters, 0)
            print(json.dumps({"times_s": t["times_s"]}), flush=True)
        elif cmd == "quit":
            break
    record.update(record.pop("_peak")())
    print(json.dumps(record), flush=True)


def torch_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.abspath(args.official))
    from dinov2.hub import backbones  # noqa: E402  (official)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = getattr(backbones, args.model)(pretrained=False).to(dev).eval()
    x = torch.randn(args.batch, 3, args.res, args.res, generator=torch.Generator().manual_seed(1))
    x = x.to(dev)

    def fwd():
        with torch.inference_mode():
            out = model.forward_features(x)["x_norm_patchtokens"]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    def peak():
        if dev.type == "cuda":
            return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                    "peak_memory_kind": "torch max_memory_allocated",
                    "device": torch.cuda.get_device_name(0)}
        return {"peak_memory_mb": common.host_peak_rss_mb(), "peak_memory_kind": "process max RSS",
                "device": "cpu"}

    record = {"impl": "official DINOv2 (PyTorch)", "framework": f"torch {torch.__version__}",
              "threads": torch.get_num_threads(),
              "params": sum(p.numel() for p in model.parameters()), "_peak": peak}
    _serve(args, fwd, record)


def jax_worker(args) -> None:
    import jax
    import jax.numpy as jnp

    from stego_jax.models import build_backbone
    from stego_jax.models.dinov2 import dinov2_config

    cfg = dinov2_config(args.model)
    model = build_backbone(cfg, jnp.float32)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, cfg.patch_size, cfg.patch_size, 3))
    )["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(
        treedef, [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])
    x = jax.random.normal(jax.random.key(1), (args.batch, args.res, args.res, 3), jnp.float32)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

    def fwd():
        return apply(params, x).block_until_ready()

    def peak():
        mb, kind = common.device_peak_memory_mb()
        return {"peak_memory_mb": mb, "peak_memory_kind": kind,
                "device": jax.devices()[0].device_kind}

    record = {"impl": "stego_jax", "framework": f"jax {jax.__version__}",
              "threads": args.threads, "params": sum(int(l.size) for l in leaves), "_peak": peak}
    _serve(args, fwd, record)


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------

class Worker:
    def __init__(self, cmd: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)

    def reply(self) -> dict:
        for line in self.proc.stdout:
            record = common.json_record(line)
            if record is not None:
                return record
        err = self.proc.stderr.read().strip().splitlines()[-3:]
        raise RuntimeError(f"worker exited (rc {self.proc.wait()}): " + " / ".join(err))

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> dict:
        rec = self.ask("quit")
        self.proc.stdin.close()
        self.proc.wait()
        return rec


def worker_cmd(python: str, args, model: str, res: int, flag: str) -> list[str]:
    cmd = [python, os.path.abspath(__file__), flag, "--model", model, "--res", str(res),
           "--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    if args.official:
        cmd += ["--official", args.official]
    return cmd


def compare(args, model: str, res: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    sides = {"ours": Worker(worker_cmd(sys.executable, args, model, res, "--jax-worker"), env)}
    if args.official:
        sides["official"] = Worker(worker_cmd(args.torch_python, args, model, res, "--torch-worker"))
    times: dict[str, list[float]] = {k: [] for k in sides}
    try:
        for w in sides.values():
            w.reply()  # ready
        names = list(sides)
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name] += sides[name].ask("time")["times_s"]
        finals = {name: w.close() for name, w in sides.items()}
    finally:
        for w in sides.values():
            if w.proc.poll() is None:
                w.proc.kill()
    import statistics

    rows = []
    for name, rec in finals.items():
        med = statistics.median(times[name])
        rec.update(model=model, res=res, batch=args.batch, dtype="float32",
                   tokens=None, iters=len(times[name]), rounds=args.rounds,
                   images_per_s=args.batch / med, ms_per_batch_median=1e3 * med,
                   ms_per_batch_min=1e3 * min(times[name]))
        rows.append(rec)
    if "official" in finals:
        rows[0]["ratio_vs_official"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    return rows


def tokens(model: str, res: int) -> int:
    reg = 4 if model.endswith("_reg") else 0
    return 1 + reg + (res // 14) ** 2


def markdown_table(rows: list[dict], env: dict) -> str:
    lines = [common.machine_line(env), "",
             "| model | res | tokens | batch | implementation | images/s | ms/batch (median) "
             "| ours / official | peak RSS MB | params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("ratio_vs_official")
        lines.append(
            f"| {r['model']} | {r['res']} | {r['tokens']} | {r['batch']} | {r['impl']} "
            f"({r['framework']}, {r['threads']} threads) | {r['images_per_s']:.2f} "
            f"| {r['ms_per_batch_median']:.0f} | {'' if ratio is None else f'{ratio:.2f}x'} "
            f"| {common.fmt(r['peak_memory_mb'], '.0f')} | {r['params']:,} |")
    lines.append("\nfloat32 forward (all tokens after the final norm), random weights; median of "
                 "every timed forward over the alternating rounds; peak = each worker process' "
                 "own high-water mark (includes its framework runtime).")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", default="",
                    help="checkout of facebookresearch/dinov2 (the directory holding `dinov2/`)")
    ap.add_argument("--torch-python", default="/work/torchvenv/bin/python")
    ap.add_argument("--models", default="dinov2_vits14,dinov2_vitb14")
    ap.add_argument("--res", default="224,322", help="comma list of square sizes")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5, help="timed forwards per side per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed forwards (the first compiles)")
    ap.add_argument("--threads", type=int, default=default_threads(),
                    help="torch.set_num_threads of the official side (ours: XLA's CPU pool, "
                         "one thread per available core)")
    ap.add_argument("--model", default="dinov2_vits14", help=argparse.SUPPRESS)
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jax-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny check: vits14, res 56, 1 round")
    ap.add_argument("--out", default="experiments/benchmarks/official_backbone.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.res, args.batch, args.iters, args.rounds = "dinov2_vits14", "56", 2, 2, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.torch_worker or args.jax_worker:
        args.res = int(args.res)
    if args.torch_worker:
        torch_worker(args)
        return {}
    if args.jax_worker:
        jax_worker(args)
        return {}
    if args.official and not os.path.exists(
            os.path.join(args.official, "dinov2", "hub", "backbones.py")):
        sys.exit(f"--official {args.official}: no dinov2/hub/backbones.py there")
    load_start = os.getloadavg()
    rows = []
    for model in args.models.split(","):
        for res in (int(r) for r in args.res.split(",")):
            for r in compare(args, model, res):
                r["tokens"] = tokens(model, res)
                print(json.dumps(r), flush=True)
                rows.append(r)
    return common.finish("official_backbone", args, rows, markdown_table, load_start)


if __name__ == "__main__":
    main()
