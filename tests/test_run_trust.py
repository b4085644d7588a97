"""A run directory users can trust: its config is the source of truth, a resume validates before
it writes, checkpoints are verified on restore, each step is logged once, and config errors are
one clear line."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from stego_jax import checkpoints, cli, evaluate, feature_sources, train
from stego_jax.config import base_config, validate

from .test_train import ROOT, leaves, tiny_config


def _first_file(d: str) -> str:
    """The largest file under a checkpoint step directory (its array data)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
    return max(files, key=os.path.getsize)


def _flip(path: str, offset: int = -64) -> None:
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        b = f.read(1)
        f.seek(offset, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """6 steps, checkpoints at 3 and 6 (and the best)."""
    d = str(tmp_path_factory.mktemp("run"))
    return d, train.train_and_evaluate(tiny_config(), d)


# ---------------------------------------------------------------------------------------------
# 1. The run directory is the source of truth
# ---------------------------------------------------------------------------------------------

def test_evaluate_refuses_a_config_that_changes_the_data(finished_run, tmp_path):
    d, _ = finished_run
    other = tiny_config(**{"data.n_classes": 4})  # another dataset's classes: another run
    sentinel = tmp_path / "results.json"
    sentinel.write_text("{}")
    with pytest.raises(ValueError, match=r"data.n_classes: 5 -> 4.*config.json"):
        evaluate.evaluate(other, d, out_dir=str(tmp_path), quiet=True)
    assert sentinel.read_text() == "{}"  # nothing written

    # The command line: one line, exit status 1, the field named; results untouched.
    code = evaluate.main(["--workdir", d, f"--config={os.path.join(ROOT, 'configs', 'demo.py')}"])
    assert code == 1


def test_evaluate_takes_evaluation_fields_from_the_given_config(finished_run, tmp_path):
    d, _ = finished_run
    given = tiny_config(**{"eval.num_overlays": 1, "optim.lr": 1.0})  # lr: a training field, ignored
    res = evaluate.evaluate(given, d, out_dir=str(tmp_path), quiet=True)
    assert len(os.listdir(tmp_path / "overlays")) == 1
    assert 0 <= res["cluster"]["mIoU"] <= 100


def test_evaluate_cli_uses_the_runs_own_config(finished_run, tmp_path, capsys):
    d, _ = finished_run
    out = tmp_path / "copy"
    # No --config: the run's config.json (tiny dims that configs/demo.py does not have).
    assert evaluate.main(["--workdir", d]) == 0
    assert json.load(open(os.path.join(d, "results.json")))["results"]["cluster"]["mIoU"] >= 0
    del out


# ---------------------------------------------------------------------------------------------
# 2. A resume validates before it writes
# ---------------------------------------------------------------------------------------------

def test_resume_refuses_model_change_before_writing(tmp_path):
    d = str(tmp_path)
    train.train_and_evaluate(tiny_config(num_steps=3), d)
    before = open(os.path.join(d, "config.json")).read()
    for field, value in [("model.dim", 16), ("model.backbone", "typo_backbone")]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            train.train_and_evaluate(tiny_config(**{field: value}), d)
        assert open(os.path.join(d, "config.json")).read() == before

    # Optimisation changes are allowed, warned about and recorded with the step they apply from.
    with pytest.warns(UserWarning, match=r"optim.lr: 0.0005 -> 0.001"):
        out = train.train_and_evaluate(tiny_config(**{"num_steps": 6, "optim.lr": 1e-3}), d)
    assert out["step"] == 6
    history = [json.loads(line) for line in open(os.path.join(d, "config_history.jsonl"))]
    assert history == [{"step": 3, "time": history[0]["time"],
                        "changes": {"num_steps": [3, 6], "optim.lr": [0.0005, 0.001]}}]
    assert json.load(open(os.path.join(d, "config.json")))["optim"]["lr"] == 1e-3


# ---------------------------------------------------------------------------------------------
# 3. Checkpoints are verified on restore
# ---------------------------------------------------------------------------------------------

def test_damaged_checkpoints_fall_back_and_resume_exactly(finished_run, tmp_path):
    ref_dir, ref = finished_run
    d = str(tmp_path)
    train.train_and_evaluate(tiny_config(), d)
    assert sorted(os.listdir(os.path.join(d, "checksums", "checkpoints"))) == ["3.json", "6.json"]

    _flip(_first_file(os.path.join(d, "checkpoints", "6")))
    with pytest.warns(UserWarning, match=r"checkpoints/6 is damaged \(.*differs from its checksum"):
        step = checkpoints.restore_run(d, tiny_config(), 46, which="last").step
    assert step == 3

    # Training resumes from the newest intact checkpoint; the damaged one is kept aside, and the
    # result is the uninterrupted run's, bit for bit.
    with pytest.warns(UserWarning, match="damaged"):
        resumed = train.train_and_evaluate(tiny_config(), d)
    assert resumed["step"] == 6
    assert os.path.isdir(os.path.join(d, "damaged", "checkpoints-6"))
    for a, b in zip(leaves(ref["params"]), leaves(resumed["params"])):
        np.testing.assert_array_equal(a, b)


def test_truncated_and_all_damaged_checkpoints(tmp_path):
    d = str(tmp_path)
    train.train_and_evaluate(tiny_config(), d)
    big = _first_file(os.path.join(d, "checkpoints", "6"))
    with open(big, "r+b") as f:
        f.truncate(os.path.getsize(big) // 2)
    _flip(_first_file(os.path.join(d, "checkpoints", "3")))
    best = os.listdir(os.path.join(d, "best"))[0]
    _flip(_first_file(os.path.join(d, "best", best)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(checkpoints.CheckpointError, match=r"no intact checkpoint.*best/.*checkpoints/6.*"
                                                              r"checkpoints/3"):
            checkpoints.restore_params(d, tiny_config(), 46)
    # evaluate stops with the same clear error (exit status 1 from the command line).
    assert evaluate.main(["--workdir", d]) == 1


def test_nonfinite_params_are_damage_even_without_checksums(tmp_path):
    """A checkpoint from before checksums were recorded loads 'unverified'; NaN parameters in it
    are still refused."""
    d = str(tmp_path)
    train.train_and_evaluate(tiny_config(num_steps=3, eval_every=3), d)
    import shutil

    shutil.rmtree(os.path.join(d, "checksums"))
    with pytest.warns(UserWarning, match="loaded unverified"):
        step, params, _ = checkpoints.restore_run(d, tiny_config(num_steps=3), 46, which="last")
    assert step == 3 and all(np.isfinite(x).all() for x in leaves(params))


# ---------------------------------------------------------------------------------------------
# 8. Each step is logged once
# ---------------------------------------------------------------------------------------------

def _events(tb_dir: str) -> list:
    out = []
    for name in sorted(os.listdir(tb_dir)):
        data = open(os.path.join(tb_dir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            out.append((name, ev))
            pos += 12 + n + 4
    return out


def test_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
    real_batch = feature_sources.CachedFeatures.batch
    calls = {"n": 0}

    def dying_batch(self, step):
        if step == 4 and calls["n"] == 0:  # killed after logging step 3 and 4's window started
            calls["n"] += 1
            raise KeyboardInterrupt("killed")
        return real_batch(self, step)

    # Log every step so that steps 4.. would be written twice without the fix.
    cfg = dict(log_every=1)
    monkeypatch.setattr(feature_sources.CachedFeatures, "batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny_config(**cfg), str(tmp_path))
    # a record of a step the kill will make us re-run, as a crash between checkpoints leaves it
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "train/loss": 0.0}) + "\n" + '{"step": 5, "tr')
    train.train_and_evaluate(tiny_config(**cfg), str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert all(len(r) > 1 for r in rows)  # no empty {"step": N} records
    assert not any(r.get("train/loss") == 0.0 for r in rows)
    # TensorBoard: the resumed writer purges the events after the restored step.
    purges = [ev.step for _, ev in _events(str(tmp_path / "tb"))
              if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START]
    assert purges == [4]


# ---------------------------------------------------------------------------------------------
# 7. Config validation: complete, early, one line, fixes that work as printed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("model.nonexistent", 1, r"config.model.nonexistent is not a known field; config.model has \[.*'dim'"),
    ("loss.neg_inter_weight", -0.5, r"config.loss.neg_inter_weight=-0.5 must be a finite number >= 0"),
    ("loss.pos_intra_shift", float("nan"), r"config.loss.pos_intra_shift=nan must be a finite number"),
    ("eval.crf_backend", "torch", r"config.eval.crf_backend='torch'.*\['jax', 'pydensecrf'\]"),
])
def test_validation_names_field_and_allowed_values(field, value, message):
    c = base_config()
    node = c
    *path, last = field.split(".")
    for p in path:
        node = node[p]
    node[last] = value
    with pytest.raises(ValueError, match=message):
        validate(c)


def test_predict_validates_before_any_work(finished_run, tmp_path):
    d, _ = finished_run
    cfg = json.load(open(os.path.join(d, "config.json")))
    bad = tmp_path / "run"
    bad.mkdir()
    cfg["eval"]["crf_backend"] = "torch"
    (bad / "config.json").write_text(json.dumps(cfg))
    from stego_jax import predict

    images = tmp_path / "imgs"
    images.mkdir()
    with pytest.raises(ValueError, match="crf_backend='torch'"):
        predict.predict_folder(str(bad), str(images), str(tmp_path / "out"), quiet=True)


def test_cli_errors_are_one_line_and_fixes_work_as_printed(tmp_path):
    demo = os.path.join(ROOT, "configs", "demo.py")
    env = dict(os.environ, PYTHONPATH=ROOT)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "stego_jax.train", *args], capture_output=True, text=True,
                              env=env, cwd=str(tmp_path))

    p = run(f"--config={demo}", "--workdir=w", "--config.loss.neg_inter_weight=-1.0")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "config.loss.neg_inter_weight=-1.0 must be a finite number >= 0" in p.stderr
    assert not os.path.exists(tmp_path / "w" / "config.json")
    p = run(f"--config={demo}", "--workdir=w", "--config.nonexistent=1")
    assert p.returncode == 2 and "nonexistent" in p.stderr and "Traceback" not in p.stderr
    p = run(f"--config={demo}", "--workdir=w", "--config.loss.neg_inter_weight=-1.0", "--verbose")
    assert p.returncode != 0 and "Traceback" in p.stderr

    # "pass --config.data.crop_type=five" (the prepared-data mismatch fix) can be passed to
    # configs whose crop_type is None.
    seen = {}

    def body(fv, _):
        seen["crop"] = fv.config.data.crop_type

    assert cli.run("t", "", lambda fv, argv: cli.define_config(fv, argv), body,
                   [f"--config={demo}", "--config.data.crop_type=five"]) == 0
    assert seen["crop"] == "five"


def test_training_output_has_no_checkpoint_chatter(tmp_path):
    cfg = os.path.join(ROOT, "tests", "multihost_config.py")
    p = subprocess.run([sys.executable, "-m", "stego_jax.train", f"--config={cfg}", "--workdir=w",
                        "--config.num_steps=3", "--config.checkpoint_every=3", "--config.eval_every=3"],
                       capture_output=True, text=True, cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr[-2000:]
    lines = (p.stdout + p.stderr).splitlines()
    assert not [x for x in lines if "orbax" in x.lower() or "checkpoint_manager" in x.lower()], lines
    assert len(lines) < 20, lines
