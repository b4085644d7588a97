"""Prepared (e.g. five-cropped) splits as ArrayRecord files plus a JSON manifest, read without TensorFlow.

tfds builders are not used: encoding `tfds.features.Image` needs TensorFlow (measured: building fails with
"No module named 'tensorflow'"), while training must run TF-free. ArrayRecord is the random-access format
tfds itself writes on disk, and grain's `ArrayRecordDataSource` reads it directly.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import msgpack
import numpy as np
from PIL import Image

from stego_jax.data import transforms
from stego_jax.data.sources import CorruptFileError, Source

MANIFEST = "manifest.json"
FORMAT = "stego_jax.prepared/1"
CROP_TYPES = ("five", None)


def record_path(root: str, split: str) -> str:
    """The ArrayRecord file of `split` under a prepared directory."""
    return os.path.join(root, f"{split}.array_record")


def ids_path(root: str, split: str) -> str:
    """The text file listing the record ids of `split`, one per line."""
    return os.path.join(root, f"{split}.ids.txt")


def has_manifest(root: str | None) -> bool:
    """Whether `root` is a prepared directory."""
    return bool(root) and os.path.isfile(os.path.join(root, MANIFEST))


def encode_image(image: np.ndarray, fmt: str, jpeg_quality: int) -> bytes:
    """uint8 `[H, W, 3]` -> JPEG (the official crops are PIL JPEGs at its default quality 75) or PNG bytes."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(image).save(buf, "JPEG", quality=jpeg_quality)
    else:
        Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def encode_label(label: np.ndarray) -> bytes:
    """int32 labels with -1 ignore -> uint8 PNG of `label + 1` (0 = ignore), as the official crops."""
    if label.size and (label.min() < -1 or label.max() > 254):
        raise ValueError(f"labels must lie in [-1, 254] to be stored as uint8 label+1, got "
                         f"[{label.min()}, {label.max()}]")
    buf = io.BytesIO()
    Image.fromarray((label + 1).astype(np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def _crops(image: np.ndarray, label: np.ndarray, crop: str | None, ratio: float
           ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    if crop is None:
        return [("", image, label)]
    return [(f"/{n}", i, lab) for n, i, lab in
            zip(transforms.FIVE_CROP_NAMES, transforms.five_crop(image, ratio), transforms.five_crop(label, ratio))]


def write_split(source: Source, out_dir: str, split: str, *, crop: str | None = "five", ratio: float = 0.5,
                jpeg_quality: int = 75, skip_corrupt: bool = False, num_workers: int = 4,
                dataset: str | None = None) -> dict:
    """Write one prepared split: record `k*i + c` holds crop `c` (tl, tr, bl, br, center) of source image `i`.

    Five-crops are stored as JPEG, uncropped images as lossless PNG; labels as uint8 PNG of label + 1.
    Updates (or creates) the directory's manifest and returns this split's manifest entry.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if crop not in CROP_TYPES:
        raise ValueError(f"crop must be one of {CROP_TYPES}, got {crop!r}")
    dir_crop = crop
    # Only the training split is cropped: the official validation and evaluation read the uncropped
    # val split (crop_type=None) after a nearest resize + centre crop.
    crop = crop if split == "train" else None
    os.makedirs(out_dir, exist_ok=True)
    fmt = "jpeg" if crop == "five" else "png"
    skipped: list[str] = []
    labelled: list[bool] = []  # one True is enough: some record carries a label

    def work(i: int) -> list[tuple[str, bytes]] | None:
        try:
            image, label = source.load(i)
        except CorruptFileError as e:
            if not skip_corrupt:
                raise
            logging.warning("prepare: skipping unreadable %s (%s)", e.path, e)
            skipped.append(e.path)
            return None
        if not labelled and label.size and int(label.max()) >= 0:
            labelled.append(True)
        return [(source.ids[i] + suffix,
                 msgpack.packb({"id": source.ids[i] + suffix, "image": encode_image(img, fmt, jpeg_quality),
                                "label": encode_label(lab)}, use_bin_type=True))
                for suffix, img, lab in _crops(image, label, crop, ratio)]

    path = record_path(out_dir, split)
    tmp = path + ".tmp"
    count = 0
    ids: list[str] = []
    # group_size:1 makes every record individually addressable for fast random access.
    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            for records in _ordered_map(pool, work, range(len(source)), window=4 * max(1, num_workers)):
                for record_id, r in records or ():
                    writer.write(r)
                    ids.append(record_id)
                    count += 1
    finally:
        writer.close()
    os.replace(tmp, path)
    # Ids also go to a text sidecar so readers get `.ids` without touching the image bytes.
    with open(ids_path(out_dir, split), "w") as f:
        f.write("".join(i + "\n" for i in ids))
    entry = {"file": os.path.basename(path), "ids_file": os.path.basename(ids_path(out_dir, split)),
             "count": count, "skipped": sorted(skipped), "crop": crop, "has_labels": bool(labelled)}
    manifest_path = os.path.join(out_dir, MANIFEST)
    manifest = {"format": FORMAT, "splits": {}}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if (manifest.get("dataset"), manifest.get("crop"), manifest.get("ratio")) != (dataset, dir_crop, ratio):
            raise ValueError(f"{manifest_path} describes dataset={manifest.get('dataset')}, crop="
                             f"{manifest.get('crop')}, ratio={manifest.get('ratio')}; write dataset={dataset}, "
                             f"crop={dir_crop}, ratio={ratio} to another --out directory")
    manifest.update(dataset=dataset, crop=dir_crop, ratio=ratio, image_format=fmt,
                    class_names=list(source.class_names))
    manifest["splits"][split] = entry
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)
    return entry


def _ordered_map(pool: ThreadPoolExecutor, fn, items, window: int) -> Iterator:
    """`pool.map` with at most `window` tasks in flight, so memory stays bounded on large datasets."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class PreparedSource:
    """Random access to a prepared split (decoded crops and labels, -1 ignore)."""

    def __init__(self, root: str, split: str):
        import grain

        with open(os.path.join(root, MANIFEST)) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{os.path.join(root, MANIFEST)} has format {self.manifest.get('format')!r}, "
                             f"expected {FORMAT!r}; re-run `python -m stego_jax.data.prepare`")
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise FileNotFoundError(
                f"{root} has prepared splits {sorted(splits)} but not {split!r}; run `python -m "
                f"stego_jax.data.prepare {self.manifest.get('dataset')} --source RAW --out {root} --splits {split}`")
        path = os.path.join(root, splits[split]["file"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} listed in the manifest is missing; re-run the prepare command")
        self.root, self.split, self.path = root, split, path
        self.name = self.manifest.get("dataset") or "prepared"
        self.class_names = tuple(self.manifest.get("class_names", ()))
        self.crop = splits[split].get("crop", self.manifest.get("crop"))
        self._records = grain.sources.ArrayRecordDataSource([path])
        if len(self._records) != splits[split]["count"]:
            raise ValueError(f"{path} holds {len(self._records)} records but the manifest says "
                             f"{splits[split]['count']}; the file is truncated, re-run the prepare command")
        with open(os.path.join(root, splits[split]["ids_file"])) as f:
            self.ids = f.read().splitlines()
        if len(self.ids) != len(self._records):
            raise ValueError(f"{splits[split]['ids_file']} lists {len(self.ids)} ids for {len(self._records)} "
                             f"records in {path}; re-run the prepare command")

    def __len__(self) -> int:
        return len(self._records)

    def describe(self, index: int) -> str:
        return f"{self.path}[record {index}]"

    @property
    def has_labels(self) -> bool | None:
        """Whether any record carries a label (None for directories prepared before this was recorded)."""
        return self.manifest["splits"][self.split].get("has_labels")

    def record(self, index: int) -> dict:
        """The raw record `{"id", "image", "label"}` (encoded bytes)."""
        return msgpack.unpackb(self._records[index], raw=False)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rec = self.record(index)
        try:
            with Image.open(io.BytesIO(rec["image"])) as im:
                image = np.asarray(im.convert("RGB"), dtype=np.uint8)
            with Image.open(io.BytesIO(rec["label"])) as im:
                label = np.asarray(im, dtype=np.int32) - 1
        except (OSError, SyntaxError, ValueError) as e:
            raise CorruptFileError(self.describe(index) + f" (id {rec.get('id')})", f"{type(e).__name__}: {e}") from e
        return image, label
