"""DINOv2 (with registers) and DINOv3 (with storage tokens) backbones through the whole STEGO
pipeline, each with a random-weight checkpoint written by the official code
(tests/fixtures/make_dinov{2,3}_fixtures.py): the k-NN table, the on-disk feature cache written by
`python -m stego_jax.feature_cache`, training from that cache, evaluation, and prediction on images
of sizes that are not multiples of the patch; also, for each family, the backbone computing in
bfloat16 and the featurizer's patch grid.

The cached features are checked against the backbone run by hand (ImageNet normalisation, the
prefix tokens -- CLS and the four register/storage tokens -- dropped), so a cache holding a
register token or a shifted grid fails here."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from stego_jax import evaluate, feature_cache, knn, predict, train
from stego_jax.data import build_dataset
from stego_jax.featurizers import build_featurizer
from stego_jax.models import build_backbone, patch_feature_map
from stego_jax.weights import load_backbone

from .fixtures.fixture_inputs import fixed_input
from .test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"

# name: (checkpoint, patch, heads (None: read from the file), image side giving a 3x3 grid)
BACKBONES = {
    "dinov2_reg": ("dinov2_swiglu_reg.pth", 14, 2, 42),
    "dinov3": ("dinov3_swiglu.pth", 16, None, 48),
}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet, as the official transforms
STD = np.array([0.229, 0.224, 0.225], np.float32)
PREFIX = 1 + 4  # CLS + 4 registers (DINOv2 _reg) / 4 storage tokens (DINOv3)


def _overrides(name: str, tmp: Path) -> dict:
    ckpt, patch, heads, side = BACKBONES[name]
    return {
        "model.featurizer": "dino", "model.backbone": str(FIX / ckpt), "model.num_heads": heads or 0,
        "model.patch_size": patch, "model.dim": 8, "num_steps": 4, "batch_size": 8,
        "data.n_train": 24, "data.n_val": 8, "data.size": side, "data.res": side,
        "eval.res": side, "eval.batch_size": 8, "eval.kmeans_restarts": 2, "eval.num_overlays": 2,
        "loss.feature_samples": 3, "loss.neg_samples": 2, "knn.k": 4, "knn.num_neighbors": 2,
        "knn.dir": str(tmp / "nns"), "log_every": 2, "eval_every": 2, "checkpoint_every": 2,
        "feature_cache.enabled": True, "feature_cache.dir": str(tmp / "cache"),
        "feature_cache.dtype": "float32",
    }


def _tokens(ckpt: str, heads, x: np.ndarray, dtype=jnp.float32):
    """(architecture, all output tokens of the backbone in `ckpt` (a fixture name) on images `x`)."""
    cfg, params = load_backbone(FIX / ckpt, num_heads=heads or None)
    model = build_backbone(cfg, dtype=dtype)
    return cfg, np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(x)))


def _by_hand(ckpt: str, heads, images: np.ndarray, patch: int) -> np.ndarray:
    """Patch features of uint8 images computed directly from the backbone's tokens."""
    _, tokens = _tokens(ckpt, heads, (images.astype(np.float32) / 255.0 - MEAN) / STD)
    h, w = images.shape[1] // patch, images.shape[2] // patch
    assert tokens.shape[1] == PREFIX + h * w
    return tokens[:, PREFIX:].reshape(len(images), h, w, -1)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_pipeline_on_a_random_modern_backbone(name, tmp_path):
    ckpt, patch, heads, side = BACKBONES[name]
    ov = _overrides(name, tmp_path)
    config = tiny_config(**ov)  # the demo config with these fields set

    # k-NN table, then the feature cache through its command line.
    assert knn.run(config)
    argv = ["--config", str(ROOT / "configs" / "demo.py")] + [
        f"--config.{k}={v}" for k, v in ov.items()]
    assert feature_cache.main(argv) == 0
    cache = feature_cache.FeatureCache(str(tmp_path / "cache"))
    train_ds = build_dataset(config, "train")
    assert cache.n == len(train_ds) == 24
    assert cache.feature_shape == (3, 3, load_backbone(str(FIX / ckpt), num_heads=heads)[0].embed_dim)
    rows = np.array([0, 5, 23])
    images = np.stack([train_ds[int(i)]["image"] for i in rows])
    np.testing.assert_allclose(cache.features(rows), _by_hand(ckpt, heads, images, patch),
                               rtol=1e-5, atol=1e-5)

    # Training reads that cache (the manifest's fingerprint is checked against the config).
    workdir = tmp_path / "run"
    out = train.train_and_evaluate(config, str(workdir))
    assert out["step"] == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out["params"]))
    assert json.loads((workdir / "config.json").read_text())["model"]["backbone"] == str(FIX / ckpt)

    # Evaluation of the finished run (its config.json), k-means included.
    res = evaluate.evaluate(None, str(workdir), quiet=True)
    for probe in ("cluster", "linear", "kmeans"):
        assert 0.0 <= res[probe]["mIoU"] <= 100.0, (probe, res[probe])
    assert (workdir / "results.md").exists()

    # Prediction on images whose sides are not multiples of the patch (resized to a working size
    # that is), written at their own size; `segment` on an image of the working size.
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"wide.png": (side - 5, 2 * side + 3), "tall.jpg": (side + 7, side - 3)}
    for fname, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_dir / fname)
    summary = predict.predict_folder(str(workdir), str(img_dir), str(tmp_path / "pred"), crf=False,
                                     quiet=True)
    assert not summary["failed"] and len(summary["written"]) == 2
    for fname, (h, w) in sizes.items():
        label = np.asarray(Image.open(tmp_path / "pred" / "labels" / (Path(fname).stem + ".png")))
        assert label.shape == (h, w)
    got = predict.segment(str(workdir), images[:2])
    n_clusters = config.data.n_classes + config.model.extra_clusters
    assert got["cluster"].shape == got["linear"].shape == (2, side, side)
    assert 0 <= got["cluster"].min() and got["cluster"].max() < n_clusters
    assert 0 <= got["linear"].min() and got["linear"].max() < config.data.n_classes


