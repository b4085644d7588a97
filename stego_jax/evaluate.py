"""Evaluation program: `python -m stego_jax.evaluate --config configs/<name>.py --workdir DIR`.

The official protocol by default (STEGO_FACTS 4.2): validation images at `eval.res` after a
nearest resize + centre crop, horizontal-flip averaging of the codes, codes upsampled
bilinearly to the label size, cluster probe (unary softmax(2 cos)) and linear probe, each with
and without the dense CRF; plus spherical k-means on the codes (restarts chosen by the k-means
objective). Writes results.{md,json,csv}, a confusion-matrix PNG and overlay PNGs.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from stego_jax import metrics, ops, parallel
from stego_jax.train import build_modules, codes, make_featurize, restore_params

PALETTE = np.array(
    [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
     [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
     [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100],
     [0, 80, 100], [0, 0, 230], [119, 11, 32], [255, 127, 14], [44, 160, 44], [148, 103, 189],
     [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207], [127, 127, 127],
     [255, 187, 120], [152, 223, 138], [197, 176, 213], [196, 156, 148], [247, 182, 210]],
    np.uint8)


def colorize(labels: np.ndarray) -> np.ndarray:
    """int labels [H,W] (-1 = ignore, drawn black) -> uint8 RGB [H,W,3]."""
    out = PALETTE[np.mod(np.maximum(labels, 0), len(PALETTE))]
    out[labels < 0] = 0
    return out


def class_names(config) -> list[str]:
    try:
        from stego_jax.data import class_names as names_fn

        names = list(names_fn(config.data.name))
        if len(names) == config.data.n_classes:
            return names
    except (ImportError, KeyError, ValueError, AttributeError, TypeError):
        pass
    return [f"class {i}" for i in range(config.data.n_classes)]


def eval_config(config) -> ml_collections.ConfigDict:
    """The data config for evaluation: validation split at eval.res, no crops."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.res = config.eval.res
    c.data.crop_type = None
    return c


def build_featurizer_for_run(config, workdir: str):
    from stego_jax.models.featurizers import build_featurizer

    if config.model.featurizer == "descriptor":
        path = os.path.join(workdir, "featurizer.npz")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: the descriptor statistics are saved by training")
        return build_featurizer(config, stats=dict(np.load(path)))
    return build_featurizer(config)


def make_code_fn(config, modules, featurize, flip: bool):
    """uint8 images -> eval codes [B,h,w,D] (flip-averaged as the official eval)."""
    head = modules[0]

    @jax.jit
    def code_fn(fparams, head_params, images):
        c = codes(head, head_params, featurize(fparams, images))
        if flip:
            c_flip = codes(head, head_params, featurize(fparams, images[:, :, ::-1]))
            c = (c + c_flip[:, :, ::-1]) / 2
        return c

    return code_fn


def make_heads_fn(modules):
    """codes -> (2*cos cluster logits, linear logits) at label resolution."""
    _, cluster, linear = modules

    @jax.jit
    def heads(params, c, labels_like):
        c = ops.upsample_bilinear(c, labels_like.shape[1:3])
        cos = cluster.apply({"params": params["cluster_probe"]}, c)
        logits = linear.apply({"params": params["linear_probe"]}, c)
        return 2.0 * cos, logits, c

    return heads


def _batches(ds, batch: int, limit: int = 0):
    n = len(ds) if not limit else min(limit, len(ds))
    for i in range(0, n, batch):
        items = [ds[j] for j in range(i, min(i + batch, n))]
        yield (np.stack([it["image"] for it in items]),
               np.stack([it["label"] for it in items]).astype(np.int32))


def _pad(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    pad = (-len(x)) % multiple
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
    return x, pad


def train_code_sample(config, code_fn, fparams, head_params, mesh, max_pixels: int = 200_000,
                      max_images: int = 2000) -> np.ndarray:
    """Codes of (a subsample of) the training split, for fitting k-means offline."""
    from stego_jax.data import build_dataset

    ds = build_dataset(config, "train")
    n_dev = mesh.devices.size
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(ds))[:max_images]
    out = []
    for i in range(0, len(order), config.eval.batch_size):
        imgs = np.stack([ds[int(j)]["image"] for j in order[i:i + config.eval.batch_size]])
        imgs, pad = _pad(imgs, n_dev)
        c = np.asarray(code_fn(fparams, head_params, jax.device_put(imgs, parallel.data_sharding(mesh))))
        c = c[:len(c) - pad] if pad else c
        out.append(c.reshape(-1, c.shape[-1]))
    x = np.concatenate(out)
    if len(x) > max_pixels:
        x = x[rng.choice(len(x), max_pixels, replace=False)]
    return x


