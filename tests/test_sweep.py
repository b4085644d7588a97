"""Sweeps: each setting of a stacked, vmapped sweep equals the single training run of its config;
grid and sample parsing, refusal of fields that change the program, the memory check, resume
after a kill, and export of a setting as a run that evaluation takes as it is."""

import json
import os

import jax
import numpy as np
import pytest

from stego_jax import checkpoints, evaluate, sweep, train

from .test_train import ROOT, tiny_config

STEPS = 50


def config(**kw):
    base = dict(num_steps=STEPS, log_every=10, eval_every=25, checkpoint_every=25)
    base.update(kw)
    return tiny_config(**base)


SPECS = ["loss.pos_intra_shift=0.08,0.28", "optim.lr=5e-4,1e-3", "seed=0,1"]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """8 settings (a shift x a learning rate x a seed), 50 steps, one device."""
    d = str(tmp_path_factory.mktemp("sweep"))
    cfg = config()
    settings = sweep.make_settings(cfg, SPECS)
    return d, cfg, settings, sweep.train_sweep(cfg, d, settings, devices=jax.devices()[:1], quiet=True)


# ---------------------------------------------------------------------------- parsing

def test_grid_is_the_product_in_order():
    s = sweep.make_settings(config(), ["loss.pos_intra_shift=0.08,0.18,0.28", "seed=0,1,2,3"])
    assert len(s) == 12
    assert s[0] == {"loss.pos_intra_shift": 0.08, "seed": 0}
    assert s[5] == {"loss.pos_intra_shift": 0.18, "seed": 1}
    assert all(isinstance(x["seed"], int) for x in s)


def test_sample_draws_from_ranges_seeded():
    specs = ["loss.neg_inter_shift=0.3:0.8", "optim.lr=1e-4:1e-2:log", "seed=0:5", "loss.pos_inter_weight=0.1,0.2"]
    a = sweep.make_settings(config(), specs, sample=20, sample_seed=3)
    b = sweep.make_settings(config(), specs, sample=20, sample_seed=3)
    c = sweep.make_settings(config(), specs, sample=20, sample_seed=4)
    assert a == b and a != c and len(a) == 20
    for s in a:
        assert 0.3 <= s["loss.neg_inter_shift"] < 0.8
        assert 1e-4 <= s["optim.lr"] < 1e-2
        assert s["seed"] in range(5) and s["loss.pos_inter_weight"] in (0.1, 0.2)
    lrs = np.log10([s["optim.lr"] for s in a])
    assert lrs.min() < -3 < lrs.max()  # log-uniform: both decades are visited


@pytest.mark.parametrize("spec", ["model.dim=8,16", "loss.feature_samples=3,5", "batch_size=8,16",
                                  "model.backbone=a,b", "config.loss.neg_samples=2,3"])
def test_shape_changing_fields_are_refused_by_name(spec):
    field = spec.split("=")[0].replace("config.", "")
    with pytest.raises(ValueError, match=rf"config\.{field} cannot be swept"):
        sweep.make_settings(config(), [spec])


@pytest.mark.parametrize("specs,kw,message", [
    (["loss.nope=1,2"], {}, r"config\.loss\.nope is not a field"),
    (["loss.neg_inter_shift=0.3:0.8"], {}, r"is a range: add --sample N"),
    (["loss.pos_intra_weight=-1,1"], {}, r"config\.loss\.pos_intra_weight=-1.0 must be a finite number >= 0"),
    (["optim.lr=0,1e-3"], {}, r"config\.optim\.lr=0.0 must be > 0"),
    (["seed=0.5"], {}, r"'0.5' is not an integer"),
    (["seed=0", "seed=1"], {}, r"swept twice"),
])
def test_bad_specs_are_named(specs, kw, message):
    with pytest.raises(ValueError, match=message):
        sweep.make_settings(config(), specs, **kw)


def test_cli_refuses_a_shape_field_with_one_line(tmp_path, capsys):
    status = sweep.main(["--config", os.path.join(ROOT, "configs", "demo.py"),
                         "--workdir", str(tmp_path), "--sweep", "model.dim=16,32"])
    err = capsys.readouterr().err
    assert status == 1 and "config.model.dim cannot be swept" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("k", [0, 7])
