"""`build_dataset(config, split)`: the dataset registry and the transformed random-access `Dataset`.

Items are already through the official transform (Resize(res, NEAREST) + CenterCrop(res)).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

import numpy as np

from stego_jax.data import classes, prepared, sources, synthetic, transforms
from stego_jax.data.sources import CorruptFileError, Source


class Dataset:
    """Random access to `{"image": uint8 [res,res,3], "label": int32 [res,res] (-1 ignore), "id": str}`.

    With `crop_type="five"` over a raw source, item `5*i + c` is crop `c` (tl, tr, bl, br, center) of
    source image `i`, cut from the full-resolution image as the official `crop_datasets.py` (without its
    JPEG re-encoding; `prepare` reproduces that too).

    Unreadable files raise `CorruptFileError` naming the file; with `skip_corrupt=True` a warning names the
    file once, the file is counted in `skipped` / `stats`, and item `i` is
    - `corrupt="replace"` (training): replaced by the next readable item (i+1, i+2, ... wrapping);
    - `corrupt="ignore"` (validation): a black image whose label is all -1, so the metrics count every
      readable image once and the unreadable one not at all.

    With `n_classes`, the first item holding a label value >= `n_classes` logs one warning naming the
    dataset, the split, that value and `n_classes` (such pixels are ignored by the losses and metrics).
    """

    def __init__(self, source: Source, res: int, *, crop_type: str | None = None, crop_ratio: float = 0.5,
                 skip_corrupt: bool = False, corrupt: str = "replace", n_classes: int | None = None,
                 split: str | None = None):
        if crop_type not in (None, "five"):
            raise ValueError(f"crop_type must be None or 'five', got {crop_type!r}")
        if corrupt not in ("replace", "ignore"):
            raise ValueError(f"corrupt must be 'replace' or 'ignore', got {corrupt!r}")
        self.source, self.res, self.crop_type, self.crop_ratio = source, int(res), crop_type, crop_ratio
        self.skip_corrupt, self.corrupt = skip_corrupt, corrupt
        self.n_classes, self.split = (int(n_classes) if n_classes else None), split
        self._range_warned = False
        self.class_names: tuple[str, ...] = tuple(source.class_names)
        self.n_crops = 5 if crop_type == "five" else 1
        self.ids: list[str] = ([f"{i}/{n}" for i in source.ids for n in transforms.FIVE_CROP_NAMES]
                               if self.n_crops == 5 else list(source.ids))
        self._bad: dict[int, str] = {}  # item index -> unreadable file
        self._lock = threading.Lock()
        if len(self.ids) == 0:
            raise ValueError(f"dataset {source.name!r} is empty")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def skipped(self) -> int:
        """How many distinct items were found unreadable and skipped so far."""
        return len(self._bad)

    @property
    def stats(self) -> dict[str, Any]:
        """`{"skipped": count, "skipped_files": sorted file names}`."""
        with self._lock:
            return {"skipped": len(self._bad), "skipped_files": sorted(set(self._bad.values()))}

    @property
    def has_labels(self) -> bool | None:
        """Whether any item can carry a label (False: an unlabelled image folder or split; None: unknown)."""
        return getattr(self.source, "has_labels", None)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item `index` before the resize/crop: the full image, or its five-crop window."""
        if self.n_crops == 1:
            return self.source.load(index)
        image, label = self.source.load(index // 5)
        box = transforms.five_crop_boxes(image.shape[0], image.shape[1], self.crop_ratio)[index % 5]
        return transforms.crop(image, *box), transforms.crop(label, *box)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        index %= n
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                if self.corrupt == "ignore":
                    return self._ignored(j)
                continue
            try:
                image, label = self.load_raw(j)
            except CorruptFileError as e:
                if not self.skip_corrupt:
                    raise
                with self._lock:
                    first = j not in self._bad
                    self._bad[j] = e.path
                if first:
                    logging.warning("skipping unreadable item %d (%s)%s: %s", j, e.path,
                                    " (not counted)" if self.corrupt == "ignore" else "", e)
                if self.corrupt == "ignore":
                    return self._ignored(j)
                continue
            label = transforms.official_transform(label, self.res, is_label=True).astype(np.int32)
            self._check_range(label, j)
            return {"image": transforms.official_transform(image, self.res, is_label=False), "label": label,
                    "id": self.ids[j]}
        raise CorruptFileError(self.source.describe(index), "every item of the dataset is unreadable")

    def _ignored(self, j: int) -> dict[str, Any]:
        """Stand-in for unreadable item `j` that no metric counts: black image, all labels -1."""
        return {"image": np.zeros((self.res, self.res, 3), np.uint8),
                "label": np.full((self.res, self.res), -1, np.int32), "id": self.ids[j]}

    def _check_range(self, label: np.ndarray, j: int) -> None:
        if self.n_classes is None or self._range_warned or not label.size:
            return
        top = int(label.max())
        if top >= self.n_classes:
            with self._lock:
                if self._range_warned:
                    return
                self._range_warned = True
            logging.warning(
                "dataset %s, split %s: label value %d (first seen in %s) but data.n_classes=%d; pixels labelled "
                ">= n_classes are ignored by the losses and metrics. Set config.data.n_classes to the number of "
                "classes, or remap the label files (values 0..n_classes-1, -1 or any other value for ignore).",
                self.source.name, self.split or "?", top, self.source.describe(j // self.n_crops), self.n_classes)


def _cfg(data: Any, key: str, default: Any = None) -> Any:
    try:
        value = data.get(key, default) if hasattr(data, "get") else getattr(data, key, default)
    except AttributeError:
        return default
    return default if value is None and default is not None else value


def _raw(name: str) -> Callable[[Any, str], Source]:
    def make(data: Any, split: str) -> Source:
        root = _cfg(data, "root")
        if not root:
            raise ValueError(f"config.data.root must point at the {name} data (raw layout or prepared directory)")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"config.data.root={root!r} does not exist")
        return sources.RAW_SOURCES[name](root, split)

    return make


def _synthetic(data: Any, split: str) -> Source:
    seed = int(_cfg(data, "seed", 0))
    if split == "train":
        n = int(_cfg(data, "n_train", 1000))
    elif split == "val":
        n, seed = int(_cfg(data, "n_val", 200)), seed + sources.SYNTHETIC_VAL_SEED_OFFSET
    else:
        raise ValueError(f"synthetic has splits 'train' and 'val', not {split!r}")
    return sources.synthetic_source(n, seed, int(_cfg(data, "size", 96)), int(_cfg(data, "n_classes", 5)))


DATASETS: dict[str, Callable[[Any, str], Source]] = {
    "cocostuff27": _raw("cocostuff27"),
    "cityscapes27": _raw("cityscapes27"),
    "potsdam3": _raw("potsdam3"),
    "potsdam": _raw("potsdam"),
    "image_folder": _raw("image_folder"),
    "synthetic": _synthetic,
}


def build_dataset(config: Any, split: str) -> Dataset:
    """The `split` of `config.data` as a transformed `Dataset`.

    Reads a prepared directory when `config.data.root` holds a manifest (its crop must match
    `config.data.crop_type`), else the raw layout of `config.data.name` (five-crops cut on the fly when
    `crop_type == "five"`). The synthetic set uses seed `config.data.seed` for train and `seed + 123`
    for val.
    """
    data = config.data
    name = _cfg(data, "name")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset config.data.name={name!r}; allowed: {sorted(DATASETS)}")
    res = _cfg(data, "res")
    if not res or int(res) <= 0:
        raise ValueError(f"config.data.res must be a positive int, got {res!r}")
    crop_type = _cfg(data, "crop_type")
    crop_type = None if crop_type in (None, "", "none", "None") else crop_type
    if split != "train":
        # The official validation/evaluation never crops: crop_type applies to training only.
        crop_type = None
    ratio = float(_cfg(data, "crop_ratio", 0.5))
    # Training replaces an unreadable item by the next readable one; every other split must count each
    # image once, so there an unreadable item becomes one that no metric counts.
    common = dict(skip_corrupt=bool(_cfg(data, "skip_corrupt", False)),
                  corrupt="replace" if split == "train" else "ignore",
                  n_classes=_cfg(data, "n_classes"), split=split)
    root = _cfg(data, "root")
    if name != "synthetic" and prepared.has_manifest(root):
        source = prepared.PreparedSource(root, split)
        if source.manifest.get("dataset") not in (None, name):
            raise ValueError(f"{root} was prepared from {source.manifest.get('dataset')!r}, but config.data.name="
                             f"{name!r}")
        if source.crop != crop_type:
            raise ValueError(f"{root} holds crop={source.crop!r} data but config.data.crop_type={crop_type!r}; "
                             f"pass --config.data.crop_type={source.crop or 'none'} or point data.root at matching data")
        return Dataset(source, int(res), **common)
    return Dataset(DATASETS[name](data, split), int(res), crop_type=crop_type, crop_ratio=ratio, **common)


_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "cocostuff27": classes.COCOSTUFF27_CLASSES,
    "cityscapes27": classes.CITYSCAPES27_CLASSES,
    "potsdam3": classes.POTSDAM3_CLASSES,
    "potsdam": classes.POTSDAM6_CLASSES,
    "synthetic": synthetic.CLASS_NAMES,
}


def class_names(name: str) -> tuple[str, ...]:
    """Published class names of dataset `name` in label order (no list for `image_folder`)."""
    if name not in _CLASS_NAMES:
        raise ValueError(f"no fixed class list for dataset {name!r}; known: {sorted(_CLASS_NAMES)}")
    return _CLASS_NAMES[name]
