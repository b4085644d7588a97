"""Shared helpers of the benchmark scripts: machine description, peak FLOP/s table, timing,
memory and JSON/markdown output. Only the standard library at import time, so the PyTorch side
of bench_official_stego.py (a separate environment without jax) can import it too.

Every figure a benchmark prints carries the machine it was measured on (`machine()`): device
kind, CPU model, core count, load average at start and end, jax version, date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable

# Peak dense FLOP/s per device, (bf16, fp32) in TFLOP/s, by a substring of `device_kind`
# (first match wins, so more specific names come first). fp32 is the peak of the unit XLA
# uses for float32 matmuls at JAX's default precision: TF32 tensor cores on NVIDIA Ampere and
# later, one bf16 pass on TPU (so the bf16 peak). Vendor datasheet figures, no sparsity.
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.5),  # SXM / "H100 80GB HBM3"
    ("H200", 989.0, 494.5),
    ("A100", 312.0, 156.0),
    ("TPU v6", 918.0, 918.0),  # v6e ("TPU v6 lite")
    ("TPU v5 lite", 197.0, 197.0),  # v5e
    ("TPU v5e", 197.0, 197.0),
    ("TPU v5p", 459.0, 459.0),
    ("TPU v5", 459.0, 459.0),
    ("TPU v4", 275.0, 275.0),
]


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Peak dense TFLOP/s of one device of this kind for `dtype` ('bfloat16'/'float32'); None
    when unknown (CPU, or a device not in the table)."""
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(load_start: tuple[float, float, float] | None = None, **extra: Any) -> dict:
    """The machine a figure was measured on. Imports jax lazily (absent in the torch venv)."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(load_start) if load_start else None,
        "loadavg": list(os.getloadavg()),
        "host": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import jax

        d = jax.devices()[0]
        env.update(jax=jax.__version__, platform=d.platform, device_kind=d.device_kind,
                   n_devices=jax.device_count())
    except ImportError:
        pass
    env.update(extra)
    return env


def fmt_load(avg) -> str:
    return "-" if not avg else "/".join(f"{a:.2f}" for a in avg)


def machine_line(env: dict) -> str:
    """One markdown line describing `machine()`'s dict."""
    dev = env.get("device_kind", "?")
    if env.get("platform"):
        dev = f"{dev} ({env['platform']}, {env.get('n_devices', 1)} device(s))"
    return (f"machine: {dev}; CPU {env.get('cpu_model')} x{env.get('cpu_count')}; load avg "
            f"(1/5/15 min) {fmt_load(env.get('loadavg_start'))} at start, "
            f"{fmt_load(env.get('loadavg'))} at end; jax {env.get('jax', '-')}; {env.get('date')}")


def timed(fn: Callable[[], Any], iters: int, warmup: int) -> dict:
    """Run `fn` (which must block until its work is done) `warmup` then `iters` times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def host_peak_rss_mb() -> float:
    """Process high-water RSS (Linux: KiB) in MiB; cumulative over the process life."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_memory_mb() -> tuple[float, str]:
    """Peak device memory of the first device (GPU/TPU), else the process max RSS (CPU)."""
    import jax

    d = jax.devices()[0]
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
    return host_peak_rss_mb(), "process max RSS"


def compiled_flops(compiled) -> float | None:
    """XLA cost-analysis FLOPs of a compiled (partitioned, per-device) program."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    f = float(cost.get("flops", 0.0)) if cost else 0.0
    return f or None


def compiled_buffers_mb(compiled) -> float | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    return (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20


def fmt(v: Any, spec: str) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    return format(v, spec)


def write_json(path: str, payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


# What --quick sets, with a per-script --iters: tiny shapes that only check that a script runs.
QUICK_SHAPE: dict[str, Any] = {"models": "vits8", "res": 64, "batch": 2, "warmup": 1}


def add_shape_args(ap: argparse.ArgumentParser, *, quick_help: str, batch: int = 16,
                   res: int = 224, iters: int = 5, batch_help: str | None = None,
                   res_help: str | None = None, iters_help: str | None = None) -> None:
    """--batch, --res, --iters, --warmup and --quick of a step benchmark (`parse_bench_args`
    applies --quick)."""
    ap.add_argument("--batch", type=int, default=batch, help=batch_help)
    ap.add_argument("--res", type=int, default=res, help=res_help)
    ap.add_argument("--iters", type=int, default=iters, help=iters_help)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help=quick_help)


def parse_bench_args(ap: argparse.ArgumentParser, argv: list[str] | None, *, out: str,
                     quick_iters: int) -> argparse.Namespace:
    """Add --out (default `out`) and parse; --quick replaces --models and the shape options by
    QUICK_SHAPE and --iters by `quick_iters`."""
    ap.add_argument("--out", default=out)
    args = ap.parse_args(argv)
    if args.quick:
        for name, value in {**QUICK_SHAPE, "iters": quick_iters}.items():
            setattr(args, name, value)
    return args


def finish(benchmark: str, args: argparse.Namespace, records: list[dict],
           table: Callable[[list[dict], dict], str], load_start: tuple[float, float, float],
           **extra: Any) -> dict:
    """Print `table(records, env)` and write {benchmark, env, args, records, **extra, table} to
    `args.out`; return that payload."""
    env = machine(load_start)
    text = table(records, env)
    print(text)
    payload = {"benchmark": benchmark, "env": env, "args": vars(args), "records": records, **extra,
               "table": text}
    write_json(args.out, payload)
    return payload


def ran_as_worker(args: argparse.Namespace, worker: Callable[[argparse.Namespace], dict]) -> bool:
    """In the official side's subprocess (`--torch-worker`): run `worker(args)`, print its JSON
    record on the last line for `last_json_line`, and return True (the caller returns)."""
    if not getattr(args, "torch_worker", False):
        return False
    print(json.dumps(worker(args)), flush=True)
    return True


def json_record(line: str) -> dict | None:
    """A worker's output line as its JSON record, None for any other line (logs, warnings)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def last_json_line(text: str) -> dict:
    """The last line of `text` that parses as a JSON object (worker subprocess output)."""
    for line in reversed(text.strip().splitlines()):
        record = json_record(line)
        if record is not None:
            return record
    raise ValueError("no JSON record in the worker output:\n" + text[-2000:])
