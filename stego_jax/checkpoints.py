"""The run directory: its config, its orbax checkpoints (the last K and the best) and restoring
a finished run's parameters.

Layout of a workdir: `config.json` (the config the run was trained with), `checkpoints/<step>`,
`best/<step>`, `featurizer.npz` (demo featurizer only), `metrics.jsonl`, `tb/`, and evaluation
outputs (`results.*`, `overlays/`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from stego_jax import parallel
from stego_jax.model import create_state

PyTree = Any


class Checkpoints:
    """orbax: the last K checkpoints under `checkpoints/` and the best (cluster mIoU) under `best/`."""

    def __init__(self, workdir: str, keep: int):
        self.last = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m: m["cluster/mIoU"], best_mode="max"),
        )

    def latest_step(self):
        return self.last.latest_step()

    def save(self, step: int, state, metrics_: dict | None = None) -> None:
        self.last.save(step, args=ocp.args.StandardSave(state))
        if metrics_ is not None:
            self.best.save(step, args=ocp.args.StandardSave(state), metrics=metrics_)

    def restore(self, step: int, abstract_state, which: str = "last"):
        mgr = self.last if which == "last" else self.best
        return mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()

def restore_params(workdir: str, config, feat_dim: int, which: str = "best", mesh=None) -> PyTree:
    """Params of a finished run (the best checkpoint if there is one, else the last), replicated
    over `mesh` (default: all devices of all processes).

    The target sharding is always given: a checkpoint written by another topology (e.g. 2
    processes x 4 devices, evaluated in 1 process) cannot be restored to its saved sharding.
    """
    ckpts = Checkpoints(workdir, config.keep_checkpoints)
    mgr = ckpts.best if which == "best" else ckpts.last
    step = mgr.best_step() if which == "best" else mgr.latest_step()
    if step is None:
        mgr, step = ckpts.last, ckpts.last.latest_step()
    if step is None:
        ckpts.close()
        raise FileNotFoundError(
            f"no checkpoint in {workdir}/checkpoints; train first: "
            f"python -m stego_jax.train --config <config> --workdir {workdir}")
    abstract = jax.eval_shape(lambda: create_state(config, feat_dim, jax.random.key(0)))
    rep = parallel.replicated(mesh if mesh is not None else parallel.make_mesh())
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)
    state = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
    ckpts.close()
    return state["params"]


def prepare_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        # One probe name per process: several processes share the workdir.
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"cannot write to workdir {workdir!r} ({e.strerror}); choose a writable --workdir") from e


def save_config(config, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
