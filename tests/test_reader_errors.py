"""Every file the package reads fails with one error type that names the file, what is wrong and
what to do: weights (.pth zip/legacy, .safetensors, .npz), k-NN tables, the feature-cache
manifest, images. Sizes a file declares are refused before anything that large is allocated."""

from __future__ import annotations

import io
import json
import struct
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego_jax import feature_cache, featurizers, knn
from stego_jax.data.sources import CorruptFileError, read_label_png, read_rgb
from stego_jax.weights import (
    CheckpointError,
    UnreadableFileError,
    load_npz,
    load_safetensors,
    load_torch_checkpoint,
    read_checkpoint,
)

FIX = Path(__file__).parent / "fixtures"


def _npy_bytes(shape, dtype="<i4", data=b""):
    """A .npy member whose header claims `shape` but holds only `data`."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    )
    return buf.getvalue() + data


def _zip(path: Path, members: dict[str, bytes], compress=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compress) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _assert_names(err: BaseException, path: Path, *words: str) -> None:
    msg = str(err)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)


# ------------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("fixture", ["tiny_dino_fp32.pth", "tiny_dino_legacy.pth"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_pth_says_truncated_and_redownload(fixture, keep, tmp_path):
    blob = (FIX / fixture).read_bytes()
    cut = tmp_path / fixture
    cut.write_bytes(blob[: int(len(blob) * keep)])
    with pytest.raises(CheckpointError) as e:
        load_torch_checkpoint(cut)
    _assert_names(e.value, cut, "truncated or corrupt", "download it again")
    assert "torch>=1.6" not in str(e.value)
    assert e.value.path == str(cut)


def test_not_a_checkpoint_still_says_what_it_is(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_bytes(b"these are my notes, not weights\n" * 4)
    with pytest.raises(CheckpointError) as e:
        load_torch_checkpoint(bad)
    _assert_names(e.value, bad, "neither a zip PyTorch checkpoint nor the legacy format")


def test_corrupt_npz_backbone(tmp_path):
    blob = (FIX / "tiny_dino.npz").read_bytes()
    for name, data in {"cut.npz": blob[: len(blob) // 2], "noise.npz": b"\x00" * 200}.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_npz(path)
        _assert_names(e.value, path, "truncated or corrupt", "download")
        with pytest.raises(CheckpointError):
            read_checkpoint(path)


def test_npz_header_claiming_huge_array_refused_before_allocating(tmp_path):
    # 10^12 int32 elements declared, 16 bytes stored: np.load would try to allocate 4 TB.
    path = _zip(tmp_path / "bomb.npz", {"w.npy": _npy_bytes((10**6, 10**6), data=b"\0" * 16)})
    with pytest.raises(CheckpointError) as e:
        load_npz(path)
    _assert_names(e.value, path, "(1000000, 1000000)", "truncated or corrupt")
    # A deflated member claiming more than deflate can expand to.
    path = tmp_path / "inflated.npz"
    _zip(path, {"w.npy": _npy_bytes((4,), data=b"\0" * 16)}, zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    cd = raw.rfind(b"PK\x01\x02")
    struct.pack_into("<I", raw, cd + 24, 10**9)  # central directory: uncompressed size
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="cannot hold"):
        load_npz(path)


def test_npz_object_array_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="pickle"):
        load_npz(path)


def test_valid_npz_reads_as_np_load(tmp_path):
    path = tmp_path / "ok.npz"
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.asfortranarray(np.eye(3)),
              "c": np.array("text"), "d": np.zeros((0, 4), np.int8)}
    np.savez_compressed(path, **arrays)
    got = load_npz(path)
    with np.load(path) as z:
        assert sorted(got) == sorted(z.files)
        for k in z.files:
            np.testing.assert_array_equal(got[k], z[k])
            assert got[k].dtype == z[k].dtype and got[k].shape == z[k].shape


def test_safetensors_shape_overflow_refused(tmp_path):
    # 2^32 * 2^32 wraps to 0 in int64: the claimed tensor must not pass as an empty one.
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}})
    path = tmp_path / "wrap.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    with pytest.raises(CheckpointError) as e:
        load_safetensors(path)
    _assert_names(e.value, path, "truncated or corrupt")
    for bad_header in (b"[1, 2]", b"{\"w\": 3}", b"{\"w\": {\"dtype\": \"F32\", \"shape\": [1e999]}}"):
        path.write_bytes(struct.pack("<Q", len(bad_header)) + bad_header)
        with pytest.raises(CheckpointError):
            load_safetensors(path)


def test_pth_sizes_claiming_more_than_the_file_refused(tmp_path):
    src, dst = FIX / "tiny_dino_fp32.pth", tmp_path / "huge.pth"
    with zipfile.ZipFile(src) as z:
        pkl_name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        members = {i.filename: z.read(i) for i in z.infolist()}
    raw = members[pkl_name]
    # The first storage's element count follows 'cpu' (BINUNICODE, BINPUT n, then BININT1 8).
    i = raw.index(b"cpu") + 3
    assert raw[i : i + 1] == b"q" and raw[i + 2 : i + 3] == b"K"
    huge = b"\x8a\x06" + (10**12).to_bytes(6, "little")  # LONG1: 10^12 elements
    members[pkl_name] = raw[: i + 2] + huge + raw[i + 4 :]
    _zip(dst, members)
    with pytest.raises(CheckpointError) as e:
        load_torch_checkpoint(dst)
    _assert_names(e.value, dst, "1000000000000", "truncated or corrupt")
    # cls_token: offset 0, size (1, 1, 8), stride (8, 8, 1) over an 8-element storage. Made
    # size (10^12, 1, 8) with stride (0, 8, 1): every index stays in bounds, but the copy would
    # need 4 TB.
    old = b"K\x00K\x01K\x01K\x08\x87q\x09K\x08K\x08K\x01\x87"
    new = (b"K\x00\x8a\x06" + (10**12).to_bytes(6, "little") + b"K\x01K\x08\x87q\x09"
           b"K\x00K\x08K\x01\x87")
    assert raw.count(old) == 1
    members[pkl_name] = raw.replace(old, new)
    _zip(dst, members)
    with pytest.raises(CheckpointError) as e:
        load_torch_checkpoint(dst)
    _assert_names(e.value, dst, "8000000000000 elements but its storage holds 8")
    # A memo index far beyond the stream (the C unpickler would size its memo table to it).
    k = raw.index(b"q\x05")
    members[pkl_name] = raw[:k] + b"r\xff\xff\xff\x7f" + raw[k + 2 :]
    _zip(dst, members)
    with pytest.raises(CheckpointError, match="memo index"):
        load_torch_checkpoint(dst)


# ------------------------------------------------------------------------------------------------
# k-NN tables


def _meta(**kw):
    m = {"dataset": "synthetic", "split": "train", "crop": None, "backbone": "dino_vits8",
         "patch_size": 8, "res": 224, "n": 4, "ids_fingerprint": knn.ids_fingerprint("abcd")}
    m.update(kw)
    return m


def test_corrupt_knn_table_names_file_and_fix(tmp_path):
    path = tmp_path / "nns.npz"
    knn.save_knn(str(path), np.array([[0, 1], [1, 0], [2, 3], [3, 2]]), _meta())
    blob = path.read_bytes()
    cases = {
        "cut": blob[: len(blob) // 2],
        "noise": bytes(range(256)) * 3,
        "flipped": blob[:60] + bytes([blob[60] ^ 0xFF]) + blob[61:],
    }
    for name, data in cases.items():
        bad = tmp_path / f"{name}.npz"
        bad.write_bytes(data)
        with pytest.raises(UnreadableFileError) as e:
            knn.load_knn(str(bad), expect_meta=_meta(), config_hint="configs/x.py")
        _assert_names(e.value, bad, "rerun python -m stego_jax.knn --config configs/x.py")


def test_knn_table_with_huge_header_or_bad_contents_refused(tmp_path):
    bomb = _zip(tmp_path / "bomb.npz", {"nns.npy": _npy_bytes((10**6, 10**6), data=b"\0" * 64)})
    with pytest.raises(UnreadableFileError, match="1000000"):
        knn.load_knn(str(bomb), expect_meta=_meta())
    for name, arrays in {
        "float": {"nns": np.zeros((4, 2), np.float32)},
        "range": {"nns": np.full((4, 2), 9)},
        "meta": {"nns": np.zeros((4, 2), np.int64), "meta": np.array("{not json")},
    }.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(UnreadableFileError) as e:
            knn.load_knn(str(path), expect_meta=_meta())
        _assert_names(e.value, path, "corrupt", "rerun python -m stego_jax.knn")


def test_knn_table_keyed_by_backbone_content(tmp_path):
    config = types.SimpleNamespace(
        data=types.SimpleNamespace(name="synthetic", res=16, get=lambda k, d=None: d))
    ids = ["a", "b", "c", "d"]
    old = types.SimpleNamespace(name="dino_vits8", patch_size=8, params={"w": np.ones(3, np.float32)})
    new = types.SimpleNamespace(name="dino_vits8", patch_size=8, params={"w": np.full(3, 2, np.float32)})
    meta_old = knn.table_meta(config, old, "train", ids)
    assert meta_old["featurizer_params_sha256"] == featurizers.params_sha256(old.params)
    assert feature_cache.params_sha256 is featurizers.params_sha256
    path = str(tmp_path / "nns.npz")
    knn.save_knn(path, np.zeros((4, 2), np.int32), meta_old)
    knn.load_knn(path, expect_meta=knn.table_meta(config, old, "train", ids))
    with pytest.raises(ValueError) as e:
        knn.load_knn(path, expect_meta=knn.table_meta(config, new, "train", ids))
    msg = str(e.value)
    assert "featurizer_params_sha256" in msg and "weights differ" in msg and path in msg
    assert meta_old["featurizer_params_sha256"] in msg
    # An official table (no metadata) is still checked on its row count only.
    official = str(tmp_path / "official.npz")
    np.savez_compressed(official, nns=np.zeros((4, 30), np.int64))
    with pytest.warns(UserWarning, match="no metadata"):
        knn.load_knn(official, expect_meta=knn.table_meta(config, new, "train", ids))


# ------------------------------------------------------------------------------------------------
# Feature cache


def _cache(directory: Path) -> None:
    items = [{"image": np.zeros((16, 16, 3), np.uint8), "label": np.zeros((16, 16), np.int32)}] * 3
    feature_cache.build(str(directory), {"format_version": 1, "dtype": "float32"}, items,
                        lambda x: np.zeros((len(x), 4, 4, 6), np.float32), feature_shape=(4, 4, 6),
                        n_classes=5, shard_rows=2, batch=2, log=lambda msg: None)


def test_truncated_or_damaged_manifest_names_file_and_rebuild(tmp_path):
    _cache(tmp_path)
    manifest = tmp_path / "manifest.json"
    good = manifest.read_text()
    feature_cache.FeatureCache(str(tmp_path)).verify()
    broken = {
        "truncated": good[: len(good) // 2],
        "not an object": "[1, 2, 3]",
        "no shards": json.dumps({**json.loads(good), "shards": "x"}),
        "bad dtype": json.dumps({**json.loads(good), "dtype": "float64"}),
        "escaping name": good.replace("shard-00000.feats.npy", "../../etc/passwd"),
        "binary": "\udcff",
    }
    for what, text in broken.items():
        manifest.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(UnreadableFileError) as e:
            feature_cache.FeatureCache(str(tmp_path))
        _assert_names(e.value, manifest, "truncated or corrupt", "rebuild")


# ------------------------------------------------------------------------------------------------
# Images


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    path = str(tmp_path / "big.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: PIL only warns up to 2x
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    for reader in (read_rgb, read_label_png):
        with pytest.raises(CorruptFileError) as e:
            reader(path)
        _assert_names(e.value, path, "MAX_IMAGE_PIXELS", "Replace the file")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # 1600 px > 2x: PIL's own error, mapped
    for reader in (read_rgb, read_label_png):
        with pytest.raises(CorruptFileError, match="DecompressionBombError"):
            reader(path)
    assert not decoded
