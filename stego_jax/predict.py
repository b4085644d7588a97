"""Inference on a folder of images: `python -m stego_jax.predict --workdir RUN --images DIR --out DIR`.

Each image (any size, any PIL mode, 16-bit grey included, turned upright by its EXIF orientation) is
resized to a working size, segmented with flip-averaged codes, the cluster probe (or the linear probe)
and optionally the dense CRF, and the label map is resized back to the image's own size (nearest).
Writes palette PNGs (`labels/<stem>.png`), overlays with a legend (`overlays/<stem>.png`) and
`summary.json` (what was written where, what failed and why).

Working size (bounded work per image): the short side becomes `eval.res`, the long side at most
`4 * eval.res` (a wider image is scaled down until its long side fits, so its short side ends below
`eval.res`); both sides are rounded down to whole patches. Images whose aspect ratio exceeds 8:1 are
skipped: crop or split them first.

Skipped and reported by name (the rest are written): unreadable files, decompression bombs (more pixels
than PIL's `Image.MAX_IMAGE_PIXELS` allows) and images beyond the aspect cap. When several inputs share
a stem (`x.jpg`, `x.png`), their outputs keep the whole file name (`x.jpg.png`, `x.png.png`).
Exit status 2 when any input failed, with a line "N of M images failed: ..." on stderr; 0 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image
from tqdm import tqdm

from stego_jax import crf as crf_lib
from stego_jax import cli, parallel, viz
from stego_jax.checkpoints import restore_params
from stego_jax.config import validate
from stego_jax.data.sources import CorruptFileError, image_size, read_rgb
from stego_jax.featurize import make_code_fn, make_featurize, pad_rows, run_featurizer
from stego_jax.model import build_modules, probe_outputs
from stego_jax.run_config import load_run_config

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")


def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images {folder!r} is not a directory")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, f) for f in files]


MAX_LONG_SIDE = 4  # the working size's long side is at most this many times eval.res
MAX_ASPECT = 8.0  # images longer than this many times their width (or wider than their height) are skipped


def working_size(h: int, w: int, res: int, patch: int, max_long: int | None = None) -> tuple[int, int]:
    """Short side -> res, aspect kept, the long side at most `max_long` (default `MAX_LONG_SIDE * res`;
    a longer image is scaled so its long side fits), both sides floored to a multiple of the patch size."""
    max_long = MAX_LONG_SIDE * res if max_long is None else max_long
    s = min(res / min(h, w), max_long / max(h, w))
    return max(patch, int(h * s) // patch * patch), max(patch, int(w * s) // patch * patch)


def output_names(files: list[str]) -> dict[str, str]:
    """Output name (without `.png`) of each input: its stem, or its whole file name where stems collide."""
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    return {f: stem if stems.count(stem) == 1 else os.path.basename(f) for f, stem in zip(files, stems)}


def resize(img: np.ndarray, hw: tuple[int, int], nearest: bool = False) -> np.ndarray:
    mode = Image.NEAREST if nearest else Image.BILINEAR
    if img.ndim == 2:
        return np.asarray(Image.fromarray(img.astype(np.int32)).resize((hw[1], hw[0]), mode))
    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), mode))


def legend_names(workdir: str, config, use_linear: bool) -> tuple[list[str], np.ndarray | None]:
    """Names per output id, and (for the cluster probe) a cluster -> class map from a previous
    evaluation's Hungarian assignment, if the run has one."""
    names = viz.class_names(config)
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


def _fail(failed: dict, path: str, reason: str) -> None:
    failed[path] = reason
    print(f"skipping {path}: {reason}", file=sys.stderr, flush=True)


