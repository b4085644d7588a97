"""Released STEGO checkpoints: torch-free import of official Lightning .ckpt files, predictions equal to
the official code's, hostile files refused, evaluate and predict on an imported run.

The fixtures were written with the official code by tests/fixtures/make_official_ckpt_fixture.py."""

import json
import os
import pickle
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
from PIL import Image

from stego_jax import evaluate, official, predict
from stego_jax.weights import CheckpointError, load_torch_checkpoint

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
PL15 = os.path.join(FIX, "official_tiny_pl15.ckpt")  # Lightning 1.5 layout, zip; width 64, 1 head
PL14 = os.path.join(FIX, "official_tiny_pl14.ckpt")  # Lightning <= 1.4 layout, legacy; width 32, 2 heads
PREDS = os.path.join(FIX, "official_tiny_preds.npz")
NEAR_TIE = 1e-3  # top-1 minus top-2 log probability below which the official argmax is a near tie


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    out = {}
    for name, path, heads in (("pl15", PL15, None), ("pl14", PL14, 2)):
        w = str(root / name)
        official.import_checkpoint(path, w, num_heads=heads)
        out[name] = w
    return out


def test_both_lightning_layouts_load_as_plain_data():
    for path, key in ((PL15, "ModelCheckpoint{'monitor'"),
                      (PL14, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")):
        ckpt = load_torch_checkpoint(path)
        assert {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "callbacks",
                "optimizer_states", "lr_schedulers", "hparams_name", "hyper_parameters"} <= set(ckpt)
        cfg = ckpt["hyper_parameters"]["cfg"]
        assert type(cfg) is dict and cfg["arch"] == "dino" and cfg["dino_feat_type"] == "feat"
        (cb,) = ckpt["callbacks"]
        assert isinstance(cb, str) and cb.startswith(key)


def test_import_writes_an_ordinary_run(runs):
    cfg15 = json.load(open(os.path.join(runs["pl15"], "config.json")))
    assert cfg15["data"]["name"] == "cocostuff27" and cfg15["data"]["n_classes"] == 27
    assert {"backbone": "backbone.npz", "num_heads": 1, "patch_size": 8, "dim": 16,
            "projection": "nonlinear", "extra_clusters": 0}.items() <= cfg15["model"].items()
    cfg14 = json.load(open(os.path.join(runs["pl14"], "config.json")))
    assert cfg14["data"]["name"] == "potsdam3" and cfg14["data"]["n_classes"] == 3
    assert {"num_heads": 2, "patch_size": 16, "dim": 8, "projection": "linear",
            "extra_clusters": 1}.items() <= cfg14["model"].items()
    for w in runs.values():
        for f in ("backbone.npz", "official.json", "checksums/checkpoints/400.json", "checkpoints/400"):
            assert os.path.exists(os.path.join(w, f)), f
    info = json.load(open(os.path.join(runs["pl14"], "official.json")))
    assert info["pytorch-lightning_version"] == "1.4.9" and info["vit"]["embed_dim"] == 32
    # the head and probes are the checkpoint's tensors (1x1 convolutions as Dense kernels)
    sd = load_torch_checkpoint(PL15)["state_dict"]
    params = predict.Segmenter(runs["pl15"]).params
    np.testing.assert_array_equal(np.asarray(params["head"]["nonlinear_1"]["kernel"]),
                                  sd["net.cluster2.2.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(np.asarray(params["cluster_probe"]["clusters"]), sd["cluster_probe.clusters"])
    np.testing.assert_array_equal(np.asarray(params["linear_probe"]["dense"]["bias"]), sd["linear_probe.bias"])


def test_import_refuses_an_existing_run_and_a_wrong_head_count(runs, tmp_path):
    with pytest.raises(FileExistsError, match="already holds a run"):
        official.import_checkpoint(PL15, runs["pl15"])
    with pytest.raises(CheckpointError, match="not divisible by num_heads=3"):
        official.import_checkpoint(PL14, str(tmp_path / "w"), num_heads=3)


@pytest.mark.parametrize("name", ["pl15", "pl14"])
@pytest.mark.parametrize("crf", [False, True])
def test_predictions_equal_the_official_code(runs, name, crf):
    ref = np.load(PREDS)
    out = predict.segment(runs[name], ref["images"], crf=crf)
    suffix = "_crf" if crf else ""
    for probe in ("cluster", "linear"):
        want = ref[f"official_tiny_{name}/{probe}{suffix}"]
        margin = ref[f"official_tiny_{name}/{probe}{suffix}_margin"].astype(np.float32)
        assert out[probe].dtype == np.int32 and out[probe].shape == want.shape
        far = margin > NEAR_TIE
        assert far.mean() > 0.99
        agree = (out[probe] == want)[far].mean()
        assert agree >= 0.999, (probe, crf, agree)


def _zip_ckpt(path, payload: bytes) -> None:
    """A zip .ckpt as torch.save writes it, holding the pickle `payload`."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


def test_a_hostile_checkpoint_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = tmp_path / "hostile.ckpt"
    _zip_ckpt(hostile, pickle.dumps({"state_dict": {}, "hyper_parameters": {"cfg": Payload()}}, protocol=2))
    with pytest.raises(CheckpointError, match=r"wants to call (posix|os)\.system"):
        official.import_checkpoint(str(hostile), str(tmp_path / "w"))
    assert official.main([str(hostile), "--workdir", str(tmp_path / "w2")]) == 1
    assert "system, which is not allowed" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "w" / "config.json").exists()

    # The allowed omegaconf / dict stand-ins cannot be turned into calls with arguments.
    hp = b"\x80\x02}q\x00X\x03\x00\x00\x00cfgq\x01"
    dict_with_args = hp + b"c__builtin__\ndict\nq\x02]q\x03\x85q\x04Rq\x05s."
    newobj_with_args = hp + b"comegaconf.dictconfig\nDictConfig\nq\x02K\x01\x85q\x03\x81q\x04s."
    any_called = hp + b"ctyping\nAny\nq\x02)Rq\x03s."
    for i, payload in enumerate((dict_with_args, newobj_with_args, any_called)):
        f = tmp_path / f"bad{i}.ckpt"
        _zip_ckpt(f, payload)
        with pytest.raises(CheckpointError):
            load_torch_checkpoint(f)


def test_refuses_a_plain_state_dict_naming_what_is_missing(tmp_path):
    f = tmp_path / "sd.ckpt"
    _zip_ckpt(f, pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="not a PyTorch Lightning checkpoint"):
        official.import_checkpoint(str(f), str(tmp_path / "w"))


def test_released_registry_names_the_official_files():
    assert sorted(official.RELEASED) == ["cityscapes_vit_base_1", "cocostuff27_vit_base_5", "potsdam_test"]
    assert official.RELEASED["potsdam_test"].url() == (
        "https://marhamilresearch4.blob.core.windows.net/stego-public/saved_models/potsdam_test.ckpt")


def test_evaluate_and_predict_run_on_an_imported_checkpoint(runs, tmp_path, capsys):
    # The command line imports too.
    w = str(tmp_path / "run")
    assert official.main([PL14, "--workdir", w, "--num_heads", "2", "--data_root", "somewhere"]) == 0
    assert "imported" in capsys.readouterr().out
    # An image folder with 3-class labels stands in for Potsdam: say so in the run's config.json.
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    imgs = np.load(PREDS)["images"]
    for split in ("train", "val"):
        (root / "imgs" / split).mkdir(parents=True)
        for i, img in enumerate(imgs):
            Image.fromarray(img).save(root / "imgs" / split / f"{i}.png")
    (root / "labels" / "val").mkdir(parents=True)
    for i in range(len(imgs)):
        Image.fromarray(rng.integers(0, 3, imgs.shape[1:3], np.uint8)).save(root / "labels" / "val" / f"{i}.png")
    saved = json.load(open(os.path.join(w, "config.json")))
    saved["data"].update(name="image_folder", root=str(root))
    saved["eval"].update(res=48, crf=False, kmeans_restarts=1, num_overlays=1, batch_size=4)
    json.dump(saved, open(os.path.join(w, "config.json"), "w"))
    out = tmp_path / "eval"
    res = evaluate.evaluate(None, w, out_dir=str(out), quiet=True)
    assert set(res) == {"cluster", "linear", "kmeans"}
    assert json.load(open(out / "results.json"))["checkpoint"] == {"step": 400, "which": "last"}
    # predict, from another working directory (the backbone is found in the run directory)
    images = tmp_path / "images"
    shutil.copytree(root / "imgs" / "val", images)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        summary = predict.predict_folder(w, str(images), str(tmp_path / "pred"), crf=False, quiet=True)
    finally:
        os.chdir(cwd)
    assert len(summary["written"]) == len(imgs) and not summary["failed"]
    labels = np.asarray(Image.open(tmp_path / "pred" / "labels" / "0.png"))
    assert labels.shape == imgs.shape[1:3]


def test_reproduce_released_dry_run_prints_import_and_evaluate(tmp_path):
    script = os.path.join(os.path.dirname(FIX), "..", "experiments", "reproduce_released.sh")
    p = subprocess.run(["bash", script, "potsdam3", "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "DATA_DIR": "d", "WORKDIR": "w", "PYTHON": "py"})
    assert p.returncode == 0, p.stderr
    assert f"+ py -m stego_jax.official potsdam_test --workdir {tmp_path}/w --data_root={tmp_path}/d" in p.stdout
    assert f"+ py -m stego_jax.evaluate --workdir {tmp_path}/w" in p.stdout
    assert "| potsdam_test.ckpt, official eval script | 77.03 | 62.57 | 85.85 | 74.83 |" in p.stdout
    bad = subprocess.run(["bash", script, "voc"], capture_output=True, text=True)
    assert bad.returncode == 2 and "DATASET must be" in bad.stderr
