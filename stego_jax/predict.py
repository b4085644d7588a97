"""Inference on a folder of images: `python -m stego_jax.predict --workdir RUN --images DIR --out DIR`.

Each image (any size, any PIL mode) is resized so its short side is `eval.res` (aspect kept,
sides rounded down to whole patches), segmented with flip-averaged codes, the cluster probe
(or the linear probe) and optionally the dense CRF, and the label map is resized back to the
original size (nearest). Writes palette PNGs (`labels/`) and overlays with a legend
(`overlays/`). Unreadable files are reported by name and skipped; the rest are processed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from stego_jax import parallel

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")


def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder!r} is not a directory")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, f) for f in files]


def load_rgb(path: str) -> np.ndarray:
    """Any PIL-readable image as uint8 RGB [H,W,3]; raises ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def working_size(h: int, w: int, res: int, patch: int) -> tuple[int, int]:
    """Short side -> res, aspect kept, both sides floored to a multiple of the patch size."""
    s = res / min(h, w)
    return max(patch, int(h * s) // patch * patch), max(patch, int(w * s) // patch * patch)


def resize(img: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    from PIL import Image

    mode = Image.NEAREST if nearest else Image.BILINEAR
    if img.ndim == 2:
        return np.asarray(Image.fromarray(img.astype(np.int32)).resize((hw[1], hw[0]), mode))
    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), mode))


def legend_names(workdir: str, config, use_linear: bool) -> tuple[list[str], np.ndarray | None]:
    """Names per output id, and (for the cluster probe) a cluster -> class map from a previous
    evaluation's Hungarian assignment, if the run has one."""
    from stego_jax.evaluate import class_names

    names = class_names(config)
    if use_linear:
        return names, None
    path = os.path.join(workdir, "results.json")
    n_clusters = config.data.n_classes + config.model.extra_clusters
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)["results"]
        key = "cluster+crf" if "cluster+crf" in res else "cluster"
        lut = np.asarray(res[key]["assignment"], np.int64)  # class of each cluster, -1 unmatched
        if len(lut) == n_clusters:
            return names, lut
    return [f"cluster {i}" for i in range(n_clusters)], None


def overlay(img: np.ndarray, labels: np.ndarray, names: list[str], alpha: float = 0.5) -> np.ndarray:
    """Image blended with the label colours, and a legend of the classes present."""
    from PIL import Image, ImageDraw

    from stego_jax.evaluate import colorize

    colour = colorize(labels)
    blend = (img.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)
    present = [int(c) for c in np.unique(labels) if c >= 0]
    row_h = 14
    legend = Image.new("RGB", (blend.shape[1], row_h * max(1, len(present)) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for i, c in enumerate(present):
        y = 2 + i * row_h
        draw.rectangle([4, y, 14, y + 10], fill=tuple(int(v) for v in colorize(np.array([[c]]))[0, 0]))
        draw.text((20, y - 1), names[c] if c < len(names) else str(c), fill=(0, 0, 0))
    return np.concatenate([blend, np.asarray(legend)], axis=0)


def predict_folder(workdir: str, images_dir: str, out_dir: str, *, crf: bool | None = None,
                   use_linear: bool = False, batch_size: int = 8, quiet: bool = False) -> dict:
    """Segment every image in `images_dir`; returns {"written": [...], "failed": {path: error}}."""
    from PIL import Image
    from tqdm import tqdm

    from stego_jax import ops
    from stego_jax.evaluate import PALETTE, build_featurizer_for_run, make_code_fn
    from stego_jax.train import build_modules, load_run_config, make_featurize, restore_params

    config = load_run_config(workdir)
    crf = bool(config.eval.crf) if crf is None else crf
    featurizer = build_featurizer_for_run(config, workdir)
    modules = build_modules(config)
    # One device: images of different sizes come in small groups, not worth a mesh.
    mesh = parallel.make_mesh(jax.devices()[:1])
    params = jax.device_put(restore_params(workdir, config, featurizer.dim), jax.devices()[0])
    code_fn = make_code_fn(config, modules, make_featurize(featurizer, mesh), flip=config.eval.flip)
    _, cluster, linear = modules
    names, lut = legend_names(workdir, config, use_linear)

    @jax.jit
    def logits_fn(params, c, hw_like):
        c = ops.upsample_bilinear(c, hw_like.shape[1:3])
        if use_linear:
            return linear.apply({"params": params["linear_probe"]}, c)
        return 2.0 * cluster.apply({"params": params["cluster_probe"]}, c)

    os.makedirs(os.path.join(out_dir, "labels"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
    files = list_images(images_dir)
    failed: dict[str, str] = {}
    loaded: dict[tuple, list] = defaultdict(list)
    for path in files:
        try:
            img = load_rgb(path)
        except ValueError as e:
            failed[path] = str(e)
            print(f"skipping {path}: {e}", file=sys.stderr, flush=True)
            continue
        hw = working_size(img.shape[0], img.shape[1], config.eval.res, featurizer.patch_size)
        loaded[hw].append((path, img))

    written = []
    bar = tqdm(total=sum(len(v) for v in loaded.values()), disable=quiet, desc="predict")
    for hw, items in loaded.items():  # one compiled shape per working size
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            small = np.stack([resize(img, hw) for _, img in chunk])
            pad = batch_size - len(chunk) if len(items) > batch_size else 0
            if pad:
                small = np.concatenate([small, np.repeat(small[-1:], pad, 0)])
            c = code_fn(featurizer.params, params["head"], jnp.asarray(small))
            lg = np.asarray(logits_fn(params, c, jnp.zeros(small.shape[:3])))[:len(chunk)]
            if crf:
                from stego_jax import crf as crf_lib

                pred = np.asarray(crf_lib.crf_labels(small[:len(chunk)], lg, backend=config.eval.crf_backend,
                                                     processes=config.eval.get("crf_processes", 0)))
            else:
                pred = lg.argmax(-1)
            for (path, img), p in zip(chunk, pred):
                p = p.astype(np.int64)
                if lut is not None:
                    p = lut[p]
                full = resize(p.astype(np.int32), img.shape[:2], nearest=True).astype(np.int64)
                stem = os.path.splitext(os.path.basename(path))[0]
                lab = Image.fromarray(np.where(full < 0, 255, full).astype(np.uint8), mode="P")
                pal = np.zeros((256, 3), np.uint8)
                pal[:len(PALETTE)] = PALETTE
                lab.putpalette(pal.reshape(-1).tolist())
                lab.save(os.path.join(out_dir, "labels", stem + ".png"))
                Image.fromarray(overlay(img, full, names)).save(os.path.join(out_dir, "overlays", stem + ".png"))
                written.append(path)
                bar.update(1)
    bar.close()
    summary = {"written": written, "failed": failed}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if not quiet:
        print(f"wrote {len(written)} label maps and overlays to {out_dir}; {len(failed)} file(s) skipped")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Segment a folder of images with a trained STEGO run.")
    p.add_argument("--workdir", required=True, help="workdir of the training run")
    p.add_argument("--images", required=True, help="folder of images (jpg/png/webp/tiff/...)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--crf", dest="crf", action="store_true", default=None, help="apply the dense CRF")
    p.add_argument("--no-crf", dest="crf", action="store_false")
    p.add_argument("--linear", action="store_true", help="use the (supervised) linear probe")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    parallel.enable_compilation_cache()
    summary = predict_folder(args.workdir, args.images, args.out, crf=args.crf,
                             use_linear=args.linear, batch_size=args.batch_size)
    return 0 if summary["written"] or not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
