"""The benchmark scripts keep working as the package changes: each imports, and the train-step
benchmark runs its tiny profile (random weights of the named ViT, one row) end to end."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "experiments", "benchmarks")
SCRIPTS = sorted(f[:-3] for f in os.listdir(BENCH) if f.startswith(("bench_", "run_all", "common")) and
                 f.endswith(".py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    module = importlib.import_module(name)
    assert module.__doc__, f"{name}.py has no docstring saying what it measures"


def test_train_benchmark_tiny_profile_runs(tmp_path):
    out = tmp_path / "train.json"
    # One CPU device, as on a plain machine (the suite simulates 8, and the tiny batch is 2).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train.py"), "--quick", "--models", "vits8",
                        "--modes", "head", "--dtypes", "float32", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    records = json.load(open(out))["records"]
    assert len(records) == 1 and "error" not in records[0], records
    assert records[0]["images_per_s"] > 0


def test_backbone_benchmarks_take_dinov2_names(tmp_path):
    """bench_backbone.py with a DINOv2 name, and bench_official_backbone.py's worker protocol
    (ours only: no official checkout in the test environment), each one tiny row."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "backbone.json"
    p = subprocess.run([sys.executable, os.path.join(BENCH, "bench_backbone.py"), "--models",
                        "dinov2_vits14_reg", "--res", "28", "--dtypes", "float32", "--batch", "1",
                        "--iters", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = json.load(open(out))["records"]
    assert rec["tokens"] == 1 + 4 + 4 and rec["params"] == 22_057_728 and rec["images_per_s"] > 0
    out = tmp_path / "official_backbone.json"
    p = subprocess.run([sys.executable, os.path.join(BENCH, "bench_official_backbone.py"),
                        "--quick", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = json.load(open(out))["records"]
    assert rec["impl"] == "stego_jax" and rec["tokens"] == 1 + 4 * 4 and rec["images_per_s"] > 0
