"""A run directory's config: `config.json` (the config a run was trained with, the source of
truth for everything done with the run later) and `config_history.jsonl` (settings changed when
it was resumed); the checks that keep a run one run."""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections

from stego_jax.config import check_same_run, config_for_finished_run

CONFIG = "config.json"
HISTORY = "config_history.jsonl"


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


def resume_changes(config, workdir: str) -> dict[str, tuple]:
    """Before anything is written: the changes of `config` from the config the run in `workdir`
    was started with (empty for a new run). A change of a field that defines the run (model,
    data) is a ValueError naming it; other changes (learning rates, batch size, steps, loss
    weights) are allowed and returned, to be warned about and recorded."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        return {}
    return check_same_run(load_run_config(workdir), config, what="resuming with this config", path=path)


def save_config(config, workdir: str, *, step: int = 0, diff: dict | None = None) -> None:
    """Write `config.json` (atomically); when a resumed run changed fields, append the change
    and the step it applies from to `config_history.jsonl`."""
    if diff:
        with open(os.path.join(workdir, HISTORY), "a") as f:
            f.write(json.dumps({"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "changes": {k: list(v) for k, v in diff.items()}}) + "\n")
    tmp = os.path.join(workdir, CONFIG + ".tmp")
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, CONFIG))


def config_of_run(workdir: str, given=None) -> ml_collections.ConfigDict:
    """The config to use on the run in `workdir`: its own `config.json`, with the evaluation fields
    of `given` (eval.*, distributed.*, where the data live) when one is given; a `given` field that
    would change the model or the data is a ValueError naming it. Without a `config.json` (not a
    training run yet): `given`."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        if given is None:
            raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
        return given
    run = load_run_config(workdir)
    return run if given is None else config_for_finished_run(run, given, path)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except ValueError as e:
        raise ValueError(f"{path} is not a readable run config ({e}); restore it from a copy, or "
                         f"retrain in a new --workdir") from e