# ----------------------------------------------------------------------------------------------
# Each family: bfloat16 compute and the featurizer

# family: (checkpoint, heads (0: read from the file), patch, width, input (batch, H, W, seed))
BF16 = {"dinov2_reg": ("dinov2_swiglu_reg.pth", 2, (2, 42, 98, 3)), "dinov3": ("dinov3_swiglu.pth", 0, (2, 32, 80, 1))}
FEATURIZER = {"dinov2_reg": ("dinov2_mlp_reg.pth", 2, 14, 8, "DINOv2", (1, 98, 154, 1)),
              "dinov3": ("dinov3_mlp.pth", 0, 16, 32, "DINOv3", (1, 48, 112, 0))}


@pytest.mark.parametrize("name", sorted(BF16))
def test_bfloat16_compute_stays_close(name):
    ckpt, heads, size = BF16[name]
    x = fixed_input(*size)
    _, ref = _tokens(ckpt, heads, x)
    _, got = _tokens(ckpt, heads, x, dtype=jnp.bfloat16)
    assert got.dtype == np.float32
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    # Non-zero: the compute really ran in bf16; the stated tolerance: 3% relative (L2).
    assert 1e-4 < rel < 3e-2, rel


@pytest.mark.parametrize("name", sorted(FEATURIZER))
def test_featurizer_drops_the_prefix_tokens(name):
    """The featurizer's map is the backbone's patch tokens after CLS and the 4 registers (DINOv2)
    or storage tokens (DINOv3), on the patch grid of an image that is not square."""
    ckpt, heads, patch, width, family, size = FEATURIZER[name]
    c = tiny_config(**{"model.featurizer": "dino", "model.backbone": str(FIX / ckpt), "model.num_heads": heads,
                       "model.dtype": "float32"})
    f = build_featurizer(c)
    assert (f.patch_size, f.dim, f.name) == (patch, width, Path(ckpt).stem)
    assert family in f.description
    x = fixed_input(*size)
    grid = (size[1] // patch, size[2] // patch)
    feats = np.asarray(jax.jit(f.apply)(f.params, jnp.asarray(x)))
    cfg, tokens = _tokens(ckpt, heads, x)
    assert feats.shape == (1, *grid, width)
    np.testing.assert_array_equal(feats[0, 0, 0], tokens[0, PREFIX])
    np.testing.assert_array_equal(feats[0, -1, -1], tokens[0, -1])
    np.testing.assert_array_equal(np.asarray(patch_feature_map(jnp.asarray(tokens), cfg, grid)), feats)
