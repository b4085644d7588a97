"""Run every benchmark, collect their JSON and rewrite the generated part of RESULTS.md.

Each benchmark runs as its own subprocess (a fresh process per benchmark: clean peak-memory
figures, one failure does not stop the others): backbone, train, feature cache
(bench_feature_cache.py, if present), eval, crf (bench_crf.py, if present), knn (a k-NN table
with stego_jax.knn.knn_table on random descriptors) and, with --official PATH, the side-by-side
runs against the official PyTorch STEGO: train step (official) and evaluation with CRF
(official_eval). Only the text between the markers
`<!-- BEGIN GENERATED -->` and `<!-- END GENERATED -->` of RESULTS.md is replaced.

  python experiments/benchmarks/run_all.py                      # paper settings (slow on CPU)
  python experiments/benchmarks/run_all.py --quick              # tiny shapes: checks everything
  python experiments/benchmarks/run_all.py --official /tmp/stego_official --only train,official
  python experiments/benchmarks/run_all.py --cpu --official /tmp/stego_official --only official_eval
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import common  # noqa: E402

BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"

RESULTS_HEADER = f"""# Benchmarks

Throughput and memory of stego_jax (and, side by side, of the official PyTorch STEGO).
Regenerate everything with

    python experiments/benchmarks/run_all.py [--official /path/to/STEGO] [--quick]

(`experiments/benchmarks/README.md` says what each script measures). Every figure carries the
machine it was measured on: device kind, CPU model (/proc/cpuinfo), core count, load average at
the start and end of the run, jax version and date. Figures from a loaded machine (load average
above the core count) are not comparable with others. Notes written by hand go outside the
generated block, which `run_all.py` rewrites.

