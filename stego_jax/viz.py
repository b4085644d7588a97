"""Pictures of segmentations: the palette, coloured label maps, class names, the validation
preview panel for TensorBoard, overlays with a legend, palette label PNGs and the confusion plot."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from stego_jax import data, metrics, parallel  # noqa: E402

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
    """The dataset's class names, or "class i" where it has none of that count."""
    try:
        names = list(data.class_names(config.data.name))
        if len(names) == config.data.n_classes:
            return names
    except (KeyError, ValueError, AttributeError, TypeError):
        pass
    return [f"class {i}" for i in range(config.data.n_classes)]


def preview_panels(config, params, predict, val_batches, n_images: int = 3) -> np.ndarray:
    """Ground truth | cluster probe (Hungarian-matched on these images) | linear probe, for the
    first validation images, as one uint8 RGB panel for TensorBoard."""
    feats, labels = next(iter(val_batches()))
    pc, pl = predict(params, feats, tuple(labels.shape[1:3]))
    pc, pl, lab = (parallel.gather_to_host(x)[:n_images] for x in (pc, pl, labels))
    n = config.data.n_classes
    match = metrics.scores(pc, lab, n, n_clusters=n + config.model.extra_clusters)
    pc = metrics.map_clusters(pc, match["assignment"])
    rows = [np.concatenate([colorize(lab[i]), colorize(pc[i]), colorize(pl[i])], axis=1)
            for i in range(len(lab))]
    return np.concatenate(rows, axis=0)


def overlay(img: np.ndarray, labels: np.ndarray, names: list[str], alpha: float = 0.5) -> np.ndarray:
    """Image blended with the label colours, and a legend of the classes present."""
    colour = colorize(labels)
    # Integer blend (weights in 1/256): 4 bytes a pixel channel instead of float32 copies of large images.
    a = int(round(alpha * 256))
    blend = ((img.astype(np.uint16) * (256 - a) + colour.astype(np.uint16) * a + 128) >> 8).astype(np.uint8)
    present = [int(c) for c in np.unique(labels) if c >= 0]
    row_h = 14
    legend = Image.new("RGB", (blend.shape[1], row_h * max(1, len(present)) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for i, c in enumerate(present):
        y = 2 + i * row_h
        draw.rectangle([4, y, 14, y + 10], fill=tuple(int(v) for v in colorize(np.array([[c]]))[0, 0]))
        draw.text((20, y - 1), names[c] if c < len(names) else str(c), fill=(0, 0, 0))
    return np.concatenate([blend, np.asarray(legend)], axis=0)


def save_label_png(labels: np.ndarray, path: str) -> None:
    """int labels [H,W] as a palette PNG (pixel value = label, 255 = none/unmatched)."""
    lab = Image.fromarray(np.where(labels < 0, 255, labels).astype(np.uint8), mode="P")
    pal = np.zeros((256, 3), np.uint8)
    pal[:len(PALETTE)] = PALETTE
    lab.putpalette(pal.reshape(-1).tolist())
    lab.save(path)


def save_confusion_png(conf: np.ndarray, names: list[str], path: str) -> None:
    """Column-normalised confusion matrix [predicted, truth] of the linear probe as a PNG."""
    m = conf.astype(np.float64)
    m = m / np.maximum(m.sum(0, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(4, len(names) * 0.35 + 2),) * 2)
    ax.imshow(m.T, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted (linear probe)")
    ax.set_ylabel("ground truth")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_overlays(overlays: list, results: dict, out_dir: str) -> None:
    """Image | truth | cluster (CRF if run) | k-means | linear panels, one PNG per image, under
    `out_dir/overlays/`; clusters drawn as their Hungarian-matched class."""
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
