"""Evaluation program: `python -m stego_jax.evaluate --config configs/<name>.py --workdir DIR`.

The official protocol by default (official `src/eval_segmentation.py`): validation images at `eval.res` after a
nearest resize + centre crop, horizontal-flip averaging of the codes, codes upsampled
bilinearly to the label size, cluster probe (unary softmax(2 cos)) and linear probe, each with
and without the dense CRF; plus spherical k-means on the codes (restarts chosen by the k-means
objective). Writes results.{md,json,csv}, a confusion-matrix PNG and overlay PNGs.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from tqdm import tqdm

from stego_jax import crf as crf_lib
from stego_jax import kmeans as kmeans_lib
from stego_jax import cli, metrics, parallel, viz
from stego_jax.checkpoints import restore_run
from stego_jax.config import eval_config, validate
from stego_jax.data import build_dataset
from stego_jax.featurize import make_code_fn, make_featurize, pad_rows, round_up, run_featurizer
from stego_jax.model import build_modules, probe_outputs
from stego_jax.run_config import config_of_run


def make_heads_fn(modules):
    """`heads(params, codes, labels_like) -> (2*cos cluster logits, linear logits, upsampled
    codes)` at the labels' resolution."""

    @jax.jit
    def heads(params, c, labels_like):
        out = probe_outputs(modules, params, c, labels_like.shape[1:3])
        return out["cluster"], out["linear"], out["codes"]

    return heads


def _batches(ds, batch: int, limit: int = 0):
    n = len(ds) if not limit else min(limit, len(ds))
    for i in range(0, n, batch):
        items = [ds[j] for j in range(i, min(i + batch, n))]
        yield (np.stack([it["image"] for it in items]),
               np.stack([it["label"] for it in items]).astype(np.int32))


def train_code_sample(config, code_fn, fparams, head_params, mesh, max_pixels: int = 200_000,
                      max_images: int = 2000) -> np.ndarray:
    """Codes of (a subsample of) the training split, for fitting k-means offline."""
    ds = build_dataset(config, "train")
    n_dev = mesh.devices.size
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(ds))[:max_images]
    out = []
    for i in range(0, len(order), config.eval.batch_size):
        imgs = np.stack([ds[int(j)]["image"] for j in order[i:i + config.eval.batch_size]])
        n = len(imgs)
        imgs = pad_rows(imgs, round_up(n, n_dev))
        c = np.asarray(code_fn(fparams, head_params, jax.device_put(imgs, parallel.data_sharding(mesh))))[:n]
        out.append(c.reshape(-1, c.shape[-1]))
    x = np.concatenate(out)
    if len(x) > max_pixels:
        x = x[rng.choice(len(x), max_pixels, replace=False)]
    return x


def evaluate(config, workdir: str, *, params=None, featurizer=None, out_dir: str | None = None,
             quiet: bool = False, devices: list | None = None, step: int | None = None) -> dict:
    """Evaluate a trained run; writes the result files to `out_dir` (default workdir).

    Without `params`, the run's best checkpoint (else its last) is restored and its step named in the
    results; with `params`, `step` says which step they are (unnamed when None). The linear-probe entries
    carry `"trained": False` when the training split has no labels at all (an unlabelled image folder):
    that probe never saw a label, so its numbers mean nothing and the tables say "not trained".

    `devices` defaults to all devices of all processes. The run's own `config.json` is the
    config: `config` may change only evaluation fields (see `run_config.config_of_run`)."""
    config = config_of_run(workdir, config)
    validate(config)
    out_dir = out_dir or workdir
    os.makedirs(out_dir, exist_ok=True)
    mesh = parallel.make_mesh(devices)
    featurizer = featurizer or run_featurizer(config, workdir)
    modules = build_modules(config)
    checkpoint = {"step": step, "which": "given"}
    if params is None:
        restored = restore_run(workdir, config, featurizer.dim)
        params = restored.params
        checkpoint = {"step": restored.step, "which": "best" if restored.kind == "best" else "last"}
    linear_trained = build_dataset(config, "train").has_labels is not False
    featurize = make_featurize(featurizer, mesh)
    code_fn = make_code_fn(modules, featurize, config.eval.flip)
    heads = make_heads_fn(modules)
    n = config.data.n_classes
    n_clusters = n + config.model.extra_clusters

    # k-means on the codes: fitted on training codes, never on labels.
    x = train_code_sample(config, code_fn, featurizer.params, params["head"], mesh)
    km = kmeans_lib.kmeans_fit(jax.random.key(config.seed), jnp.asarray(x), n_clusters,
                               iters=30, metric="cosine", restarts=config.eval.kmeans_restarts)
    centroids = km.centroids

    use_crf = bool(config.eval.crf)
    ds = build_dataset(eval_config(config), "val")
    conf = {k: np.zeros((n_clusters if k.startswith(("cluster", "kmeans")) else n, n), np.int64)
            for k in ["cluster", "linear", "kmeans"] + (["cluster+crf", "linear+crf"] if use_crf else [])}
    overlays = []
    n_dev = mesh.devices.size
    total = (len(ds) + config.eval.batch_size - 1) // config.eval.batch_size
    for images, labels in tqdm(_batches(ds, config.eval.batch_size), total=total, disable=quiet,
                               desc="evaluate"):
        imgs_p = pad_rows(images, round_up(len(images), n_dev))
        c = code_fn(featurizer.params, params["head"], jax.device_put(imgs_p, parallel.data_sharding(mesh)))
        c = c[:len(images)]
        lab = jnp.asarray(labels)
        cl_logits, li_logits, c_up = heads(params, c, lab)
        preds = {
            "cluster": jnp.argmax(cl_logits, -1),
            "linear": jnp.argmax(li_logits, -1),
            "kmeans": kmeans_lib.assign(c_up.reshape(-1, c_up.shape[-1]), centroids, "cosine")
            .reshape(lab.shape),
        }
        if use_crf:
            # Both probes' logits refined together: one lattice per image for the two CRFs.
            # The image as the official CRF sees it (un-normalised and truncated back to uint8).
            rgb = crf_lib.official_rgb(images)
            cl_crf, li_crf = crf_lib.crf_labels(rgb, [np.asarray(cl_logits), np.asarray(li_logits)],
                                                backend=config.eval.crf_backend,
                                                processes=config.eval.get("crf_processes", 0))
            preds["cluster+crf"], preds["linear+crf"] = jnp.asarray(cl_crf), jnp.asarray(li_crf)
        for k, p in preds.items():
            conf[k] += np.asarray(metrics.confusion(p.astype(jnp.int32), lab, n, conf[k].shape[0]))
        if len(overlays) < config.eval.num_overlays:
            for i in range(min(len(images), config.eval.num_overlays - len(overlays))):
                overlays.append((images[i], labels[i],
                                 {k: np.asarray(v[i]) for k, v in preds.items()}))

    results: dict[str, Any] = {}
    for k, m in conf.items():
        hung = not k.startswith("linear")
        r = metrics.scores_from_confusion(m, n, hungarian=hung,
                                          extra_clusters=config.model.extra_clusters if hung else 0)
        results[k] = {"mIoU": float(r["mIoU"]), "Accuracy": float(r["Accuracy"]),
                      "iou": [float(v) for v in r["iou"]],
                      "assignment": np.asarray(r["assignment"]).tolist()}
    results["kmeans"]["objective"] = float(km.objective)
    for k in results:
        if k.startswith("linear"):
            results[k]["trained"] = linear_trained
    write_results(config, results, conf, overlays, out_dir, checkpoint=checkpoint)
    if not quiet:
        print(open(os.path.join(out_dir, "results.md")).read())
    return results