def test_each_setting_equals_its_single_training_run(swept, tmp_path, k):
    d, cfg, settings, result = swept
    ref = train.train_and_evaluate(sweep.setting_config(cfg, settings[k]), str(tmp_path), devices=jax.devices()[:1])
    assert ref["step"] == result["step"] == STEPS
    for a, b in zip(leaves(ref["params"]), leaves(result["params"])):
        np.testing.assert_allclose(b[k], a, rtol=1e-5, atol=1e-6)
    for name in sweep.SCORES:
        assert result["results"][k][name] == pytest.approx(ref[name], abs=1e-6)
    # the settings really differ (the comparison is not between identical runs)
    other = leaves(result["params"])[0][7 - k]
    assert np.abs(other - leaves(ref["params"])[0]).max() > 1e-3


def test_seed_groups():
    order, u, m = sweep.seed_groups([0, 1, 0, 1, 0, 1])
    assert (order.tolist(), u, m) == ([0, 2, 4, 1, 3, 5], 2, 3)
    assert sweep.seed_groups([3, 3]) is not None and sweep.seed_groups([0, 1, 1]) is None


def test_uneven_seeds_equal_single_runs(tmp_path):
    """Seeds with different numbers of settings: each setting reads its seed's batch by index (the
    path without seed groups); it still equals its single run."""
    short = config(num_steps=5, log_every=5, eval_every=5, checkpoint_every=5)
    settings = [{"seed": 0, "loss.pos_intra_shift": 0.08}, {"seed": 0, "loss.pos_intra_shift": 0.28},
                {"seed": 1, "loss.pos_intra_shift": 0.08}]
    assert sweep.seed_groups([s["seed"] for s in settings]) is None
    result = sweep.train_sweep(short, str(tmp_path / "sweep"), settings, devices=jax.devices()[:1], quiet=True)
    for k in (1, 2):
        ref = train.train_and_evaluate(sweep.setting_config(short, settings[k]), str(tmp_path / str(k)),
                                       devices=jax.devices()[:1])
        for a, b in zip(leaves(ref["params"]), leaves(result["params"])):
            np.testing.assert_allclose(b[k], a, rtol=1e-5, atol=1e-6)


def test_reports_sorted_and_written(swept):
    d, _, settings, result = swept
    table = json.load(open(os.path.join(d, "sweep.json")))["results"]
    assert [r["cluster/mIoU"] for r in table] == sorted((r["cluster/mIoU"] for r in table), reverse=True)
    assert len(table) == len(settings) and all(r["diverged_at"] is None for r in table)
    rows = open(os.path.join(d, "sweep.csv")).read().splitlines()
    assert rows[0].startswith("setting,loss.pos_intra_shift,optim.lr,seed,cluster/mIoU") and len(rows) == 9
    assert "| setting |" in open(os.path.join(d, "sweep.md")).read()
    for name in ("loss_curves.png", "heatmap_loss.pos_intra_shift__optim.lr.png",
                 "heatmap_loss.pos_intra_shift__seed.png", "heatmap_optim.lr__seed.png"):
        assert open(os.path.join(d, name), "rb").read(4) == b"\x89PNG", name
    for i in range(len(settings)):  # one TensorBoard folder per setting
        tb = os.path.join(d, "settings", str(i), "tb")
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))
        steps_logged = [json.loads(x)["step"] for x in open(os.path.join(d, "settings", str(i), "metrics.jsonl"))]
        assert steps_logged[-1] == STEPS


