"""The offline demo end to end (shortened): it must beat the trivial and colour k-means baselines."""

import json
import os

import jax

from stego_jax import demo
from stego_jax.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_tiny_beats_baselines(tmp_path):
    config = load_config_file(os.path.join(ROOT, "configs", "demo.py"), "tiny")
    # `make demo` on a CPU host sees one device; the suite's 8 simulated devices on one thread
    # would make this 3x slower for the same numbers (sharded steps are tested in test_train).
    out = demo.run(config, str(tmp_path), seeds=1, devices=jax.devices()[:1])
    base = out["baselines"]
    stego = out["seeds"][0]
    trivial = base["trivial (one class)"]["mIoU"]
    colour = base["k-means on RGB pixels"]["mIoU"]
    # STEGO's unsupervised result (the cluster probe) beats both label-free baselines clearly
    assert stego["cluster"]["mIoU"] > max(trivial, colour) + 5, (stego["cluster"], base)
    assert 0 < stego["kmeans"]["mIoU"] <= 100
    # the supervised linear probe on the learned codes is far above every unsupervised number
    assert stego["linear"]["mIoU"] > stego["cluster"]["mIoU"]
    text = open(tmp_path / "results.md").read()
    assert "NOT a learned backbone" in text and "baseline: trivial" in text
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["seeds"][0]["cluster"]["mIoU"] == stego["cluster"]["mIoU"]
    assert len(os.listdir(tmp_path / "seed0" / "overlays")) == config.eval.num_overlays