{BEGIN}
(not generated yet: run `python experiments/benchmarks/run_all.py`)
{END}
"""


# A profile a 2-core CPU finishes in about 20 minutes: paper resolution and batch for the train
# step (the figure the official comparison needs), fewer iterations and smaller batches elsewhere.
CPU_PROFILE = {
    "backbone": ["--models", "vits8,vitb8", "--res", "224", "--dtypes", "float32,bfloat16",
                 "--batch", "4", "--iters", "3", "--warmup", "1"],
    "train": ["--models", "vits8,vitb8", "--dtypes", "float32", "--batch", "16", "--res", "224",
              "--iters", "2", "--warmup", "1"],
    "eval": ["--models", "vits8", "--res", "320", "--batch", "4", "--iters", "2", "--warmup", "1"],
    "official": ["--models", "vits8", "--dtypes", "float32", "--batch", "16", "--res", "224",
                 "--iters", "2", "--warmup", "1"],
    "official_eval": ["--models", "vits8", "--res", "320", "--batch", "4", "--iters", "2",
                      "--warmup", "1"],
    "feature_cache": ["--model", "vits8", "--res", "224", "--batch", "16", "--steps", "6",
                      "--log-every", "2", "--n-train", "64"],
    "crf": ["--repeats", "3", "--batch", "2", "--spatial", "lattice", "conv"],
    "knn": [],
}


def script_args(name: str, quick: bool, args) -> list[str] | None:
    """Command-line arguments of one benchmark (None: the script is absent)."""
    if getattr(args, "cpu", False) and not quick:
        if name in ("official", "official_eval"):
            if not args.official:
                return None
            return ["--official", args.official, "--torch-python", args.torch_python] + CPU_PROFILE[name]
        if name in ("feature_cache", "crf") and not os.path.exists(os.path.join(HERE, f"bench_{name}.py")):
            return None
        if name == "knn":
            return ["--knn-worker"]
        return list(CPU_PROFILE[name])
    if name == "backbone":
        return (["--models", "vits8", "--res", "64", "--dtypes", "float32", "--batch", "2",
                 "--iters", "2"] if quick else
                ["--models", "vits8,vitb8", "--res", "224,320", "--dtypes", "float32,bfloat16",
                 "--batch", "16", "--iters", "10", "--warmup", "2"])
    if name == "train":
        return ["--quick"] if quick else ["--iters", "10", "--warmup", "2"]
    if name == "eval":
        return ["--quick"] if quick else []
    if name == "official":
        if not args.official:
            return None
        return ["--official", args.official, "--torch-python", args.torch_python] + (
            ["--quick"] if quick else ["--models", "vits8,vitb8", "--iters", "10", "--warmup", "2"])
    if name == "official_eval":  # batch 16: the official eval loader's (2 x eval_config batch_size)
        if not args.official:
            return None
        return ["--official", args.official, "--torch-python", args.torch_python] + (
            ["--quick"] if quick else ["--models", "vits8,vitb8", "--batch", "16", "--iters", "5",
                                       "--warmup", "1"])
    if name in ("feature_cache", "crf"):
        path = os.path.join(HERE, f"bench_{name}.py")
        if not os.path.exists(path):
            return None
        if not quick:
            return []
        # The colleague's script: pass --quick only if it has one.
        h = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, cwd=REPO)
        return ["--quick"] if "--quick" in h.stdout else []
    if name == "knn":
        return ["--knn-worker"] + (["--knn-n", "5000"] if quick else [])
    raise ValueError(name)


SCRIPTS = {"backbone": "bench_backbone.py", "train": "bench_train.py",
           "feature_cache": "bench_feature_cache.py", "eval": "bench_eval.py",
           "crf": "bench_crf.py", "knn": "run_all.py", "official": "bench_official_stego.py",
           "official_eval": "bench_official_eval.py"}
ORDER = ["backbone", "train", "feature_cache", "eval", "crf", "knn", "official", "official_eval"]


def run_one(name: str, extra: list[str], out: str, timeout: float | None) -> dict:
    cmd = [sys.executable, os.path.join(HERE, SCRIPTS[name])] + extra + ["--out", out]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    shown = " ".join(shlex.quote(os.path.relpath(c, REPO) if c.startswith(REPO) else c)
                     for c in ["python"] + cmd[1:])
    print(f"== {name}: {shown}", flush=True)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    if os.path.exists(out):
        os.remove(out)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", e.stdout or "", f"timed out after {timeout} s"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    wall = time.perf_counter() - t0
    res = {"name": name, "command": shown, "rc": rc, "wall_s": wall,
           "machine": common.machine(load0)}
    if rc == 0 and os.path.exists(out):
        with open(out) as f:
            res["payload"] = json.load(f)
        print(payload_table(res["payload"]), flush=True)
    else:
        res["error"] = ((stderr or "") + (stdout or ""))[-1500:]
        print(f"   FAILED ({rc}):\n{res['error']}", flush=True)
    return res


def payload_table(payload) -> str:
    """A benchmark's markdown table: its own `table`, else one built from its records (a list of
    flat dicts, or the scalar fields of a dict)."""
    if isinstance(payload, dict) and payload.get("table"):
        return payload["table"]
    records = payload if isinstance(payload, list) else [
        {k: v for k, v in payload.items() if k not in ("machine", "args", "env")}]
    records = [r for r in records if isinstance(r, dict)]
    if not records:
        return "(no table in the JSON output)"
    keys = list(dict.fromkeys(k for r in records for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, dict)):
            return json.dumps(v, default=str)[:120]
        return str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in records]
    return "\n".join(lines)


def render(results: list[dict], skipped: dict, quick: bool, cpu: bool = False) -> str:
    flag = " --quick" if quick else (" --cpu" if cpu else "")
    lines = [f"_Generated by `experiments/benchmarks/run_all.py{flag}` on "
             f"{common.machine()['date']}._", ""]
    if quick:
        lines += ["**Quick mode: tiny shapes that only check the scripts; these are not benchmark "
                  "figures.**", ""]
    for r in results:
        wall = f" ({r['wall_s']:.0f} s wall)" if r["wall_s"] else ""
        lines += [f"### {r['name']}", "", f"`{r['command']}`{wall}", ""]
        payload = r.get("payload", {})
        env = payload.get("env", {}) if isinstance(payload, dict) else {}
        if "cpu_model" not in env:
            # the script's own table does not name the CPU model: add run_all's description
            lines += [common.machine_line(r["machine"]), ""]
        if "payload" in r:
            lines += [payload_table(payload), ""]
        else:
            lines += [f"FAILED (rc {r['rc']}):", "", "```", r["error"].strip()[-800:], "```", ""]
    for name, why in skipped.items():
        lines += [f"### {name}", "", f"skipped: {why}", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_results(path: str, generated: str) -> None:
    if os.path.exists(path):
        text = open(path).read()
    else:
        text = RESULTS_HEADER
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{path} lacks the markers {BEGIN} ... {END}; add them where the "
                         "generated block should go")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + generated + END + tail)


# ------------------------------------------------------------------------------------------
# knn: a k-NN table on random descriptors (run as `run_all.py --knn-worker`)
# ------------------------------------------------------------------------------------------

def knn_worker(args) -> None:
    import jax
    import numpy as np

    from stego_jax.knn import knn_table

    load0 = os.getloadavg()
    desc = np.random.default_rng(0).standard_normal((args.knn_n, args.knn_dim)).astype(np.float32)
    t0 = time.perf_counter()
    table = knn_table(desc, k=args.knn_k)  # includes the compile of the chunk kernel
    first = time.perf_counter() - t0
    t = common.timed(lambda: knn_table(desc, k=args.knn_k), args.knn_iters, 0)
    ok = bool((table[:, 0] == np.arange(args.knn_n)).mean() > 0.99)
    rec = {"n": args.knn_n, "dim": args.knn_dim, "k": args.knn_k, "first_call_s": first,
           "s_median": t["median_s"], "queries_per_s": args.knn_n / t["median_s"],
           "self_first": ok, "n_devices": jax.device_count()}
    env = common.machine(load0)
    table_md = "\n".join([
        common.machine_line(env), "",
        "| N | dim | k | s per call (median) | queries/s | first call s | devices |",
        "|---|---|---|---|---|---|---|",
        f"| {rec['n']} | {rec['dim']} | {rec['k']} | {rec['s_median']:.2f} "
        f"| {rec['queries_per_s']:.0f} | {first:.2f} | {rec['n_devices']} |",
        "", "stego_jax.knn.knn_table (exact cosine top-k, chunked) on random float32 descriptors. "
        "The top-k program is compiled once per shape; with --knn-iters 1 the timed call includes that compile."])
    print(table_md)
    common.write_json(args.out, {"benchmark": "knn", "env": env, "records": [rec],
                                 "table": table_md})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks that all scripts run")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite RESULTS.md from the JSON files already in --json-dir")
    ap.add_argument("--cpu", action="store_true",
                    help="the moderate profile a 2-core CPU finishes in ~20 min (paper batch/res for the train step)")
    ap.add_argument("--only", default="", help=f"comma list among {','.join(ORDER)}")
    ap.add_argument("--official", default="", help="checkout of mhamilton723/STEGO for the side-by-side")
    ap.add_argument("--torch-python", default="/work/torchvenv/bin/python")
    ap.add_argument("--json-dir", default=os.path.join(HERE, "results"),
                    help="where each benchmark's JSON goes")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--timeout", type=float, default=0, help="per benchmark, seconds (0: none)")
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--knn-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--knn-n", type=int, default=50_000)
    ap.add_argument("--knn-dim", type=int, default=384)
    ap.add_argument("--knn-k", type=int, default=30)
    ap.add_argument("--knn-iters", type=int, default=1)
    args = ap.parse_args(argv)
    if args.knn_worker:
        knn_worker(args)
        return

    def stored(name: str) -> dict | None:
        """The record of an earlier run of `name` from its JSON file (None: there is none)."""
        path = os.path.join(args.json_dir, f"{name}.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            payload = json.load(f)
        machine = payload.get("machine") if isinstance(payload, dict) else None
        return {"name": name, "command": f"see {os.path.relpath(path, REPO)}", "rc": 0,
                "wall_s": 0.0, "machine": machine or common.machine(), "payload": payload}

    if args.render_only:  # rebuild RESULTS.md from the JSON files of earlier runs
        results = [r for r in map(stored, ORDER) if r is not None]
        write_results(args.results, render(results, {}, False, args.cpu))
        print(f"wrote {args.results} from {len(results)} JSON files in {args.json_dir}")
        return

    names = [n for n in ORDER if not args.only or n in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(ORDER) if args.only else set()
    if unknown:
        ap.error(f"unknown --only entries {sorted(unknown)}; choose among {ORDER}")
    os.makedirs(args.json_dir, exist_ok=True)
    results, skipped = [], {}
    suffix = "_quick" if args.quick else ""
    for name in names:
        extra = script_args(name, args.quick, args)
        if extra is None:
            skipped[name] = ("no --official PATH given" if name.startswith("official")
                             else f"experiments/benchmarks/{SCRIPTS[name]} does not exist")
            print(f"== {name}: skipped ({skipped[name]})", flush=True)
            continue
        out = os.path.join(args.json_dir, f"{name}{suffix}.json")
        results.append(run_one(name, extra, out, args.timeout or None))
    if not args.quick:  # --only: the benchmarks not rerun keep their earlier figures
        ran = {r["name"]: r for r in results}
        results = [r for r in (ran.get(n) or stored(n) for n in ORDER) if r is not None]
    write_results(args.results, render(results, skipped, args.quick, args.cpu))
    print(f"wrote {args.results}; JSON in {args.json_dir}")
    failed = [r["name"] for r in results if "payload" not in r]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
