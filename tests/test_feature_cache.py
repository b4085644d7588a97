"""The on-disk feature cache: bf16/f32 round trip, checksums, fingerprint mismatch errors, and
training from it equals training from the in-memory cache."""

import json
import os

import jax
import numpy as np
import pytest

from stego_jax import feature_cache, train

from .test_train import leaves, tiny_config


class Items:
    """A tiny random-access dataset of `{"image", "label"}` items."""

    def __init__(self, n, res=16, seed=0):
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8)
        self.labels = rng.integers(-1, 5, (n, res, res)).astype(np.int32)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def fake_features(images):
    """A deterministic float32 'featurizer' [B,16,16,3] -> [B,4,4,6] with values of many magnitudes."""
    x = images.astype(np.float32).reshape(len(images), 4, 4, 4, 4, 3).mean(axis=(2, 4)) / 7.0 - 11.3
    return np.concatenate([x, np.exp(x / 9.0) * 1e-3], axis=-1).astype(np.float32)


def bf16_reference(x):
    """float32 -> bfloat16 values (as float32), round to nearest even, by bit arithmetic."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def build(directory, dataset, dtype, shard_rows=8):
    fp = {"format_version": feature_cache.FORMAT_VERSION, "dtype": dtype, "what": "test"}
    feature_cache.build(directory, fp, dataset, fake_features, feature_shape=(4, 4, 6), n_classes=5,
                        shard_rows=shard_rows, batch=5, log=lambda msg: None)
    return fp


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip(tmp_path, dtype):
    ds = Items(21)
    fp = build(str(tmp_path), ds, dtype)
    cache = feature_cache.FeatureCache(str(tmp_path), expect=fp)
    assert len(cache.manifest["shards"]) == 3 and cache.n == 21  # 8 + 8 + 5 rows
    idx = np.array([20, 0, 9, 9, 7, 16, 3])  # across shards, repeated, unordered
    want = fake_features(ds.images[idx])
    got = cache.features(idx)
    if dtype == "bfloat16":
        assert got.dtype.name == "bfloat16"
        np.testing.assert_array_equal(got.astype(np.float32), bf16_reference(want))
        assert 0 < np.abs(got.astype(np.float32) - want).max()  # rounding did happen
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2.0 ** -8)
    else:
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(cache.labels(idx), ds.labels[idx])
    assert cache.labels(idx).dtype == np.int32
    g = fake_features(ds.images).mean(axis=(1, 2))
    np.testing.assert_allclose(cache.descriptors(), g / np.linalg.norm(g, axis=-1, keepdims=True), rtol=1e-5)
    # rows come from memory maps, not from arrays loaded whole
    a = cache._array(0, "feats")
    assert isinstance(a, np.memmap) or isinstance(a.base, np.memmap)
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"] + sorted(
        f"shard-{s:05d}.{p}.npy" for s in range(3) for p in feature_cache.PARTS)


def test_corrupt_shard_is_named(tmp_path):
    ds = Items(16)
    fp = build(str(tmp_path), ds, "bfloat16")
    path = tmp_path / "shard-00001.feats.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # one bit of one feature value
    path.write_bytes(bytes(raw))
    cache = feature_cache.FeatureCache(str(tmp_path), expect=fp)
    np.testing.assert_array_equal(cache.features([1, 2]).astype(np.float32),
                                  bf16_reference(fake_features(ds.images[[1, 2]])))  # shard 0 is fine
    with pytest.raises(ValueError, match=r"shard-00001\.feats\.npy is corrupt.*delete .* rebuild"):
        cache.features([3, 12])
    with pytest.raises(ValueError, match=r"shard-00001\.feats\.npy is corrupt"):
        feature_cache.FeatureCache(str(tmp_path)).verify()


def test_incomplete_cache_is_not_opened(tmp_path):
    build(str(tmp_path), Items(8), "float32")
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(FileNotFoundError, match=r"manifest.json not found.*python -m stego_jax.feature_cache"):
        feature_cache.FeatureCache(str(tmp_path))


def small(**kw):
    return tiny_config(**{"num_steps": 3, "log_every": 3, "eval_every": 3, "checkpoint_every": 3, **kw})


@pytest.fixture(scope="module")
def in_memory_run(tmp_path_factory):
    return train.train_and_evaluate(small(), str(tmp_path_factory.mktemp("mem")))


def test_training_from_disk_cache_matches_in_memory(in_memory_run, tmp_path):
    ref = in_memory_run
    exact = train.train_and_evaluate(
        small(**{"feature_cache.dir": str(tmp_path / "f32"), "feature_cache.dtype": "float32",
                 "feature_cache.shard_rows": 20}), str(tmp_path / "run_f32"))
    manifest = json.load(open(tmp_path / "f32" / "manifest.json"))
    assert manifest["dtype"] == "float32" and len(manifest["shards"]) == 3  # 48 rows: 20 + 20 + 8
    for a, b in zip(leaves(ref["params"]), leaves(exact["params"])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)

    half = train.train_and_evaluate(small(**{"feature_cache.dir": str(tmp_path / "bf16")}),
                                    str(tmp_path / "run_bf16"))
    assert json.load(open(tmp_path / "bf16" / "manifest.json"))["dtype"] == "bfloat16"  # the default
    diffs = [np.abs(a - b).max() for a, b in zip(leaves(ref["params"]), leaves(half["params"]))]
    print("max |params(bf16 cache) - params(f32)| per leaf:", diffs)
    assert 0 < max(diffs) < 2e-2, diffs  # bf16 features: close to, not equal to, the float32 run


def test_cache_config_mismatch_names_field(in_memory_run, tmp_path):
    d = str(tmp_path / "cache")
    train.train_and_evaluate(small(**{"feature_cache.dir": d, "num_steps": 1, "log_every": 1, "eval_every": 1}), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"does not match the config: data\.seed: cache has 0, config gives 1.*"
                                         r"delete .*cache.*feature_cache\.dir elsewhere"):
        train.train_and_evaluate(small(**{"feature_cache.dir": d, "data.seed": 1}), str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"dtype: cache has 'bfloat16', config gives 'float32'"):
        train.train_and_evaluate(small(**{"feature_cache.dir": d, "feature_cache.dtype": "float32"}),
                                 str(tmp_path / "c"))


def test_bad_cache_dtype_and_disabled_cache(tmp_path):
    with pytest.raises(ValueError, match=r"config.feature_cache.dtype='float16'.*'bfloat16', 'float32'"):
        train.train_and_evaluate(small(**{"feature_cache.dir": str(tmp_path / "c"),
                                          "feature_cache.dtype": "float16"}), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"feature_cache.dir=.* is set but config.feature_cache.enabled is False"):
        train.train_and_evaluate(small(**{"feature_cache.dir": str(tmp_path / "c"),
                                          "feature_cache.enabled": False}), str(tmp_path / "b"))
