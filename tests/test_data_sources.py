"""Raw layouts, build_dataset, corrupt files and the prepare CLI on fixtures in the real directory layouts."""

import io
import json
import logging
import os

import ml_collections
import numpy as np
import pytest
import scipy.io
from PIL import Image

from stego_jax.data import build_dataset, prepare, prepared, sources
from stego_jax.data.sources import CorruptFileError, RawLayoutError, image_size, read_rgb

RNG = np.random.default_rng(0)
# Official COCO-Stuff-27 assignments of a few fine ids (`Coco.fine_to_coarse`, official `src/data.py`) used to
# check the loader end-to-end.
COCO_FINE_SAMPLE = {0: 9, 2: 11, 105: 23, 156: 23, 170: 18, 119: 26, 181: 24}


def config(name, root, res, crop_type=None, **extra):
    return ml_collections.ConfigDict({"data": dict(name=name, root=str(root), res=res, crop_type=crop_type,
                                                   skip_corrupt=False, **extra)})


def save_img(path, arr, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def smooth_image(h, w, seed):
    # smooth content so JPEG round-trips closely
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.random.default_rng(seed)
    img = np.stack([128 + 100 * np.sin(xx / (7 + r.uniform(0, 5)) + c) * np.cos(yy / 9) for c in range(3)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_coco(root, n_train=3, n_val=2):
    fine_values = np.array(list(COCO_FINE_SAMPLE) + [255], np.uint8)
    for split, subdir, list_name, n in [("train", "train2017", "Coco164kFull_Stuff_Coarse.txt", n_train),
                                        ("val", "val2017", "Coco164kFull_Stuff_Coarse_7.txt", n_val)]:
        ids = [f"0000000{100 + 7 * i:05d}" for i in range(n)]
        for k, i in enumerate(ids):
            h, w = 48 + 4 * k, 64 + 6 * k
            save_img(f"{root}/images/{subdir}/{i}.jpg", smooth_image(h, w, k), quality=95)
            fine = fine_values[RNG.integers(0, len(fine_values), ((h + 7) // 8, (w + 7) // 8))].repeat(8, 0).repeat(8, 1)
            save_img(f"{root}/annotations/{subdir}/{i}.png", np.ascontiguousarray(fine[:h, :w]))
        os.makedirs(f"{root}/curated/{subdir}", exist_ok=True)
        with open(f"{root}/curated/{subdir}/{list_name}", "w") as f:
            f.write("".join(i + "\n" for i in reversed(ids)))  # list order, not sorted order, defines the dataset
    return root


def expected_item(image_path, label_path, res, mapping):
    """Independent pipeline: PIL resize of the whole image/label + numpy centre crop + dict mapping."""
    out = []
    for path in (image_path, label_path):
        im = Image.open(path)
        im = im.convert("RGB") if path == image_path else im
        w, h = im.size
        if w <= h:
            size = (res, int(res * h / w))
        else:
            size = (int(res * w / h), res)
        arr = np.asarray(im.resize(size, Image.NEAREST))
        top, left = int(round((arr.shape[0] - res) / 2.0)), int(round((arr.shape[1] - res) / 2.0))
        out.append(arr[top:top + res, left:left + res])
    label = np.vectorize(lambda v: mapping.get(int(v), -1))(out[1])
    return out[0], label


def test_cocostuff27_raw(tmp_path):
    root = make_coco(tmp_path / "cocostuff")
    ds = build_dataset(config("cocostuff27", root, 32), "train")
    with open(root / "curated/train2017/Coco164kFull_Stuff_Coarse.txt") as f:
        assert ds.ids == f.read().split()
    assert ds.class_names[9] == "person" and len(ds.class_names) == 27
    for i in range(len(ds)):
        item = ds[i]
        img, lab = expected_item(f"{root}/images/train2017/{ds.ids[i]}.jpg",
                                 f"{root}/annotations/train2017/{ds.ids[i]}.png", 32, COCO_FINE_SAMPLE)
        np.testing.assert_array_equal(item["image"], img)
        np.testing.assert_array_equal(item["label"], lab)
        assert item["label"].dtype == np.int32 and item["id"] == ds.ids[i]
    assert len(build_dataset(config("cocostuff27", root, 32), "val")) == 2


def make_cityscapes(root):
    for split, cities in [("train", ["zurich", "aachen"]), ("val", ["frankfurt"])]:
        for city in cities:
            for k in range(2):
                stem = f"{city}_{k:06d}_000019"
                save_img(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", smooth_image(32, 64, k))
                ids = RNG.integers(0, 34, (32, 64)).astype(np.uint8)
                save_img(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", ids)
    return root


def test_cityscapes27_raw(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    ds = build_dataset(config("cityscapes27", root, 32), "train")
    assert ds.ids == ["aachen_000000_000019", "aachen_000001_000019", "zurich_000000_000019", "zurich_000001_000019"]
    mapping = {i: i - 7 for i in range(7, 34)}
    city = ds.ids[2].split("_")[0]
    img, lab = expected_item(f"{root}/leftImg8bit/train/{city}/{ds.ids[2]}_leftImg8bit.png",
                             f"{root}/gtFine/train/{city}/{ds.ids[2]}_gtFine_labelIds.png", 32, mapping)
    np.testing.assert_array_equal(ds[2]["image"], img)
    np.testing.assert_array_equal(ds[2]["label"], lab)
    assert ds[2]["label"].min() == -1 and ds[2]["label"].max() <= 26


def make_potsdam(root, img_dtype=np.uint8):
    os.makedirs(f"{root}/imgs", exist_ok=True)
    os.makedirs(f"{root}/gt", exist_ok=True)
    for i in range(4):
        img = RNG.integers(0, 256, (40, 40, 4)).astype(np.uint8)
        if img_dtype != np.uint8:
            img = img.astype(img_dtype) / 255.0
        scipy.io.savemat(f"{root}/imgs/{i}.mat", {"img": img})
        gt = RNG.choice(np.array([0, 1, 2, 3, 4, 5, 255]), (40, 40)).astype(np.int32)
        scipy.io.savemat(f"{root}/gt/{i}.mat", {"gt": gt})
    for name, ids in [("labelled_train.txt", [3, 0, 2]), ("labelled_test.txt", [1])]:
        with open(f"{root}/{name}", "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return root


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_potsdam3_raw(tmp_path, dtype):
    root = make_potsdam(tmp_path / "potsdam", dtype)
    ds = build_dataset(config("potsdam3", root, 40), "train")
    assert ds.ids == ["3", "0", "2"] and len(build_dataset(config("potsdam3", root, 40), "val")) == 1
    mat = scipy.io.loadmat(f"{root}/imgs/3.mat")["img"]
    rgb = mat[..., :3] if dtype == np.uint8 else np.round(mat[..., :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(ds[0]["image"], rgb)
    gt = scipy.io.loadmat(f"{root}/gt/3.mat")["gt"]
    merged = np.select([np.isin(gt, [0, 4]), np.isin(gt, [1, 5]), np.isin(gt, [2, 3])], [0, 1, 2], -1)
    np.testing.assert_array_equal(ds[0]["label"], merged)
    six = build_dataset(config("potsdam", root, 40), "train")
    np.testing.assert_array_equal(six[0]["label"], np.where(gt == 255, -1, gt))


def test_potsdam_bad_range_is_refused(tmp_path):
    root = make_potsdam(tmp_path / "potsdam")
    scipy.io.savemat(f"{root}/imgs/3.mat", {"img": np.full((40, 40, 4), 200.0)})
    with pytest.raises(CorruptFileError, match=r"3\.mat.*float64.*expected uint8"):
        build_dataset(config("potsdam3", root, 40), "train")[0]


def test_image_folder_modes_and_labels(tmp_path):
    root = tmp_path / "mine"
    base = smooth_image(30, 40, 1)
    save_img(f"{root}/imgs/train/a.jpg", base)
    save_img(f"{root}/imgs/train/b.png", base[..., 0])  # grayscale L
    Image.fromarray(np.dstack([base, np.full((30, 40), 128, np.uint8)])).save(f"{root}/imgs/train/c.png")  # RGBA
    Image.fromarray(base).convert("P").save(f"{root}/imgs/train/d.png")  # palette
    Image.fromarray(base).convert("CMYK").save(f"{root}/imgs/train/e.tiff")
    Image.fromarray(base).save(f"{root}/imgs/train/f.webp", lossless=True)
    Image.fromarray((base[..., 0].astype(np.uint16) * 257)).save(f"{root}/imgs/train/g.png")  # 16-bit grey
    ds = build_dataset(config("image_folder", root, 24), "train")
    assert ds.ids == list("abcdefg")
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (24, 24, 3) and item["image"].dtype == np.uint8
        assert (item["label"] == -1).all()
    np.testing.assert_array_equal(ds.source.load(5)[0], base)  # lossless webp
    np.testing.assert_array_equal(ds.source.load(1)[0], np.repeat(base[..., :1], 3, -1))  # L -> RGB
    np.testing.assert_array_equal(ds.source.load(2)[0], base)  # RGBA -> RGB drops alpha
    grey = ds.source.load(6)[0]
    np.testing.assert_array_equal(grey[..., 0], base[..., 0])  # 16-bit rescaled, not clipped
    # labels paired by stem
    for k, stem in enumerate("abcdefg"):
        save_img(f"{root}/labels/train/{stem}.png", np.full((30, 40), k, np.uint8))
    ds = build_dataset(config("image_folder", root, 24), "train")
    assert [int(ds[k]["label"][0, 0]) for k in range(7)] == list(range(7))
    os.remove(f"{root}/labels/train/c.png")
    with pytest.raises(RawLayoutError, match=r"labels/train/c\.png"):
        build_dataset(config("image_folder", root, 24), "train")


def test_corrupt_file_error_and_skip(tmp_path, caplog):
    root = make_coco(tmp_path / "cocostuff", n_train=4)
    ds = build_dataset(config("cocostuff27", root, 32), "train")
    bad = f"{root}/images/train2017/{ds.ids[1]}.jpg"
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(CorruptFileError, match=ds.ids[1] + r"\.jpg.*skip_corrupt"):
        ds[1]
    cfg = config("cocostuff27", root, 32)
    cfg.data.skip_corrupt = True
    ds = build_dataset(cfg, "train")
    with caplog.at_level(logging.WARNING):
        item = ds[1]
        again = ds[1]
    assert item["id"] == ds.ids[2] and again["id"] == ds.ids[2]  # next valid index, deterministic
    np.testing.assert_array_equal(item["image"], ds[2]["image"])
    assert ds.skipped == 1 and ds.stats["skipped_files"] == [bad]
    assert sum(bad in r.getMessage() for r in caplog.records) == 1  # logged once, naming the file


def test_missing_layout_messages(tmp_path):
    with pytest.raises(RawLayoutError, match=r"cocostuff\.zip") as e:
        build_dataset(config("cocostuff27", tmp_path, 32), "train")
    assert "curated/train2017/Coco164kFull_Stuff_Coarse.txt" in str(e.value)
    with pytest.raises(RawLayoutError, match=r"cityscapes-dataset\.com.*gtFine_trainvaltest\.zip"):
        build_dataset(config("cityscapes27", tmp_path, 32), "train")
    with pytest.raises(RawLayoutError, match=r"potsdam\.zip"):
        build_dataset(config("potsdam3", tmp_path, 32), "val")
    with pytest.raises(ValueError, match=r"unknown dataset.*cityscapes27.*synthetic"):
        build_dataset(config("voc", tmp_path, 32), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(config("cocostuff27", tmp_path / "nope", 32), "train")


def test_prepare_cli_five_crop_roundtrip(tmp_path, capsys):
    root = make_coco(tmp_path / "cocostuff")
    out = tmp_path / "prepared"
    assert prepare.main(["cocostuff27", "--source", str(root), "--out", str(out), "--num-workers", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "cocostuff27" and manifest["crop"] == "five" and manifest["ratio"] == 0.5
    # train is five-cropped (3 images x 5); val stays uncropped, as the official evaluation reads it
    assert manifest["splits"]["train"]["count"] == 15 and manifest["splits"]["val"]["count"] == 2
    assert manifest["splits"]["train"]["crop"] == "five" and manifest["splits"]["val"]["crop"] is None
    assert manifest["class_names"][23] == "sky"
    src = prepared.PreparedSource(str(out), "train")
    with open(root / "curated/train2017/Coco164kFull_Stuff_Coarse.txt") as f:
        ids = f.read().split()
    names = ["tl", "tr", "bl", "br", "center"]
    for i, image_id in enumerate(ids):
        full = np.asarray(Image.open(f"{root}/images/train2017/{image_id}.jpg").convert("RGB"))
        fine = np.asarray(Image.open(f"{root}/annotations/train2017/{image_id}.png"))
        h, w = fine.shape
        ch, cw = int(h * 0.5), int(w * 0.5)
        boxes = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw),
                 (int(round((h - ch) / 2)), int(round((w - cw) / 2)))]
        for c, (top, left) in enumerate(boxes):
            rec = src.record(5 * i + c)
            assert rec["id"] == f"{image_id}/{names[c]}" and src.ids[5 * i + c] == rec["id"]
            want_img = full[top:top + ch, left:left + cw]
            buf = io.BytesIO()
            Image.fromarray(want_img).save(buf, "JPEG", quality=75)  # official: PIL JPEG, default quality
            assert rec["image"] == buf.getvalue()
            stored = np.asarray(Image.open(io.BytesIO(rec["label"])))
            want_lab = np.vectorize(lambda v: COCO_FINE_SAMPLE.get(int(v), -1))(fine[top:top + ch, left:left + cw])
            np.testing.assert_array_equal(stored, want_lab + 1)  # stored as label + 1, 0 = ignore
            img, lab = src.load(5 * i + c)
            np.testing.assert_array_equal(lab, want_lab)
            assert np.abs(img.astype(int) - want_img).mean() < 4  # JPEG round trip of smooth content
    # build_dataset reads the prepared directory, and agrees with on-the-fly five-crops on labels
    ds = build_dataset(config("cocostuff27", out, 16, crop_type="five"), "train")
    raw = build_dataset(config("cocostuff27", root, 16, crop_type="five"), "train")
    assert ds.ids == raw.ids and len(ds) == 15
    for k in range(15):
        np.testing.assert_array_equal(ds[k]["label"], raw[k]["label"])
    with pytest.raises(ValueError, match="crop_type"):
        build_dataset(config("cocostuff27", out, 16, crop_type=None), "train")


def test_prepare_no_crop_is_lossless(tmp_path):
    root = make_potsdam(tmp_path / "potsdam")
    out = tmp_path / "p"
    assert prepare.main(["potsdam3", "--source", str(root), "--out", str(out), "--crop", "none"]) == 0
    ds = build_dataset(config("potsdam3", out, 40), "val")
    raw = build_dataset(config("potsdam3", root, 40), "val")
    assert ds.ids == raw.ids == ["1"]
    np.testing.assert_array_equal(ds[0]["image"], raw[0]["image"])
    np.testing.assert_array_equal(ds[0]["label"], raw[0]["label"])
    assert prepared.PreparedSource(str(out), "val").record(0)["image"][:8] == b"\x89PNG\r\n\x1a\n"


def test_prepare_missing_files_actionable(tmp_path, capsys):
    root = make_coco(tmp_path / "cocostuff")
    with open(root / "curated/train2017/Coco164kFull_Stuff_Coarse.txt") as f:
        first = f.read().split()[0]
    os.remove(f"{root}/images/train2017/{first}.jpg")
    out = tmp_path / "prepared"
    assert prepare.main(["cocostuff27", "--source", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"images/train2017/{first}.jpg" in err and "cocostuff.zip" in err and "--skip-corrupt" in err
    assert not (out / "manifest.json").exists()  # nothing written for an incomplete download
    assert prepare.main(["cocostuff27", "--source", str(root), "--out", str(out), "--skip-corrupt"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 10
    assert manifest["splits"]["train"]["skipped"] == [f"{root}/images/train2017/{first}.jpg"]


def save_with_orientation(path, arr, orientation):
    """`arr` stored as-is with an EXIF orientation tag (how cameras save a turned photo)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif)


# What a viewer shows for each EXIF orientation of the stored pixels `a` (the EXIF 2.3 definitions).
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, -1)[::-1],
           8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_rgb_applies_exif_orientation(tmp_path, orientation):
    stored = smooth_image(12, 20, 3)
    path = str(tmp_path / "photo.png")
    save_with_orientation(path, stored, orientation)
    np.testing.assert_array_equal(read_rgb(path), UPRIGHT[orientation](stored))


@pytest.mark.parametrize("orientation", [3, 6, 7])
def test_labels_turn_with_their_exif_oriented_image(tmp_path, orientation):
    """A labelled image with an EXIF orientation: image and label are turned alike, so every pixel keeps its
    class (the label file is on the stored pixel grid)."""
    root = tmp_path / "mine"
    stored = smooth_image(30, 40, 2)
    label = (stored[..., 0] > 128).astype(np.uint8) + 2 * (np.arange(40)[None, :] > 30)
    save_with_orientation(f"{root}/imgs/train/a.png", stored, orientation)
    save_img(f"{root}/labels/train/a.png", label.astype(np.uint8))
    ds = build_dataset(config("image_folder", root, 24), "train")
    image, lab = ds.source.load(0)
    np.testing.assert_array_equal(image, UPRIGHT[orientation](stored))
    np.testing.assert_array_equal(lab, UPRIGHT[orientation](label))
    item = ds[0]  # the whole transform works on the aligned pair
    assert item["image"].shape == (24, 24, 3) and item["label"].shape == (24, 24)


def test_image_size_reads_the_header_upright_and_refuses_bombs(tmp_path, monkeypatch):
    path = str(tmp_path / "p.png")
    save_with_orientation(path, smooth_image(12, 20, 0), 6)
    assert image_size(path) == (20, 12) == read_rgb(path).shape[:2]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 240 pixels > 2 x 50: a decompression bomb
    for reader in (image_size, read_rgb):
        with pytest.raises(CorruptFileError, match="p.png.*DecompressionBomb"):
            reader(path)


def test_label_values_beyond_n_classes_warn_once(tmp_path, caplog):
    root = tmp_path / "mine"
    for k, stem in enumerate("abc"):
        save_img(f"{root}/imgs/val/{stem}.png", smooth_image(20, 20, k))
        lab = np.full((20, 20), k, np.uint8)
        lab[5:15, 5:15] = 255 if stem != "a" else 1  # 255: a common "ignore" value, not a class id here
        save_img(f"{root}/labels/val/{stem}.png", lab)
    ds = build_dataset(config("image_folder", root, 16, n_classes=5), "val")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            for i in range(len(ds)):
                ds[i]
    warned = [r.getMessage() for r in caplog.records if "n_classes" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "image_folder" in warned[0] and "split val" in warned[0] and "255" in warned[0]
    assert "n_classes=5" in warned[0] and "b.png" in warned[0]
    caplog.clear()
    ds = build_dataset(config("image_folder", root, 16, n_classes=256), "val")
    with caplog.at_level(logging.WARNING):
        [ds[i] for i in range(len(ds))]
    assert not [r for r in caplog.records if "n_classes" in r.getMessage()]


def test_skip_corrupt_counts_each_validation_image_once(tmp_path, caplog):
    """Validation never stands in another image for an unreadable one: that image would be counted twice.
    The unreadable item has all labels ignored; training still replaces it by the next readable item."""
    root = make_coco(tmp_path / "cocostuff", n_train=3, n_val=3)
    cfg = config("cocostuff27", root, 32)
    cfg.data.skip_corrupt = True
    good = build_dataset(cfg, "val")
    readable = [good[i] for i in range(len(good))]
    for split, subdir in (("val", "val2017"), ("train", "train2017")):
        ds = build_dataset(cfg, split)
        with open(f"{root}/images/{subdir}/{ds.ids[1]}.jpg", "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    val = build_dataset(cfg, "val")
    with caplog.at_level(logging.WARNING):
        items = [val[i] for i in range(len(val))]
    assert [it["id"] for it in items] == val.ids  # each image once, in order
    assert (items[1]["label"] == -1).all()  # the unreadable one counts nothing
    for k in (0, 2):
        np.testing.assert_array_equal(items[k]["label"], readable[k]["label"])
        np.testing.assert_array_equal(items[k]["image"], readable[k]["image"])
    counted = sum(int((it["label"] >= 0).sum()) for it in items)
    assert counted == sum(int((readable[k]["label"] >= 0).sum()) for k in (0, 2))
    assert val.skipped == 1
    train = build_dataset(cfg, "train")
    assert train[1]["id"] == train.ids[2]  # training: replaced by the next readable item


def test_has_labels_tells_unlabelled_training_data(tmp_path):
    root = tmp_path / "mine"
    save_img(f"{root}/imgs/train/a.png", smooth_image(20, 20, 0))
    assert build_dataset(config("image_folder", root, 16), "train").has_labels is False
    save_img(f"{root}/labels/train/a.png", np.zeros((20, 20), np.uint8))
    assert build_dataset(config("image_folder", root, 16), "train").has_labels is True
    coco = make_coco(tmp_path / "cocostuff")
    assert build_dataset(config("cocostuff27", coco, 16), "train").has_labels is True
    unlabelled = tmp_path / "unlabelled"
    save_img(f"{unlabelled}/imgs/train/a.png", smooth_image(20, 20, 0))
    for src_root, want in ((unlabelled, False), (root, True)):
        out = tmp_path / f"prepared_{want}"
        prepared.write_split(sources.image_folder_source(str(src_root), "train"), str(out), "train", crop=None,
                             dataset="image_folder")
        assert build_dataset(config("image_folder", out, 16), "train").has_labels is want
