"""The reproduction scripts (experiments/reproduce_*.sh): syntax, the commands a dry run prints, and
the actionable message when the data is missing. Nothing here downloads or trains, except the
end-to-end run on a fake COCO-Stuff layout with a random tiny ViT."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stego_jax.models.vit import ViTConfig
from stego_jax.weights.convert import random_dino_state_dict

ROOT = Path(__file__).resolve().parents[1]
ZIP = "https://marhamilresearch4.blob.core.windows.net/stego-public/pytorch_data/{}.zip"

# script -> (dataset, config, prepare --crop, raw zip name, a paper number it must print)
SCRIPTS = {
    "reproduce_cocostuff27.sh": ("cocostuff27", "configs/cocostuff27_vits8.py", "five", "cocostuff", "24.5"),
    "reproduce_cityscapes27.sh": ("cityscapes27", "configs/cityscapes27_vitb8.py", "five", "cityscapes", "73.2"),
    "reproduce_potsdam3.sh": ("potsdam3", "configs/potsdam3_vits8.py", "none", "potsdam", "77.03"),
}
params = pytest.mark.parametrize("script", sorted(SCRIPTS))


def _run(script: str, tmp_path: Path, *args: str, cwd: Path | None = None, **env_extra: str):
    env = dict(os.environ, DATA_RAW=str(tmp_path / "raw"), DATA_DIR=str(tmp_path / "prepared"),
               WORKDIR=str(tmp_path / "run"), PYTHON=sys.executable)
    env.update(env_extra)
    return subprocess.run(["bash", str(ROOT / "experiments" / script), *args], cwd=cwd or tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@params
def test_bash_syntax(script):
    path = ROOT / "experiments" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in path.read_text()
    assert os.access(path, os.X_OK), f"{script} is not executable"


@params
def test_dry_run_prints_the_pipeline(script, tmp_path):
    dataset, config, crop, _, paper = SCRIPTS[script]
    assert (ROOT / config).is_file()
    p = _run(script, tmp_path, "--dry-run", "--config.batch_size=32")
    assert p.returncode == 0, p.stderr
    raw, prep, run = str(tmp_path / "raw"), str(tmp_path / "prepared"), str(tmp_path / "run")
    cmds = _commands(p.stdout)
    assert [c[2] for c in cmds] == ["stego_jax.data.prepare", "stego_jax.knn", "stego_jax.train", "stego_jax.evaluate"]
    assert all(c[:2] == [sys.executable, "-m"] for c in cmds)
    prepare, knn, train, evaluate = cmds
    assert prepare[3:] == [dataset, "--source", raw, "--out", prep, "--crop", crop] + (
        ["--ratio", "0.5"] if crop == "five" else [])
    root_flag = f"--config.data.root={prep}"
    assert knn[3:] == ["--config", config, root_flag, "--config.batch_size=32"]
    assert train[3:] == ["--config", config, "--workdir", run, root_flag, "--config.batch_size=32"]
    assert evaluate[3:] == ["--config", config, "--workdir", run, root_flag, "--config.batch_size=32"]
    # Nothing ran: no directories were created.
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "run").exists()
    # The paper's numbers are printed beside ours.
    assert "the paper's numbers" in p.stdout and paper in p.stdout


@params
def test_dry_run_skips_prepare_when_prepared(script, tmp_path):
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "manifest.json").write_text("{}")
    p = _run(script, tmp_path, "--dry-run")
    assert p.returncode == 0, p.stderr
    assert [c[2] for c in _commands(p.stdout)] == ["stego_jax.knn", "stego_jax.train", "stego_jax.evaluate"]
    assert "prepared data found" in p.stdout


def test_relative_paths_are_taken_from_the_callers_directory(tmp_path):
    p = _run("reproduce_cocostuff27.sh", tmp_path, "--dry-run", DATA_RAW="r", DATA_DIR="d", WORKDIR="w")
    assert p.returncode == 0, p.stderr
    prepare, _, train, _ = _commands(p.stdout)
    assert prepare[prepare.index("--source") + 1] == str(tmp_path / "r")
    assert train[train.index("--workdir") + 1] == str(tmp_path / "w")


@params
def test_missing_data_says_what_to_download(script, tmp_path):
    _, _, _, zipname, _ = SCRIPTS[script]
    p = _run(script, tmp_path)
    assert p.returncode != 0
    assert "raw data not found" in p.stderr
    assert str(tmp_path / "raw") in p.stderr  # the missing paths
    assert ZIP.format(zipname) in p.stderr  # where to get them
    if script == "reproduce_cityscapes27.sh":
        assert "cityscapes-dataset.com" in p.stderr
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "run").exists()


@params
def test_unknown_argument_is_refused(script, tmp_path):
    p = _run(script, tmp_path, "--dryrun")
    assert p.returncode == 2 and "unknown argument" in p.stderr


def test_printed_prepare_command_parses(tmp_path):
    """The dry run's prepare flags are ones the CLI accepts: with a missing source it fails on the data
    (a message naming the download), not with an argparse usage error."""
    p = _run("reproduce_cocostuff27.sh", tmp_path, "--dry-run")
    prepare = _commands(p.stdout)[0]
    q = subprocess.run(prepare, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert q.returncode == 2
    assert "usage:" not in q.stderr and ZIP.format("cocostuff") in q.stderr


# ---------------------------------------------------------------------------------------------
# Opt-in: the whole script on a fake COCO-Stuff layout (about 1-3 min on a 2-core CPU).
# ---------------------------------------------------------------------------------------------

def _fake_cocostuff(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n, lst in (("train2017", 6, "Coco164kFull_Stuff_Coarse.txt"),
                          ("val2017", 4, "Coco164kFull_Stuff_Coarse_7.txt")):
        ids = [f"{i:012d}" for i in range(n)]
        for d in ("images", "annotations", "curated"):
            (root / d / split).mkdir(parents=True)
        for i in ids:
            img = rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"{i}.jpg")
            lab = rng.choice([0, 93, 105, 170, 255], (80, 96)).astype(np.uint8)
            Image.fromarray(lab).save(root / "annotations" / split / f"{i}.png")
        (root / "curated" / split / lst).write_text("\n".join(ids) + "\n")


def _random_dino(path: Path, dim: int = 64) -> None:
    """A random one-block ViT/8 in the official DINO key layout (64 wide: one head of DINO's 64)."""
    cfg = ViTConfig(patch_size=8, embed_dim=dim, depth=1, num_heads=1, img_size=32)
    np.savez(path, **random_dino_state_dict(cfg, scale=0.05))


@pytest.mark.slow
def test_end_to_end_on_fake_cocostuff(tmp_path):
    _fake_cocostuff(tmp_path / "raw")
    _random_dino(tmp_path / "vit.npz")
    small = ["--config.model.backbone=" + str(tmp_path / "vit.npz"), "--config.num_steps=2", "--config.batch_size=4",
             "--config.data.res=32", "--config.eval.res=32", "--config.log_every=1", "--config.eval_every=2",
             "--config.checkpoint_every=2", "--config.eval.batch_size=2", "--config.data.num_workers=1",
             "--config.knn.k=3", "--config.knn.num_neighbors=2"]
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    p = subprocess.run(["bash", str(ROOT / "experiments" / "reproduce_cocostuff27.sh"), *small], cwd=tmp_path,
                       env=dict(os.environ, DATA_RAW=str(tmp_path / "raw"), DATA_DIR=str(tmp_path / "prepared"),
                                WORKDIR=str(tmp_path / "run"), PYTHON=sys.executable, **env),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "prepared" / "manifest.json").exists()
    assert "| cluster+crf |" in (tmp_path / "run" / "results.md").read_text()
    assert "== ours" in p.stdout and "56.93" in p.stdout
    shutil.rmtree(tmp_path / "raw")
