"""The training program: sharded == single device, exact resume, NaN guard, config and workdir
errors, no retracing, TensorBoard/JSON outputs."""

import json
import os

import jax
import numpy as np
import pytest

from stego_jax import checkpoints, feature_sources, model, steps, train, writers
from stego_jax.config import load_config_file, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    c = load_config_file(os.path.join(ROOT, "configs", "demo.py"))
    c.num_steps = 6
    c.batch_size = 8
    c.data.n_train = 48
    c.data.n_val = 8
    c.data.size = 32
    c.data.res = 32
    c.model.dim = 8
    c.loss.feature_samples = 3
    c.loss.neg_samples = 2
    c.knn.k = 6
    c.knn.num_neighbors = 3
    c.log_every = 3
    c.eval_every = 3
    c.checkpoint_every = 3
    c.eval.res = 32
    c.eval.batch_size = 8
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for part in path:
            node = node[part]
        node[last] = v
    return c


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """6 uninterrupted steps on all 8 simulated devices."""
    d = str(tmp_path_factory.mktemp("ref"))
    return d, train.train_and_evaluate(tiny_config(), d)


def test_outputs_written(reference_run):
    d, result = reference_run
    assert result["step"] == 6
    assert set(os.listdir(os.path.join(d, "checkpoints"))) >= {"3", "6"}
    assert os.listdir(os.path.join(d, "best"))
    rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 6]
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert any("val/cluster/mIoU" in r for r in rows)
    events = [f for f in os.listdir(os.path.join(d, "tb")) if f.startswith("events.out.tfevents")]
    assert events
    raw = open(os.path.join(d, "tb", events[0]), "rb").read()
    for tag in (b"train/loss", b"val/cluster/mIoU", b"val/segmentation_truth_cluster_linear"):
        assert tag in raw, tag  # scalars and the segmentation preview image were written
    assert b"\x89PNG" in raw  # the image summary is an encoded PNG
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["num_steps"] == 6 and cfg["model"]["dim"] == 8


def test_sharded_equals_single_device(reference_run, tmp_path):
    assert jax.device_count() == 8
    _, ref = reference_run
    one = train.train_and_evaluate(tiny_config(), str(tmp_path), devices=jax.devices()[:1])
    for a, b in zip(leaves(ref["params"]), leaves(one["params"])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    # and training moved the parameters at all (the comparison above is not vacuous)
    init = model.init_params(tiny_config(), 46, jax.random.split(jax.random.key(0))[0])
    moved = [np.abs(a - b).max() for a, b in zip(leaves(init["head"]), leaves(ref["params"]["head"]))]
    assert max(moved) > 1e-3


def test_kill_and_resume_is_exact(reference_run, tmp_path, monkeypatch):
    _, ref = reference_run
    real_batch = feature_sources.CachedFeatures.batch
    calls = {"n": 0}

    def dying_batch(self, step):
        if step == 4 and calls["n"] == 0:  # the process "dies" while fetching step 5
            calls["n"] += 1
            raise KeyboardInterrupt("killed")
        return real_batch(self, step)

    monkeypatch.setattr(feature_sources.CachedFeatures, "batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny_config(), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    resumed = train.train_and_evaluate(tiny_config(), str(tmp_path))
    assert resumed["step"] == 6
    for a, b in zip(leaves(ref["params"]), leaves(resumed["params"])):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_batch = feature_sources.CachedFeatures.batch

    def poisoned(self, step):
        b = real_batch(self, step)
        if step >= 4:
            b["feats"] = b["feats"] * np.nan
        return b

    monkeypatch.setattr(feature_sources.CachedFeatures, "batch", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 5.*step 3.*intact"):
        train.train_and_evaluate(tiny_config(), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
    params = checkpoints.restore_params(str(tmp_path), tiny_config(), 46, which="last")
    assert all(np.isfinite(x).all() for x in leaves(params))


def test_train_step_traced_once(tmp_path, monkeypatch):
    traces = {"n": 0}
    real = steps.train_step

    def counting(*args, **kwargs):
        traces["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "train_step", counting)
    train.train_and_evaluate(tiny_config(num_steps=5, checkpoint_every=5, eval_every=5), str(tmp_path))
    assert traces["n"] == 1


@pytest.mark.parametrize("field,value,message", [
    ("model.projection", "mlp", r"config.model.projection='mlp'.*\['linear', 'nonlinear'\]"),
    ("model.featurizer", "resnet", r"config.model.featurizer='resnet'.*'descriptor'"),
    ("batch_size", 1, r"batch_size must be >= 2"),
    ("num_steps", 0, r"config.num_steps=0 must be a positive integer"),
    ("data.name", "voc", r"config.data.name='voc'.*'cocostuff27'"),
    ("eval.crf_processes", -1, r"config.eval.crf_processes=-1 must be an integer >= 0"),
])
def test_bad_config_names_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        validate(tiny_config(**{field: value}))


def test_batch_not_divisible_by_devices(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size=12 must be a multiple of the device count \(8\)"):
        train.train_and_evaluate(tiny_config(batch_size=12), str(tmp_path))


def test_unwritable_workdir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a file instead
            blocker = tmp_path / "file"
            blocker.write_text("x")
            target = str(blocker / "run")
        else:
            target = str(ro / "run")
        with pytest.raises(PermissionError, match="cannot write to workdir.*choose a writable --workdir"):
            train.train_and_evaluate(tiny_config(), target)
    finally:
        os.chmod(ro, 0o700)


def test_eta_of_the_progress_lines():
    """The ETA that training's and the sweep's progress lines print: steps left / rate, as H:M:S."""
    assert writers.eta(50, 2.0) == "00:00:25"
    assert writers.eta(7200, 1.0) == "02:00:00"
    assert writers.eta(10, float("nan")) == "--:--:--"
    assert writers.eta(10, 0.0) == "--:--:--"
