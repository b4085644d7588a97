"""evaluate.py and predict.py end to end on a tiny trained demo run."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from stego_jax import checkpoints, evaluate, featurize, metrics, model, predict, train
from tests.test_train import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("run"))
    cfg = tiny_config(num_steps=6)
    result = train.train_and_evaluate(cfg, d)
    return d, cfg, result


def test_evaluate_writes_tables_consistent_with_confusions(run):
    d, cfg, result = run
    out = os.path.join(d, "eval")
    res = evaluate.evaluate(cfg, d, out_dir=out, quiet=True)
    for f in ("results.md", "results.json", "results.csv", "confusion_linear.png"):
        assert os.path.exists(os.path.join(out, f)), f
    overlays = sorted(os.listdir(os.path.join(out, "overlays")))
    assert len(overlays) == min(cfg.eval.num_overlays, cfg.data.n_val)
    panel = np.asarray(Image.open(os.path.join(out, "overlays", overlays[0])))
    assert panel.shape == (cfg.eval.res, 5 * cfg.eval.res, 3)  # image, truth, cluster, k-means, linear
    saved = json.load(open(os.path.join(out, "results.json")))
    assert set(saved["results"]) == {"cluster", "linear", "kmeans"}
    for k, r in res.items():
        assert 0 <= r["mIoU"] <= 100 and 0 <= r["Accuracy"] <= 100
        # mIoU is the mean of the non-NaN per-class IoUs written to the table
        iou = np.array(r["iou"], dtype=float)
        assert r["mIoU"] == pytest.approx(np.nanmean(iou))
    md = open(os.path.join(out, "results.md")).read()
    assert f"| cluster | {res['cluster']['Accuracy']:.2f} | {res['cluster']['mIoU']:.2f} |" in md
    # the evaluated checkpoint is named: the run's best (the one step kept under best/)
    best = [int(n) for n in os.listdir(os.path.join(d, "best")) if n.isdigit()]
    assert len(best) == 1
    assert saved["checkpoint"] == {"step": best[0], "which": "best"}
    assert f"Checkpoint: step {best[0]} (the best checkpoint" in md
    assert res["linear"]["trained"] is True and "not trained" not in md


def test_evaluate_marks_linear_probe_not_trained_without_training_labels(run, tmp_path):
    """A run whose training images have no labels (an image folder without labels/): its linear probe never
    saw a label, so the tables say "not trained" instead of its numbers."""
    d, cfg, _ = run
    root = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "imgs" / split).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(root / "imgs" / split / f"{i}.png")
    (root / "labels" / "val").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, cfg.data.n_classes, (32, 32), np.uint8)).save(
            root / "labels" / "val" / f"{i}.png")
    cfg = cfg.copy_and_resolve_references()
    cfg.data.name, cfg.data.root = "image_folder", str(root)
    cfg.eval.flip = False
    # The run's config.json is what a run was trained on (evaluate refuses a config that changes its
    # data): make a copy of the run that says it was trained on this folder.
    shutil.copytree(d, tmp_path / "run")
    d = str(tmp_path / "run")
    saved_cfg = json.load(open(os.path.join(d, "config.json")))
    saved_cfg["data"].update(name="image_folder", root=str(root))
    json.dump(saved_cfg, open(os.path.join(d, "config.json"), "w"))
    out = tmp_path / "eval"
    res = evaluate.evaluate(cfg, d, out_dir=str(out), quiet=True)
    assert res["linear"]["trained"] is False and "trained" not in res["cluster"]
    saved = json.load(open(out / "results.json"))
    assert saved["results"]["linear"]["trained"] is False
    md = (out / "results.md").read_text()
    assert (f"| cluster | {res['cluster']['Accuracy']:.2f} | {res['cluster']['mIoU']:.2f} | not trained | "
            f"not trained |") in md
    assert "the training split has no labels" in md
    assert "not trained" in (out / "results.csv").read_text()
    assert not (out / "confusion_linear.png").exists()


def reference_cluster_cos(d, cfg):
    """The validation images, labels and cluster-probe cosines [N,H,W,K] computed by hand (no flip),
    independently of evaluate.py's batching, padding and jitted helpers."""
    import jax.numpy as jnp

    from stego_jax import ops
    from stego_jax.data import build_dataset
    from stego_jax.data.transforms import normalize

    featurizer = featurize.run_featurizer(cfg, d)
    params = checkpoints.restore_params(d, cfg, featurizer.dim)
    head, cluster, _ = model.build_modules(cfg)
    ds = build_dataset(evaluate.eval_config(cfg), "val")
    imgs = np.stack([ds[i]["image"] for i in range(len(ds))])
    labs = np.stack([ds[i]["label"] for i in range(len(ds))])
    c = head.apply({"params": params["head"]}, featurizer(jnp.asarray(normalize(imgs))), train=False)[1]
    cos = cluster.apply({"params": params["cluster_probe"]}, ops.upsample_bilinear(c, labs.shape[1:3]))
    return imgs, labs, np.asarray(cos)