def test_kill_and_resume_equals_uninterrupted(swept, tmp_path, monkeypatch):
    _, cfg, settings, result = swept
    real = sweep._Batches.__call__
    calls = {"n": 0}

    def dying(self, step):
        if step == 30 and calls["n"] == 0:  # killed while fetching step 31 (last checkpoint: 25)
            calls["n"] += 1
            raise KeyboardInterrupt("killed")
        return real(self, step)

    monkeypatch.setattr(sweep._Batches, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        sweep.train_sweep(cfg, str(tmp_path), settings, devices=jax.devices()[:1], quiet=True)
    assert sorted(os.listdir(tmp_path / "state" / "checkpoints")) == ["25"]
    resumed = sweep.train_sweep(cfg, str(tmp_path), settings, devices=jax.devices()[:1], quiet=True)
    for a, b in zip(leaves(result["params"]), leaves(resumed["params"])):
        np.testing.assert_array_equal(a, b)
    curves = [json.loads(x)["step"] for x in open(tmp_path / "loss_curves.jsonl")]
    assert curves == [10, 20, 25, 30, 40, 50]  # each logged step once


def test_resume_with_other_settings_is_refused(swept):
    d, cfg, settings, _ = swept
    with pytest.raises(ValueError, match="holds a sweep of other settings"):
        sweep.train_sweep(cfg, d, settings[:2], devices=jax.devices()[:1], quiet=True)


def test_settings_sharded_over_devices_equal_one_device(swept, tmp_path):
    """K = 8 split over the 8 simulated devices (and a padded K = 3) against the one-device sweep."""
    _, cfg, settings, result = swept
    picked = [settings[0], settings[3], settings[7]]
    short = config(num_steps=5, log_every=5, eval_every=5, checkpoint_every=5)
    one = sweep.train_sweep(short, str(tmp_path / "one"), picked, devices=jax.devices()[:1], quiet=True)
    eight = sweep.train_sweep(short, str(tmp_path / "eight"), picked, quiet=True)
    batch = sweep.train_sweep(short, str(tmp_path / "batch"), picked, shard="batch", quiet=True)
    for a, b, c in zip(leaves(one["params"]), leaves(eight["params"]), leaves(batch["params"])):
        assert a.shape[0] == 3
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, a, rtol=2e-5, atol=2e-6)
    # The whole grid (every seed with as many settings: the seed-grouped step) over 8 devices.
    assert sweep.seed_groups([s["seed"] for s in settings]) is not None
    grid_one = sweep.train_sweep(short, str(tmp_path / "grid1"), settings, devices=jax.devices()[:1], quiet=True)
    grid_eight = sweep.train_sweep(short, str(tmp_path / "grid8"), settings, quiet=True)
    for a, b in zip(leaves(grid_one["params"]), leaves(grid_eight["params"])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_a_sweep_that_does_not_fit_is_refused_with_a_k_that_fits(swept, tmp_path):
    """Refused before training (nothing trained, no checkpoint), naming the largest K that fits;
    that K then runs under the same limit."""
    _, _, settings, _ = swept
    cfg = config(num_steps=1, checkpoint_every=1, eval_every=1)
    one = jax.devices()[:1]
    with pytest.raises(ValueError, match=r"needs about") as e:
        sweep.train_sweep(cfg, str(tmp_path / "probe"), settings, devices=one, memory_limit_mb=1e-3, quiet=True)
    need = float(e.value.args[0].split("needs about ")[1].split(" MiB")[0])
    limit = 0.6 * need
    with pytest.raises(ValueError, match=r"K=8 settings needs about .* MiB.*the largest K that fits is (\d+)") as e:
        sweep.train_sweep(cfg, str(tmp_path / "a"), settings, devices=one, memory_limit_mb=limit, quiet=True)
    assert not os.path.exists(tmp_path / "a" / "state" / "checkpoints")
    fits = int(e.value.args[0].rsplit("fits is ", 1)[1].split(".")[0])
    assert 1 <= fits < 8
    sweep.train_sweep(cfg, str(tmp_path / "b"), settings[:fits], devices=one, memory_limit_mb=limit, quiet=True)


# ---------------------------------------------------------------------------- export

def test_export_best_is_a_run_that_evaluate_takes(swept, tmp_path, capsys):
    d, cfg, settings, result = swept
    out = str(tmp_path / "best_run")
    assert sweep.main(["--workdir", d, "--export", "best", "--export_dir", out]) == 0
    best = json.load(open(os.path.join(d, "sweep.json")))["results"][0]
    k = best["setting"]
    run_cfg = json.load(open(os.path.join(out, "config.json")))
    for field, value in settings[k].items():
        node = run_cfg
        for part in field.split("."):
            node = node[part]
        assert node == value
    restored = checkpoints.restore_run(out, sweep.setting_config(cfg, settings[k]), 46)
    assert restored.step == STEPS and restored.kind == "best"
    for a, b in zip(leaves(result["params"]), leaves(restored.params)):
        np.testing.assert_array_equal(a[k], b)
    assert os.path.exists(os.path.join(out, "checksums", "best", f"{STEPS}.json"))
    assert evaluate.main(["--workdir", out]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert "cluster" in json.dumps(res)