def evaluate(config, workdir: str, *, params=None, featurizer=None, out_dir: str | None = None,
             quiet: bool = False, devices: list | None = None) -> dict:
    """Evaluate a trained run; writes the result files to `out_dir` (default workdir).

    `devices` defaults to all devices of all processes."""
    from tqdm import tqdm

    from stego_jax import kmeans as kmeans_lib
    from stego_jax.data import build_dataset

    out_dir = out_dir or workdir
    os.makedirs(out_dir, exist_ok=True)
    mesh = parallel.make_mesh(devices)
    featurizer = featurizer or build_featurizer_for_run(config, workdir)
    modules = build_modules(config)
    if params is None:
        params = restore_params(workdir, config, featurizer.dim)
    featurize = make_featurize(featurizer, mesh)
    code_fn = make_code_fn(config, modules, featurize, config.eval.flip)
    heads = make_heads_fn(modules)
    n = config.data.n_classes
    n_clusters = n + config.model.extra_clusters

    # k-means on the codes: fitted on training codes, never on labels.
    x = train_code_sample(config, code_fn, featurizer.params, params["head"], mesh)
    km = kmeans_lib.kmeans_fit(jax.random.key(config.seed), jnp.asarray(x), n_clusters,
                               iters=30, metric="cosine", restarts=config.eval.kmeans_restarts)
    centroids = km.centroids

    use_crf = bool(config.eval.crf)
    if use_crf:
        from stego_jax import crf as crf_lib
    ds = build_dataset(eval_config(config), "val")
    conf = {k: np.zeros((n_clusters if k.startswith(("cluster", "kmeans")) else n, n), np.int64)
            for k in ["cluster", "linear", "kmeans"] + (["cluster+crf", "linear+crf"] if use_crf else [])}
    overlays = []
    n_dev = mesh.devices.size
    total = (len(ds) + config.eval.batch_size - 1) // config.eval.batch_size
    for images, labels in tqdm(_batches(ds, config.eval.batch_size), total=total, disable=quiet,
                               desc="evaluate"):
        imgs_p, pad = _pad(images, n_dev)
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
            cl_crf, li_crf = crf_lib.crf_labels(images, [np.asarray(cl_logits), np.asarray(li_logits)],
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
    write_results(config, results, conf, overlays, out_dir)
    if not quiet:
        print(open(os.path.join(out_dir, "results.md")).read())
    return results


def write_results(config, results: dict, conf: dict, overlays: list, out_dir: str) -> None:
    names = class_names(config)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"classes": names, "results": results}, f, indent=2)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "Accuracy", "mIoU"] + names)
        for k, r in results.items():
            w.writerow([k, f"{r['Accuracy']:.2f}", f"{r['mIoU']:.2f}"] + [f"{v:.2f}" for v in r["iou"]])
    unsup = [k for k in results if not k.startswith("linear")]
    lines = [f"# Results: {config.data.name}, {config.model.featurizer} ({config.model.backbone})", "",
             "| method | Unsup. Acc | Unsup. mIoU | Linear Acc | Linear mIoU |", "|---|---:|---:|---:|---:|"]
    for k in unsup:
        lk = k.replace("cluster", "linear") if k.startswith("cluster") else None
        lin = results.get(lk) if lk else None
        lines.append(f"| {k} | {results[k]['Accuracy']:.2f} | {results[k]['mIoU']:.2f} | "
                     + (f"{lin['Accuracy']:.2f} | {lin['mIoU']:.2f} |" if lin else "– | – |"))
    lines += ["", "Per-class IoU (%):", "", "| class | " + " | ".join(results) + " |",
              "|---|" + "---:|" * len(results)]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{results[k]['iou'][i]:.1f}" for k in results) + " |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _save_confusion_png(conf, names, out_dir)
    _save_overlays(overlays, results, names, out_dir)


def _save_confusion_png(conf: dict, names: list[str], out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = conf["linear"].astype(np.float64)
    m = m / np.maximum(m.sum(0, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(4, len(names) * 0.35 + 2),) * 2)
    ax.imshow(m.T, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted (linear probe)")
    ax.set_ylabel("ground truth")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "confusion_linear.png"), dpi=100)
    plt.close(fig)


def _save_overlays(overlays: list, results: dict, names: list[str], out_dir: str) -> None:
    from PIL import Image

    d = os.path.join(out_dir, "overlays")
    os.makedirs(d, exist_ok=True)
    for i, (img, lab, preds) in enumerate(overlays):
        panels = [img, colorize(lab)]
        for k in ("cluster+crf" if "cluster+crf" in preds else "cluster", "kmeans", "linear"):
            p = preds[k]
            if not k.startswith("linear"):
                # Hungarian-matched class of each cluster, -1 (drawn black) for unmatched ones.
                p = metrics.map_clusters(p, results[k]["assignment"])
            panels.append(colorize(p))
        Image.fromarray(np.concatenate(panels, axis=1)).save(os.path.join(d, f"{i:03d}.png"))


def main(argv):
    del argv
    from absl import flags

    parallel.enable_compilation_cache()
    evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "workdir of the training run")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