def test_evaluate_cluster_metric_matches_independent_recomputation(run):
    """Recompute the cluster-probe predictions by hand (no flip) and compare with evaluate's."""
    d, cfg, result = run
    cfg = cfg.copy_and_resolve_references()
    cfg.eval.flip = False
    res = evaluate.evaluate(cfg, d, out_dir=os.path.join(d, "eval_noflip"), quiet=True)
    _, labs, cos = reference_cluster_cos(d, cfg)
    ref = metrics.scores(cos.argmax(-1), labs, cfg.data.n_classes)
    assert res["cluster"]["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-6)
    assert res["cluster"]["Accuracy"] == pytest.approx(ref["Accuracy"], abs=1e-6)


def test_predict_folder_with_corrupt_file_and_odd_sizes(run, tmp_path, capsys):
    d, cfg, _ = run
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 57, 3), np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 48), np.uint8), mode="L").save(images / "b_gray.jpg")
    Image.fromarray(rng.integers(0, 255, (33, 33, 4), np.uint8), mode="RGBA").save(images / "c_rgba.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    out = tmp_path / "out"
    code = predict.main(["--workdir", d, "--images", str(images), "--out", str(out), "--nocrf"])
    assert code == 2  # an input failed
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 of 4 images failed: broken.jpg" in err
    summary = json.load(open(out / "summary.json"))
    assert len(summary["written"]) == 3 and list(summary["failed"]) == [str(images / "broken.jpg")]
    for stem, shape in (("a", (40, 57)), ("b_gray", (64, 48)), ("c_rgba", (33, 33))):
        lab = Image.open(out / "labels" / f"{stem}.png")
        assert lab.mode == "P" and lab.size == (shape[1], shape[0])
        values = np.unique(np.asarray(lab))
        assert set(values.tolist()) <= set(range(cfg.data.n_classes + cfg.model.extra_clusters)) | {255}
        ov = Image.open(out / "overlays" / f"{stem}.png")
        assert ov.size[0] == shape[1] and ov.size[1] > shape[0]  # legend below the image


def test_predict_working_size_caps_the_long_side_and_names_stay_unique():
    assert predict.working_size(300, 400, 96, 8) == (96, 128)  # short side -> res
    assert predict.working_size(100, 1000, 96, 8) == (32, 384)  # long side capped at 4 * res
    assert predict.working_size(2, 3000, 96, 8) == (8, 384)
    files = ["d/x.jpg", "d/x.png", "d/y.png", "d/x.y.png"]
    assert predict.output_names(files) == {"d/x.jpg": "x.jpg", "d/x.png": "x.png", "d/y.png": "y",
                                           "d/x.y.png": "x.y"}


def test_predict_help_states_the_caps(capsys):
    assert predict.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "4 * eval.res" in out and "8:1" in out and "x.jpg.png" in out and "Exit status 2" in out


def test_predict_bounded_work_orientation_16bit_and_unique_names(run, tmp_path, capsys, monkeypatch):
    """Each image costs bounded work; the ones beyond the caps are reported and skipped, the rest written;
    16-bit grey is read at its full range; EXIF orientation is applied; outputs never overwrite each other."""
    d, cfg, _ = run
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (2, 3000, 3), np.uint8)).save(images / "strip.png")  # 1500:1
    Image.fromarray(rng.integers(0, 255, (10, 60, 3), np.uint8)).save(images / "wide.png")  # 6:1, long side capped
    Image.fromarray(rng.integers(0, 255, (300, 300, 3), np.uint8)).save(images / "bomb.png")
    Image.fromarray(rng.integers(0, 255, (40, 57, 3), np.uint8)).save(images / "x.png")
    Image.fromarray(rng.integers(0, 255, (40, 57, 3), np.uint8)).save(images / "x.jpg")
    grey = rng.integers(0, 255, (48, 40), np.uint8)
    Image.fromarray(grey).save(images / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(images / "g16.png")  # 16-bit grey, same picture
    assert Image.open(images / "g16.png").mode.startswith("I")
    stored = rng.integers(0, 255, (24, 40, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(stored).save(images / "turned.png", exif=exif)
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, -1))).save(images / "upright.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # bomb.png's 90 000 pixels are over twice that
    out = tmp_path / "out"
    code = predict.main(["--workdir", d, "--images", str(images), "--out", str(out), "--nocrf"])
    err = capsys.readouterr().err
    assert code == 2
    assert "2 of 9 images failed: bomb.png, strip.png" in err
    assert "DecompressionBomb" in err and "8:1" in err
    summary = json.load(open(out / "summary.json"))
    assert sorted(summary["failed"]) == [str(images / "bomb.png"), str(images / "strip.png")]
    assert len(summary["written"]) == 7
    assert summary["outputs"][str(images / "x.jpg")] == "x.jpg.png"
    assert summary["outputs"][str(images / "x.png")] == "x.png.png"
    assert summary["outputs"][str(images / "wide.png")] == "wide.png"

    def labels(name):
        return np.asarray(Image.open(out / "labels" / name))

    assert labels("wide.png").shape == (10, 60)
    assert labels("x.jpg.png").shape == labels("x.png.png").shape == (40, 57)
    np.testing.assert_array_equal(labels("g16.png"), labels("g8.png"))
    assert labels("turned.png").shape == (40, 24)
    np.testing.assert_array_equal(labels("turned.png"), labels("upright.png"))


def test_predict_missing_run_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        predict.predict_folder(str(tmp_path), str(tmp_path), str(tmp_path / "o"), quiet=True)


def test_evaluate_with_crf_matches_per_image_crf(run):
    """The CRF rows: evaluate's cluster+crf confusion equals CRF'ing each image's cluster logits."""
    from stego_jax import crf

    d, cfg, _ = run
    cfg = cfg.copy_and_resolve_references()
    cfg.eval.crf = True
    cfg.eval.flip = False
    cfg.eval.num_overlays = 1
    res = evaluate.evaluate(cfg, d, out_dir=os.path.join(d, "eval_crf"), quiet=True)
    assert {"cluster+crf", "linear+crf"} <= set(res)
    imgs, labs, cos = reference_cluster_cos(d, cfg)
    rgb = crf.official_rgb(imgs)  # the image the official CRF sees
    preds = np.stack([np.asarray(crf.dense_crf(rgb[i], 2.0 * cos[i])).argmax(-1) for i in range(len(imgs))])
    ref = metrics.scores(preds, labs, cfg.data.n_classes)
    assert res["cluster+crf"]["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-6)
    assert res["cluster+crf"]["Accuracy"] == pytest.approx(ref["Accuracy"], abs=1e-6)