def _plan(files: list[str], res: int, patch: int, failed: dict) -> dict[tuple, list[str]]:
    """Inputs grouped by working size, from their headers alone (no pixels decoded); files that cannot be
    opened, decompression bombs and images beyond the aspect cap go into `failed`, by name."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for path in files:
        try:
            h, w = image_size(path)
        except CorruptFileError as e:
            _fail(failed, path, str(e))
            continue
        if max(h, w) > MAX_ASPECT * min(h, w):
            _fail(failed, path, f"{w}x{h} pixels: aspect ratio {max(h, w) / max(min(h, w), 1):.0f}:1 exceeds "
                                f"{MAX_ASPECT:.0f}:1; crop or split the image")
            continue
        groups[working_size(h, w, res, patch)].append(path)
    return groups


def _read(paths: list[str], failed: dict) -> list[tuple[str, np.ndarray]]:
    """The readable images of `paths`; the others go into `failed`, by name."""
    out = []
    for path in paths:
        try:
            out.append((path, read_rgb(path)))
        except CorruptFileError as e:
            _fail(failed, path, str(e))
    return out


def _write(img: np.ndarray, pred: np.ndarray, lut, names: list[str], out_dir: str, name: str) -> None:
    """Label map at working size -> palette PNG and overlay at the image's own size."""
    p = pred.astype(np.int64)
    if lut is not None:
        p = lut[p]
    full = resize(p.astype(np.int32), img.shape[:2], nearest=True).astype(np.int16)
    viz.save_label_png(full, os.path.join(out_dir, "labels", name + ".png"))
    Image.fromarray(viz.overlay(img, full, names)).save(os.path.join(out_dir, "overlays", name + ".png"))


