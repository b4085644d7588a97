"""Multi-host training and sweeps on one machine: 2 processes x 4 simulated CPU devices
(jax.distributed on localhost, gloo collectives) train exactly as 1 process x 8 devices, write
checkpoints together and resume from them. The subprocesses run the real CLIs
(`python -m stego_jax.train`, `python -m stego_jax.sweep`)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from stego_jax import checkpoints, model, parallel, sweep, train

from .test_train import ROOT, leaves, tiny_config

CONFIG = os.path.join(ROOT, "tests", "multihost_config.py")
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, num_steps, *, via_env, module="stego_jax.train", args=()):
    """Run a CLI (`module`, training by default) in 2 processes x 4 CPU devices; returns their
    outputs (both must exit 0)."""
    addr = f"127.0.0.1:{free_port()}"
    env = dict(os.environ)
    # conftest.py forces 8 host devices for this session; each worker simulates 4 instead.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env.update(JAX_PLATFORMS="cpu", STEGO_CPU_DEVICES="4", PYTHONUNBUFFERED="1")
    procs, logs = [], []
    for pid in range(2):
        cmd = [sys.executable, "-m", module, f"--config={CONFIG}", f"--workdir={workdir}",
               f"--config.num_steps={num_steps}", *args]
        penv = dict(env)
        if via_env:  # the launcher's way: environment variables
            penv.update(STEGO_COORDINATOR=addr, STEGO_NUM_PROCESSES="2", STEGO_PROCESS_ID=str(pid))
        else:  # the config's way
            cmd += [f"--config.distributed.coordinator_address={addr}", "--config.distributed.num_processes=2",
                    f"--config.distributed.process_id={pid}"]
        # Output to files, not pipes: a worker blocked on a full pipe would stall its peer at the
        # next collective, and the pair would deadlock.
        logs.append(open(f"{workdir}.{num_steps}.{pid}.log", "w+"))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=penv, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:  # never leave a worker behind (e.g. one waiting forever on its peer)
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for pid, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        outs.append(log.read())
        log.close()
        assert p.returncode == 0, f"process {pid} failed (rc={p.returncode}):\n{outs[-1][-4000:]}"
    return outs


def train_losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def restore(workdir, step):
    """Params of checkpoint `step`, restored in this process (8 devices) whatever wrote them."""
    ckpts = checkpoints.Checkpoints(workdir, 2)
    rep = parallel.replicated(parallel.make_mesh())
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
        jax.eval_shape(lambda: model.create_state(tiny_config(), 46, jax.random.key(0))))
    try:
        return ckpts.restore(step, abstract)["params"]
    finally:
        ckpts.close()


def test_two_processes_equal_one_process_and_resume(tmp_path):
    assert jax.device_count() == 8
    ref_dir, mh_dir = str(tmp_path / "ref"), str(tmp_path / "mh")
    ref = train.train_and_evaluate(tiny_config(), ref_dir)  # 1 process x 8 devices, 6 steps
    ref_losses = train_losses(ref_dir)

    # 2 processes, started from the environment, train 3 steps and checkpoint.
    out = launch(mh_dir, 3, via_env=True)
    assert "step      3/3 | loss" in out[0] and "| loss" not in out[1]  # progress only from process 0
    assert sorted(os.listdir(os.path.join(mh_dir, "checkpoints"))) == ["3"]
    written = os.listdir(os.path.join(mh_dir, "checkpoints", "3", "default"))
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(written)  # each process wrote its part
    np.testing.assert_allclose(train_losses(mh_dir)[3], ref_losses[3], rtol=2e-5)
    for a, b in zip(leaves(restore(ref_dir, 3)), leaves(restore(mh_dir, 3))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)

    # 2 processes, started from the config, resume from that checkpoint to step 6.
    out = launch(mh_dir, 6, via_env=False)
    assert "resumed from step 3" in out[0]
    assert sorted(os.listdir(os.path.join(mh_dir, "checkpoints"))) == ["3", "6"]
    losses = train_losses(mh_dir)
    assert sorted(losses) == [3, 6]
    np.testing.assert_allclose(losses[6], ref_losses[6], rtol=2e-5)
    final = checkpoints.restore_params(mh_dir, tiny_config(), 46, which="last")  # as evaluate.py does
    for a, b in zip(leaves(ref["params"]), leaves(final)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    # the best-checkpoint manager (cluster mIoU) was written by the processes together too
    assert os.listdir(os.path.join(mh_dir, "best"))
    rows = [json.loads(line) for line in open(os.path.join(mh_dir, "metrics.jsonl"))]
    assert sum("val/cluster/mIoU" in r for r in rows) == 2  # one per validation, process 0 only


SWEEP_ARGS = ("--sweep=loss.pos_intra_shift=0.08,0.28", "--sweep=optim.lr=5e-4,1e-3", "--sweep=seed=0,1")


def sweep_state(workdir, cfg, k, step):
    """The stacked sweep state [K, ...] of checkpoint `step`, restored in this process."""
    ckpts = checkpoints.Checkpoints(os.path.join(workdir, sweep.STATE_DIR), 2)
    abstract = sweep.checkpoint_shapes(cfg, 46, k, parallel.replicated(parallel.make_mesh()))
    try:
        return ckpts.restore(step, abstract)["state"]
    finally:
        ckpts.close()


def test_sweep_in_two_processes_equals_one_process_and_resumes(tmp_path):
    """An 8-setting sweep (2 shifts x 2 learning rates x 2 seeds: the seed-grouped step), K split
    over the 8 devices of 2 processes, against the same sweep in this process: same parameters
    after 3 steps and, resumed, after 6; same validation scores; process 0 alone reports; the
    processes checkpoint together."""
    assert jax.device_count() == 8
    cfg = tiny_config()  # 6 steps, log/validate/checkpoint every 3: the config of the subprocesses
    settings = sweep.make_settings(cfg, [a.split("=", 1)[1] for a in SWEEP_ARGS])
    ref_dir, mh_dir = str(tmp_path / "ref"), str(tmp_path / "mh")
    ref = sweep.train_sweep(cfg, ref_dir, settings, quiet=True)  # 1 process x 8 devices

    out = launch(mh_dir, 3, via_env=True, module="stego_jax.sweep", args=SWEEP_ARGS)
    assert "step      3/3 | 8 settings" in out[0] and "settings |" not in out[1]  # progress: process 0
    assert "| setting |" in out[0] and "| setting |" not in out[1]  # the results table: process 0
    written = os.listdir(os.path.join(mh_dir, sweep.STATE_DIR, "checkpoints", "3", "default"))
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(written)  # each process wrote its part
    for a, b in zip(leaves(sweep_state(ref_dir, cfg, 8, 3)), leaves(sweep_state(mh_dir, cfg, 8, 3))):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)

    out = launch(mh_dir, 6, via_env=False, module="stego_jax.sweep", args=SWEEP_ARGS)
    assert "resumed the sweep from step 3" in out[0]
    for a, b in zip(leaves(ref["params"]), leaves(sweep_state(mh_dir, cfg, 8, 6)["params"])):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
    record = json.load(open(os.path.join(mh_dir, sweep.SWEEP_FILE)))
    assert record["step"] == 6
    by_setting = {r["setting"]: r for r in record["results"]}
    for r in ref["results"]:
        for key in sweep.SCORES:
            assert by_setting[r["setting"]][key] == pytest.approx(r[key], abs=1e-6)
        np.testing.assert_allclose(by_setting[r["setting"]]["train/loss"], r["train/loss"], rtol=2e-5)
    curves = [json.loads(line) for line in open(os.path.join(mh_dir, "loss_curves.jsonl"))]
    assert [c["step"] for c in curves] == [3, 6]  # one line per log, written by process 0 alone
    events = os.listdir(os.path.join(mh_dir, "settings", "7", "tb"))
    assert events


def test_sweep_export_with_several_processes_is_refused_before_training(tmp_path):
    env = dict(os.environ, STEGO_COORDINATOR="127.0.0.1:1", STEGO_NUM_PROCESSES="2", STEGO_PROCESS_ID="0")
    work = str(tmp_path / "w")
    proc = subprocess.run([sys.executable, "-m", "stego_jax.sweep", f"--config={CONFIG}", f"--workdir={work}",
                           "--sweep=seed=0,1", "--export=best"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0
    assert "--export writes one run directory from one process" in proc.stderr
    assert f"--workdir {work} --export best" in proc.stderr
    assert not os.path.exists(os.path.join(work, sweep.STATE_DIR))
