"""Multi-host training on one machine: 2 processes x 4 simulated CPU devices (jax.distributed on
localhost, gloo collectives) train exactly as 1 process x 8 devices, write checkpoints together
and resume from them. The subprocesses run the real CLI (`python -m stego_jax.train`)."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from stego_jax import checkpoints, model, parallel, train

from .test_train import ROOT, leaves, tiny_config

CONFIG = os.path.join(ROOT, "tests", "multihost_config.py")
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, num_steps, *, via_env):
    """Run the training CLI in 2 processes x 4 CPU devices; returns their (rc, output) pairs."""
    addr = f"127.0.0.1:{free_port()}"
    env = dict(os.environ)
    # conftest.py forces 8 host devices for this session; each worker simulates 4 instead.
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    env.update(JAX_PLATFORMS="cpu", STEGO_CPU_DEVICES="4", PYTHONUNBUFFERED="1")
    procs, logs = [], []
    for pid in range(2):
        cmd = [sys.executable, "-m", "stego_jax.train", f"--config={CONFIG}", f"--workdir={workdir}",
               f"--config.num_steps={num_steps}"]
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
