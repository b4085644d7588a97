"""The run directory: its config, its orbax checkpoints (the last K and the best) and restoring
a finished run's parameters.

Layout of a workdir: `config.json` (the config the run was trained with), `checkpoints/<step>`,
`best/<step>`, `featurizer.npz` (demo featurizer only), `metrics.jsonl`, `tb/`, and evaluation
outputs (`results.*`, `overlays/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from stego_jax import parallel
from stego_jax.model import create_state

PyTree = Any


class CheckpointError(RuntimeError):
    """No intact checkpoint to restore (each damaged one is named in the message)."""


def _digests(directory: str) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[os.path.relpath(path, directory)] = h.hexdigest()
    return out


def _finite(tree) -> bool:
    """Every floating leaf is finite. Checked where each leaf lives: a leaf split over the devices of
    several processes (a sweep's stacked state) cannot be fetched whole by one of them, the
    reduced flag can."""
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.floating))


class Checkpoints:
    """orbax: the last K checkpoints under `checkpoints/` and the best (cluster mIoU) under `best/`.

    Every saved checkpoint gets the sha256 of each of its files in `checksums/<kind>/<step>.json`,
    written once the save has finished; a restore checks them first. A checkpoint whose files
    differ from their checksums, fail to load, or hold non-finite parameters is damaged: it is
    skipped with a warning naming it (training moves it aside to `damaged/`, so nothing is lost)
    and the newest intact one is used; with none intact a restore stops with `CheckpointError`.
    Checkpoints written before checksums were recorded load with a warning ("unverified").
    """

    KINDS = ("checkpoints", "best")

    def __init__(self, workdir: str, keep: int):
        self.workdir = os.path.abspath(workdir)
        self.keep = keep
        self._open()

    def _open(self) -> None:
        self.last = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(self.workdir, "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m: m["cluster/mIoU"], best_mode="max"),
        )

    def _mgr(self, kind: str):
        return self.last if kind == "checkpoints" else self.best

    def _sums_path(self, kind: str, step: int) -> str:
        return os.path.join(self.workdir, "checksums", kind, f"{int(step)}.json")

    def latest_step(self):
        return self.last.latest_step()

    def save(self, step: int, state, metrics_: dict | None = None) -> None:
        """Save `state` at `step` (and as the best when `metrics_` is given), wait for the write to
        finish and record the checksums of the files written."""
        # One save at a time: orbax names its multi-process commit barriers by step
        # ("_async_write_complete.<step>"), so two managers saving the same step at once collide.
        self.last.save(step, args=ocp.args.StandardSave(state))
        self.last.wait_until_finished()
        if metrics_ is not None:
            self.best.save(step, args=ocp.args.StandardSave(state), metrics=metrics_)
            self.best.wait_until_finished()
        if jax.process_index() == 0:
            for kind in self.KINDS if metrics_ is not None else ("checkpoints",):
                self._record(kind, step)
        parallel.barrier("stego_checkpoint_checksums_written")

    def _record(self, kind: str, step: int) -> None:
        path = self._sums_path(kind, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        step_dir = os.path.join(self.workdir, kind, str(int(step)))
        if os.path.isdir(step_dir):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(_digests(step_dir), f, indent=0)
            os.replace(tmp, path)
        kept = {str(s) for s in self._mgr(kind).all_steps()}
        for name in os.listdir(os.path.dirname(path)):  # checksums of checkpoints orbax deleted
            if name.endswith(".json") and name[:-5] not in kept:
                os.remove(os.path.join(os.path.dirname(path), name))

    def check(self, kind: str, step: int) -> str | None:
        """None when the files of checkpoint `kind/step` match their recorded checksums,
        "unverified" when none were recorded, else what is wrong."""
        path = self._sums_path(kind, step)
        if not os.path.exists(path):
            return "unverified"
        try:
            with open(path) as f:
                want = json.load(f)
        except (OSError, ValueError) as e:
            return f"its checksum file {path} is unreadable ({e})"
        have = _digests(os.path.join(self.workdir, kind, str(int(step))))
        for name, digest in want.items():
            if name not in have:
                return f"{name} is missing"
            if have[name] != digest:
                return f"{name} differs from its checksum"
        return None

    def restore_newest_intact(self, abstract_state, kinds: tuple[str, ...] = ("checkpoints",), *,
                              move_damaged: bool = False) -> tuple[str, int, Any]:
        """(kind, step, state) of the newest checkpoint of `kinds` (searched in that order) that
        is intact; damaged ones are named in a warning and, with `move_damaged`, moved to
        `damaged/<kind>-<step>`. Raises CheckpointError naming every damaged one if none is left."""
        damaged: list[tuple[str, int, str]] = []
        found = None
        for kind in kinds:
            mgr = self._mgr(kind)
            steps = [mgr.best_step()] if kind == "best" else sorted(mgr.all_steps(), reverse=True)
            for step in [int(s) for s in steps if s is not None]:
                problem, state = self._try_restore(kind, step, abstract_state)
                if state is not None:
                    found = (kind, step, state)
                    break
                damaged.append((kind, step, problem))
                warnings.warn(f"checkpoint {os.path.join(self.workdir, kind, str(step))} is damaged "
                              f"({problem}); trying an older one")
            if found:
                break
        if damaged and move_damaged:
            self.set_aside(damaged)
        if found:
            return found
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in {self.workdir}: "
                + "; ".join(f"{kind}/{step}: {problem}" for kind, step, problem in damaged)
                + ". Train again in a new --workdir (or delete the damaged checkpoints to start over here)")
        raise FileNotFoundError(
            f"no checkpoint in {self.workdir}/checkpoints; train first: "
            f"python -m stego_jax.train --config <config> --workdir {self.workdir}")

    def restore(self, step: int, abstract_state, which: str = "last"):
        """The state of checkpoint `step` (`which`: "last" or "best"), verified first; a damaged
        one is a CheckpointError saying what is wrong."""
        kind = "checkpoints" if which == "last" else "best"
        problem, state = self._try_restore(kind, int(step), abstract_state)
        if state is None:
            raise CheckpointError(f"checkpoint {os.path.join(self.workdir, kind, str(step))} is damaged: {problem}")
        return state

    def _try_restore(self, kind: str, step: int, abstract_state) -> tuple[str | None, Any]:
        """(problem, None) for a damaged checkpoint, (None, state) for an intact one."""
        where = os.path.join(self.workdir, kind, str(step))
        problem = self.check(kind, step)
        if problem not in (None, "unverified"):
            return problem, None
        try:
            state = self._mgr(kind).restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # noqa: BLE001  (any failure to read it means it is damaged)
            return f"it cannot be read: {type(e).__name__}: {str(e).splitlines()[0][:200]}", None
        if not _finite(state):
            return "its parameters are not finite", None
        if problem == "unverified":
            warnings.warn(f"checkpoint {where} has no recorded checksums (written by an older stego_jax): "
                          "loaded unverified")
        return None, state

    def set_aside(self, damaged: list[tuple[str, int, str]]) -> None:
        """Move damaged checkpoints to `damaged/<kind>-<step>` (kept for inspection), then reopen
        the managers so that their steps can be written again."""
        if jax.process_index() == 0:
            for kind, step, _ in damaged:
                src = os.path.join(self.workdir, kind, str(step))
                dst = os.path.join(self.workdir, "damaged", f"{kind}-{step}")
                if os.path.isdir(src):
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    os.replace(src, dst if not os.path.exists(dst) else f"{dst}.{int(time.time())}")
                    print(f"moved the damaged checkpoint {src} to {dst}", flush=True)
                sums = self._sums_path(kind, step)
                if os.path.exists(sums):
                    os.remove(sums)
        parallel.barrier("stego_damaged_checkpoints_moved")
        self.close()
        self._open()

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()


def _abstract_state(config, feat_dim: int, mesh):
    abstract = jax.eval_shape(lambda: create_state(config, feat_dim, jax.random.key(0)))
    rep = parallel.replicated(mesh if mesh is not None else parallel.make_mesh())
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract)


class Restored(NamedTuple):
    step: int
    params: PyTree
    kind: str  # "best" or "checkpoints" (the last K)


def restore_run(workdir: str, config, feat_dim: int, which: str = "best", mesh=None) -> Restored:
    """(step, params, kind) of a finished run: the best checkpoint if there is one, else the newest
    intact one of the last K, replicated over `mesh` (default: all devices of all processes);
    every candidate is verified first (see `Checkpoints`).

    The target sharding is always given: a checkpoint written by another topology (e.g. 2
    processes x 4 devices, evaluated in 1 process) cannot be restored to its saved sharding.
    """
    ckpts = Checkpoints(workdir, config.keep_checkpoints)
    kinds = ("best", "checkpoints") if which == "best" else ("checkpoints",)
    try:
        kind, step, state = ckpts.restore_newest_intact(_abstract_state(config, feat_dim, mesh), kinds)
    finally:
        ckpts.close()
    return Restored(step, state["params"], kind)


def restore_params(workdir: str, config, feat_dim: int, which: str = "best", mesh=None) -> PyTree:
    """The parameters of `restore_run`."""
    return restore_run(workdir, config, feat_dim, which, mesh).params