def _checkpoint_line(checkpoint: dict | None) -> str:
    if not checkpoint or checkpoint.get("step") is None:
        return "Checkpoint: parameters given by the caller, step not stated"
    which = {"best": "the best checkpoint (validation cluster mIoU)", "last": "the last checkpoint",
             "given": "parameters given by the caller"}.get(checkpoint.get("which"), checkpoint.get("which"))
    return f"Checkpoint: step {checkpoint['step']} ({which})"


def write_results(config, results: dict, conf: dict, overlays: list, out_dir: str,
                  checkpoint: dict | None = None) -> None:
    """results.{json,csv,md}, the linear probe's confusion PNG (when it was trained) and the overlays.

    `checkpoint` (`{"step", "which"}`) names the evaluated parameters; a linear entry with
    `"trained": False` is shown as "not trained" instead of numbers."""
    names = viz.class_names(config)

    def trained(k: str) -> bool:
        return results[k].get("trained", True) is not False

    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"classes": names, "checkpoint": checkpoint or {"step": None, "which": "given"},
                   "results": results}, f, indent=2)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "Accuracy", "mIoU"] + names)
        for k, r in results.items():
            if trained(k):
                w.writerow([k, f"{r['Accuracy']:.2f}", f"{r['mIoU']:.2f}"] + [f"{v:.2f}" for v in r["iou"]])
            else:
                w.writerow([k, "not trained", "not trained"] + ["" for _ in r["iou"]])
    unsup = [k for k in results if not k.startswith("linear")]
    lines = [f"# Results: {config.data.name}, {config.model.featurizer} ({config.model.backbone})", "",
             _checkpoint_line(checkpoint), "",
             "| method | Unsup. Acc | Unsup. mIoU | Linear Acc | Linear mIoU |", "|---|---:|---:|---:|---:|"]
    for k in unsup:
        lk = k.replace("cluster", "linear") if k.startswith("cluster") else None
        lin = results.get(lk) if lk else None
        if lin and not trained(lk):
            linear = "not trained | not trained |"
        else:
            linear = f"{lin['Accuracy']:.2f} | {lin['mIoU']:.2f} |" if lin else "– | – |"
        lines.append(f"| {k} | {results[k]['Accuracy']:.2f} | {results[k]['mIoU']:.2f} | " + linear)
    if any(not trained(k) for k in results):
        lines += ["", "The linear probe is not trained: the training split has no labels."]
    lines += ["", "Per-class IoU (%):", "", "| class | " + " | ".join(results) + " |",
              "|---|" + "---:|" * len(results)]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{results[k]['iou'][i]:.1f}" if trained(k) else "–"
                                                 for k in results) + " |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if trained("linear"):
        viz.save_confusion_png(conf["linear"], names, os.path.join(out_dir, "confusion_linear.png"))
    viz.save_overlays(overlays, results, out_dir)


def _define(fv, argv) -> None:
    cli.define_config(fv, argv, required=False,
                      help_string="config file (path.py or path.py:arg); default: the run's own config.json. "
                                  "Given, it may change only evaluation fields (eval.*, distributed.*, "
                                  "data.root): a field that changes the model or the data is refused")
    flags.DEFINE_string("workdir", None, "workdir of the training run", flag_values=fv, required=True)


def _main(fv, _) -> int:
    parallel.enable_compilation_cache()
    evaluate(config_of_run(fv.workdir, fv.config), fv.workdir)
    return 0


def main(argv=None) -> int:
    """`python -m stego_jax.evaluate --workdir W [--config C]`; returns the exit status."""
    return cli.run("stego_jax.evaluate", __doc__, _define, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
