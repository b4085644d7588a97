"""k-NN precompute: descriptors and tables against brute-force NumPy, the file format and its
stale-table checks, and the CLI core with a stand-in featurizer and dataset."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from stego_jax import knn


def _np_desc(feats):
    g = feats.mean(axis=(1, 2))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def _brute_force(desc, k):
    d = desc / np.linalg.norm(desc, axis=1, keepdims=True)
    return np.argsort(-(d @ d.T), axis=1, kind="stable")[:, :k]


def test_global_descriptors_match_numpy():
    feats = np.random.default_rng(0).standard_normal((3, 4, 5, 7)).astype(np.float32)
    got = knn.global_descriptors(jnp.asarray(feats))
    np.testing.assert_allclose(got, _np_desc(feats), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_global_descriptors_channel_dropout():
    # Dropout2d: a channel is dropped for the whole grid of one image, survivors scaled by 1/0.9
    # (which the final normalisation cancels). Recover the kept mask from the zeros.
    feats = np.random.default_rng(1).uniform(0.5, 1.5, (4, 3, 3, 2000)).astype(np.float32)
    got = np.asarray(knn.global_descriptors(jnp.asarray(feats), dropout_key=jax.random.key(0)))
    keep = got != 0
    assert abs(1 - keep.mean() - 0.1) < 0.02
    g = feats.mean(axis=(1, 2)) * keep / 0.9
    np.testing.assert_allclose(got, g / np.linalg.norm(g, axis=1, keepdims=True), atol=1e-6)
    other = knn.global_descriptors(jnp.asarray(feats), dropout_key=jax.random.key(1))
    assert not np.array_equal(other != 0, keep)


@pytest.mark.parametrize("chunk", [5, 16, 100])  # rounded up to the device count; 37 rows
def test_knn_table_matches_brute_force(chunk):
    desc = np.random.default_rng(2).standard_normal((37, 12)).astype(np.float32)
    desc *= np.random.default_rng(3).uniform(0.5, 3.0, (37, 1))  # scale must not matter
    table = knn.knn_table(desc, k=6, chunk=chunk)
    assert table.dtype == np.int32 and table.shape == (37, 6)
    np.testing.assert_array_equal(table, _brute_force(desc, 6))
    np.testing.assert_array_equal(table[:, 0], np.arange(37))


def test_knn_table_ties_go_to_lower_index_and_k_checked():
    base = np.random.default_rng(4).standard_normal((5, 3)).astype(np.float32)
    desc = np.concatenate([base, base[[1]], 2 * base[[1]]])  # rows 1, 5, 6 share a direction
    table = knn.knn_table(desc, k=3, chunk=4)
    for row in (1, 5, 6):
        np.testing.assert_array_equal(table[row], [1, 5, 6])  # column 0 is not self for 5, 6
    with pytest.raises(ValueError, match="k=8"):
        knn.knn_table(desc, k=8)


def _meta(n=4, ids=("a", "b", "c", "d")):
    return {
        "dataset": "synthetic", "split": "train", "crop": None, "backbone": "dino_vits8",
        "patch_size": 8, "res": 224, "n": n, "ids_fingerprint": knn.ids_fingerprint(ids),
    }


def test_save_load_round_trip_and_stale_errors(tmp_path):
    table = np.array([[0, 1], [1, 0], [2, 3], [3, 2]], np.int32)
    name = knn.knn_filename("dino_vits", 8, "synthetic", "train", None, 224)
    assert name == "nns_dino_vits_p8_synthetic_train_None_224.npz"
    path = str(tmp_path / "sub" / name)
    knn.save_knn(path, table, _meta())
    got, meta = knn.load_knn(path, expect_meta=_meta())
    np.testing.assert_array_equal(got, table)
    assert meta == _meta()
    with np.load(path) as f:  # official key, so official tooling can read it
        np.testing.assert_array_equal(f["nns"], table)

    with pytest.raises(ValueError) as e:
        knn.load_knn(path, expect_meta=_meta(n=5), config_hint="configs/demo.py")
    msg = str(e.value)
    assert f"k-NN table {path} was computed for n=4" in msg
    assert "but training uses n=5" in msg
    assert "rerun python -m stego_jax.knn --config configs/demo.py" in msg
    with pytest.raises(ValueError, match="ids_fingerprint"):
        knn.load_knn(path, expect_meta=_meta(ids=("a", "c", "b", "d")))  # same ids, new order
    with pytest.raises(FileNotFoundError, match="rerun python -m stego_jax.knn"):
        knn.load_knn(str(tmp_path / "missing.npz"), expect_meta=_meta())
    with pytest.raises(ValueError, match="rows"):
        knn.save_knn(path, table, _meta(n=3))


def test_official_file_without_metadata_checks_rows(tmp_path):
    path = str(tmp_path / "nns_vit_small_cocostuff27_train_five_224.npz")
    np.savez_compressed(path, nns=np.zeros((4, 30), np.int64))
    with pytest.warns(UserWarning, match="no metadata"):
        table, _ = knn.load_knn(path, expect_meta=_meta())
    assert table.shape == (4, 30) and table.dtype == np.int32
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="n=4"):
        knn.load_knn(path, expect_meta=_meta(n=6))


class _Dataset:
    """Stand-in for `stego_jax.data.build_dataset(...)`: 7 random uint8 images of 16x16."""

    def __init__(self, seed):
        self.images = np.random.default_rng(seed).integers(0, 256, (7, 16, 16, 3), np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": None, "id": f"img{i:03d}"}


def _featurize(x):
    """Stand-in backbone: 4x4 patches, features = per-patch channel means and squares."""
    b = x.shape[0]
    p = x.reshape(b, 4, 4, 4, 4, 3).mean(axis=(2, 4))
    return jnp.concatenate([p, p**2], axis=-1)  # [B, 4, 4, 6]


def test_cli_core_writes_loadable_table(tmp_path):
    config = ml_collections.ConfigDict(
        {
            "batch_size": 3,  # does not divide the 7 images
            "seed": 0,
            "model": {"featurizer": "dino", "dropout": True},
            "data": {"name": "synthetic", "crop_type": None, "res": 16, "root": str(tmp_path)},
            "knn": {"k": 4, "dir": "", "splits": ("train",), "dropout": 0.0},
        }
    )
    featurizer = types.SimpleNamespace(
        name="toy", apply=lambda params, x: _featurize(x) * params, params=jnp.float32(2.0),
        patch_size=4,
    )
    paths = knn.run(
        config,
        build_featurizer=lambda cfg: featurizer,
        build_dataset=lambda cfg, split: _Dataset(0),
    )
    assert paths == [str(tmp_path / "nns" / "nns_toy_p4_synthetic_train_None_16.npz")]
    ds = _Dataset(0)
    ids = [f"img{i:03d}" for i in range(7)]
    expect = {"n": 7, "ids_fingerprint": knn.ids_fingerprint(ids), "patch_size": 4, "res": 16}
    table, meta = knn.load_knn(paths[0], expect_meta=expect)
    x = (ds.images / 255.0 - knn.IMAGENET_MEAN) / knn.IMAGENET_STD
    p = x.reshape(7, 4, 4, 4, 4, 3).mean(axis=(2, 4))
    np.testing.assert_array_equal(table, _brute_force(_np_desc(np.concatenate([p, p**2], -1)), 4))
    assert meta["backbone"] == "toy" and meta["split"] == "train"
    # Dropout on (the official quirk): still a valid table, but other descriptors.
    desc_drop, _, grid = knn.dataset_descriptors(
        featurizer.apply, featurizer.params, ds, 3, dropout_key=jax.random.key(0)
    )
    assert grid == (4, 4) and desc_drop.shape == (7, 6)
    np.testing.assert_allclose(np.linalg.norm(desc_drop, axis=1), 1.0, atol=1e-6)
    assert (desc_drop == 0).any()  # some of the 42 channels dropped (P(none) = 0.9**42 ~ 1%)
