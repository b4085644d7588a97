"""A non-editable install works on its own: the built wheel, installed into a scratch folder,
runs a tiny demo from an unrelated working directory with the configs shipped inside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import setuptools  # noqa: F401  (the wheel is built with setuptools' PEP 517 backend)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_copy(dest: str) -> str:
    """The tracked and untracked-but-not-ignored files of the checkout (what a fresh clone has)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split("\n")
    for f in filter(None, files):
        src = os.path.join(ROOT, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, f))
    return dest


def test_wheel_installs_and_runs_the_demo_from_any_folder(tmp_path):
    src = _source_copy(str(tmp_path / "src"))
    dist = tmp_path / "dist"
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_wheel(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", build, str(dist)], cwd=src, check=True, capture_output=True,
                         text=True)
    wheel = dist / out.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    assert "stego_jax/configs/demo.py" in names and "stego_jax/cli.py" in names
    assert not any(n.startswith(("tests/", "experiments/")) for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    # The installed copy, not the checkout, must be the one imported.
    where = subprocess.run([sys.executable, "-c", "import stego_jax.demo as d; print(d.__file__)"], cwd=elsewhere,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(site)), where

    tiny = ["--config.num_steps=6", "--config.data.n_train=64", "--config.data.n_val=16",
            "--config.log_every=3", "--config.eval_every=6", "--config.checkpoint_every=6",
            "--config.eval.batch_size=16", "--config.eval.kmeans_restarts=1", "--config.eval.num_overlays=1",
            "--seeds=1", "--workdir=demo_run"]
    run = subprocess.run([sys.executable, "-m", "stego_jax.demo", *tiny], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.load(open(elsewhere / "demo_run" / "results.json"))
    assert set(results["seeds"][0]) >= {"cluster", "linear", "kmeans"}
    assert "| STEGO cluster probe |" in (elsewhere / "demo_run" / "results.md").read_text()

    bad = subprocess.run([sys.executable, "-m", "stego_jax.demo", "--seeds=0"], cwd=elsewhere, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--seeds=0" in bad.stderr and "Traceback" not in bad.stderr
