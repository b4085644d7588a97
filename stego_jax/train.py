"""STEGO training program: `python -m stego_jax.train --config configs/<name>.py --workdir DIR`.

The loop and its command line: one jitted, data-parallel train step over a device mesh
(`steps.py`) fed by a feature source (`feature_sources.py`: the frozen backbone runs outside the
optimizer, in its own jitted call or once into a cache); orbax checkpoints with exact resume
(`checkpoints.py`); console progress, JSON lines and TensorBoard events (`writers.py`).
"""

from __future__ import annotations

import sys
import warnings

import jax
import ml_collections
import numpy as np
from absl import flags

from stego_jax import cli, parallel, viz
from stego_jax.checkpoints import Checkpoints
from stego_jax.config import validate
from stego_jax.feature_sources import build_training_data
from stego_jax.model import build_modules, create_state, make_optimizer
from stego_jax.run_config import prepare_workdir, resume_changes, save_config
from stego_jax.steps import make_confusion_fn, make_predict_fn, make_train_step, validate_probes
from stego_jax.writers import MetricWriter


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None) -> dict:
    """Train (or resume) a STEGO head in `workdir`; returns the last validation metrics and the
    parameters. `devices` defaults to all devices of all processes.

    Multi-process (config.distributed or $STEGO_COORDINATOR...): every process runs this same
    function on the same config and workdir (a shared filesystem); each feeds only the rows of
    the global batch its devices hold; process 0 alone writes config.json, featurizer.npz,
    metrics and TensorBoard events; orbax checkpoints are written by all processes together.
    """
    parallel.initialize_distributed(config)  # first: the JAX backend must not have started yet
    validate(config)
    diff = resume_changes(config, workdir)  # refuses a model/data change before anything is written
    prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    mesh = parallel.make_mesh(devices)
    parallel.check_batch_size(config.batch_size, mesh)

    featurizer, source, val_batches = build_training_data(config, workdir, mesh)
    modules = build_modules(config)
    optimizer = make_optimizer(config)
    rep = parallel.replicated(mesh)
    root = jax.random.key(config.seed)
    init_key, step_key = jax.random.split(root)
    state = jax.jit(lambda k: create_state(config, featurizer.dim, k), out_shardings=rep)(init_key)

    ckpts = Checkpoints(workdir, config.keep_checkpoints)
    start = 0
    if ckpts.last.all_steps():
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
        _, start, state = ckpts.restore_newest_intact(abstract, move_damaged=True)
        if is_main:
            print(f"resumed from step {start} in {workdir}", flush=True)
    if is_main:
        if diff:
            warnings.warn(f"resuming {workdir} at step {start} with changed settings: "
                          + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
                          + " (recorded in config_history.jsonl)")
        save_config(config, workdir, step=start, diff=diff)

    step_fn = make_train_step(config, mesh, modules, optimizer)
    confusion_fn = make_confusion_fn(config, modules, mesh)
    predict = make_predict_fn(config, modules)
    logger = MetricWriter(workdir, config.num_steps, is_main, start_step=start)
    window: list = []
    last_eval: dict = {}
    last_saved = start
    done = start
    try:
        for step in range(start, config.num_steps):
            batch = source.batch(step)
            state, out = step_fn(state, batch, step_key)
            window.append(out)
            done = step + 1
            if done % config.log_every == 0 or done == config.num_steps:
                host = jax.device_get(window)
                window = []
                bad = [i for i, m in enumerate(host) if bool(m["nonfinite"])]
                if bad:
                    first = done - len(host) + bad[0]
                    saved = _last_checkpoint_state(ckpts, last_saved, workdir)
                    raise FloatingPointError(
                        f"non-finite loss at step {first + 1}: training stopped. The parameters were "
                        f"not updated with it; {saved}. Check the input data for NaN/Inf, or lower "
                        f"config.optim.lr (now {config.optim.lr}).")
                mean = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "nonfinite"}
                logger.scalars(done, mean, "train/")
                logger.progress(done, mean["loss"])
            if done % config.eval_every == 0 or done == config.num_steps:
                last_eval = validate_probes(config, state["params"], confusion_fn, val_batches)
                logger.scalars(done, last_eval, "val/")
                panel = viz.preview_panels(config, state["params"], predict, val_batches)
                logger.image("val/segmentation_truth_cluster_linear", done, panel)
                if is_main:
                    print("  val " + " | ".join(f"{k} {v:.2f}" for k, v in last_eval.items()), flush=True)
            if done % config.checkpoint_every == 0 or done == config.num_steps:
                ckpts.save(done, state, last_eval if done % config.eval_every == 0
                           or done == config.num_steps else None)
                last_saved = done
    finally:
        ckpts.wait()
        ckpts.close()
        logger.close()
    return {"step": int(done), **last_eval, "params": state["params"]}


def _last_checkpoint_state(ckpts: Checkpoints, step: int, workdir: str) -> str:
    """What the last checkpoint holds, checked against its checksums now."""
    if not step:
        return "no checkpoint had been written yet"
    problem = ckpts.check("checkpoints", step)
    if problem is None:
        return (f"the last good checkpoint (step {step}) in {workdir}/checkpoints is intact "
                "(its files match the checksums recorded when it was written)")
    return f"the last checkpoint (step {step}) in {workdir}/checkpoints is NOT intact: {problem}"


def _define(fv, argv) -> None:
    cli.define_config(fv, argv)
    flags.DEFINE_string("workdir", None, "directory of the run: checkpoints, logs, results. An existing "
                        "run resumes from its last checkpoint", flag_values=fv, required=True)


def _main(fv, _) -> int:
    parallel.enable_compilation_cache()
    train_and_evaluate(fv.config, fv.workdir)
    return 0


def main(argv=None) -> int:
    """`python -m stego_jax.train --config C --workdir W [--config.x=y ...]`; returns the exit status."""
    return cli.run("stego_jax.train", __doc__, _define, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