class Segmenter:
    """A finished run, loaded once, segmenting uint8 RGB batches (see `segment`): its featurizer,
    parameters and compiled functions (one program per input shape)."""

    def __init__(self, workdir: str):
        self.config = config = load_run_config(workdir)
        validate(config)
        self.featurizer = run_featurizer(config, workdir)
        self.modules = modules = build_modules(config)
        self.device = jax.devices()[0]
        # One device: images of different sizes come in small groups, not worth a mesh.
        mesh = parallel.make_mesh([self.device])
        self.params = jax.device_put(restore_params(workdir, config, self.featurizer.dim), self.device)
        self.code_fn = make_code_fn(modules, make_featurize(self.featurizer, mesh), flip=config.eval.flip)

        @jax.jit
        def logits_fn(params, c, hw_like):
            out = probe_outputs(modules, params, c, hw_like.shape[1:3])
            return out["cluster"], out["linear"]

        self.logits_fn = logits_fn

    def logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(2*cos cluster logits, linear logits), each [B,H,W,K] float32, of uint8 images [B,H,W,3]."""
        images = np.asarray(images)
        p = self.featurizer.patch_size
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 RGB [B,H,W,3], got {images.dtype} {list(images.shape)}")
        if images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is not a multiple of the "
                             f"patch size {p}; resize or crop the images first")
        c = self.code_fn(self.featurizer.params, self.params["head"], jnp.asarray(images))
        cl, li = self.logits_fn(self.params, c, jnp.zeros(images.shape[:3]))
        return np.asarray(cl), np.asarray(li)

    def labels(self, images: np.ndarray, *, crf: bool = False,
               which: tuple[str, ...] = ("cluster", "linear")) -> dict[str, np.ndarray]:
        """{probe: int32 [B,H,W]} for the probes in `which`, after the dense CRF when `crf` (on
        the image as the official CRF sees it, `crf.official_rgb`)."""
        cl, li = self.logits(images)
        logits = [{"cluster": cl, "linear": li}[k] for k in which]
        if crf:
            rgb = crf_lib.official_rgb(images)
            labels = crf_lib.crf_labels(rgb, logits, backend=self.config.eval.crf_backend,
                                        processes=self.config.eval.get("crf_processes", 0))
        else:
            labels = [lg.argmax(-1) for lg in logits]
        return {k: np.asarray(v).astype(np.int32) for k, v in zip(which, labels)}


_SEGMENTERS: dict[tuple, Segmenter] = {}
def segment(workdir: str, images: np.ndarray, *, crf: bool = False) -> dict[str, np.ndarray]:
    """Segments uint8 RGB images [B,H,W,3] (sides multiples of the patch size) with the run in `workdir`.

    The official evaluation path: ImageNet normalisation, codes averaged with the horizontally flipped
    image's (the run's `eval.flip`, on by default), bilinear upsampling to the image size
    (align_corners=False), the linear probe and the cluster probe (softmax of 2*cosine to the cluster
    centres), the dense CRF on both when `crf` (given the image exactly as the official CRF sees it,
    see `crf.official_rgb`), argmax. Returns {"cluster": int32 [B,H,W] raw cluster
    indices, "linear": int32 [B,H,W] class indices}. The run is loaded once per process (again when its
    config.json changes) and each input shape compiled once.
    """
    key = (os.path.realpath(workdir), os.stat(os.path.join(workdir, "config.json")).st_mtime_ns
           if os.path.exists(os.path.join(workdir, "config.json")) else None)
    if key not in _SEGMENTERS:
        _SEGMENTERS.clear()
        _SEGMENTERS[key] = Segmenter(workdir)
    return _SEGMENTERS[key].labels(images, crf=crf)


def predict_folder(workdir: str, images_dir: str, out_dir: str, *, crf: bool | None = None,
                   use_linear: bool = False, batch_size: int = 8, quiet: bool = False) -> dict:
    """Segment every image in `images_dir` (see the module docstring for sizes, names and skips);
    returns {"written": [...], "failed": {path: reason}, "outputs": {path: output name}}."""
    seg = Segmenter(workdir)
    config, featurizer = seg.config, seg.featurizer
    crf = bool(config.eval.crf) if crf is None else crf
    names, lut = legend_names(workdir, config, use_linear)

    os.makedirs(os.path.join(out_dir, "labels"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "overlays"), exist_ok=True)
    files = list_images(images_dir)
    out_names = output_names(files)
    failed: dict[str, str] = {}
    groups = _plan(files, config.eval.res, featurizer.patch_size, failed)
    written = []
    bar = tqdm(total=sum(len(v) for v in groups.values()), disable=quiet, desc="predict")
    for hw, paths in groups.items():  # one compiled shape per working size
        for i in range(0, len(paths), batch_size):
            batch = paths[i:i + batch_size]
            chunk = _read(batch, failed)  # only one batch of full-size images in memory at a time
            bar.update(len(batch) - len(chunk))
            if not chunk:
                continue
            small = np.stack([resize(img, hw) for _, img in chunk])
            if len(paths) > batch_size:  # several batches of this size: one padded shape
                small = pad_rows(small, batch_size)
            lg = seg.logits(small)[1 if use_linear else 0][:len(chunk)]
            if crf:
                rgb = crf_lib.official_rgb(small[:len(chunk)])
                pred = np.asarray(crf_lib.crf_labels(rgb, lg, backend=config.eval.crf_backend,
                                                     processes=config.eval.get("crf_processes", 0)))
            else:
                pred = lg.argmax(-1)
            for (path, img), p in zip(chunk, pred):
                _write(img, p, lut, names, out_dir, out_names[path])
                written.append(path)
                bar.update(1)
    bar.close()
    summary = {"written": written, "failed": {f: failed[f] for f in files if f in failed},
               "outputs": {f: out_names[f] + ".png" for f in written}}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if failed:
        listed = ", ".join(os.path.basename(f) for f in summary["failed"])
        print(f"{len(failed)} of {len(files)} images failed: {listed} (reasons above and in "
              f"{os.path.join(out_dir, 'summary.json')})", file=sys.stderr, flush=True)
    if not quiet:
        print(f"wrote {len(written)} label maps and overlays to {out_dir}; {len(failed)} file(s) skipped")
    return summary


def _define(fv, argv) -> None:
    flags.DEFINE_string("workdir", None, "workdir of the training run (its config and best checkpoint "
                        "are used)", flag_values=fv, required=True)
    flags.DEFINE_string("images", None, "folder of images (jpg/png/webp/tiff/bmp/gif)", flag_values=fv,
                        required=True)
    flags.DEFINE_string("out", None, "output folder (labels/, overlays/, summary.json)", flag_values=fv,
                        required=True)
    flags.DEFINE_bool("crf", None, "apply the dense CRF (default: the run's eval.crf); --nocrf to skip it",
                      flag_values=fv)
    flags.DEFINE_bool("linear", False, "use the (supervised) linear probe instead of the cluster probe",
                      flag_values=fv)
    flags.DEFINE_integer("batch-size", 8, "images per forward pass", lower_bound=1, flag_values=fv)


def _main(fv, _) -> int:
    parallel.enable_compilation_cache()
    summary = predict_folder(fv.workdir, fv.images, fv.out, crf=fv.crf, use_linear=fv.linear,
                             batch_size=fv["batch-size"].value)
    return 2 if summary["failed"] else 0


def main(argv=None) -> int:
    """`python -m stego_jax.predict --workdir W --images DIR --out DIR`; returns the exit status."""
    return cli.run("stego_jax.predict", __doc__, _define, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
