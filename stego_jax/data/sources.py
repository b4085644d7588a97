"""Random-access readers of the raw dataset layouts returning full-resolution arrays.

The layouts are those of the official STEGO dataset bundles (`STEGO_ZIP_URL`; official `src/data.py`
classes `Coco`, `CityscapesSeg`, `Potsdam`, `DirectoryDataset`).

Each reader checks its layout on construction and says what to download and where to put it when
something is missing; decoding errors name the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps

from stego_jax.data import classes, synthetic

STEGO_ZIP_URL = "https://marhamilresearch4.blob.core.windows.net/stego-public/pytorch_data/{}.zip"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")


class CorruptFileError(ValueError):
    """An image or label file that is missing or cannot be decoded."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(
            f"Cannot read {path}: {reason}. Replace the file (re-download or re-extract the dataset), or set "
            f"config.data.skip_corrupt=True (prepare: --skip-corrupt) to skip unreadable files, each one logged "
            f"and counted.")


class RawLayoutError(FileNotFoundError):
    """The raw dataset directory does not have the expected layout."""


class Source(Protocol):
    """Random access to full-resolution `(image uint8 [H,W,3], label int32 [H,W])` pairs."""

    name: str
    class_names: tuple[str, ...]
    ids: list[str]

    def __len__(self) -> int: ...

    def describe(self, index: int) -> str:
        """The file(s) behind item `index`, for messages."""
        ...

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...


def _open_image(path: str) -> Image.Image:
    """`Image.open` with the decompression-bomb limit enforced before any pixel is decoded.

    PIL itself only warns between `Image.MAX_IMAGE_PIXELS` and twice that; here anything above the
    limit is refused (raise `PIL.Image.MAX_IMAGE_PIXELS` for genuinely huge images).
    """
    im = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    w, h = im.size
    if limit is not None and w * h > limit:
        im.close()
        raise Image.DecompressionBombError(
            f"{w}x{h} = {w * h} pixels exceeds the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS); a "
            f"corrupt header or a decompression bomb. If the image is genuine, raise "
            f"PIL.Image.MAX_IMAGE_PIXELS")
    return im


def _decode_error(path: str, e: BaseException) -> CorruptFileError:
    if isinstance(e, FileNotFoundError):
        return CorruptFileError(path, "file not found")
    return CorruptFileError(path, f"{type(e).__name__}: {str(e)[:300]}")


def read_rgb(path: str) -> np.ndarray:
    """Decode any PIL-readable image (grayscale, RGBA, CMYK, palette, 16-bit...) to uint8 RGB `[H, W, 3]`,
    turned upright by its EXIF orientation tag (training, evaluation and prediction all read through here).

    Any file that cannot be decoded, and any image above `PIL.Image.MAX_IMAGE_PIXELS` (refused before
    decoding), raises `CorruptFileError` naming the file.
    """
    try:
        with _open_image(path) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # upright, as viewers show it (EXIF orientation)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # PIL's convert("RGB") clips 16/32-bit grey at 255; rescale the real range instead.
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                grey = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001  PIL's decoders raise many types on a damaged file
        raise _decode_error(path, e) from (None if isinstance(e, FileNotFoundError) else e)


def read_label_png(path: str) -> np.ndarray:
    """Decode a single-channel label PNG (modes L, P, I, I;16) to its raw integer values `[H, W]` int32.

    Any file that cannot be decoded, a multi-channel image, and any image above
    `PIL.Image.MAX_IMAGE_PIXELS` (refused before decoding) raise `CorruptFileError` naming the file.
    """
    try:
        with _open_image(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise CorruptFileError(path, f"label images must be single-channel (L, P or I), got mode {im.mode}")
            im.load()
            return np.asarray(im).astype(np.int32)
    except (CorruptFileError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  PIL's decoders raise many types on a damaged file
        raise _decode_error(path, e) from (None if isinstance(e, FileNotFoundError) else e)


EXIF_ORIENTATION = 0x0112
# The PIL transpose that turns stored pixels upright for each EXIF orientation (as ImageOps.exif_transpose).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _header(path: str) -> tuple[int, int, int]:
    """`(height, width, EXIF orientation)` of the stored pixels, from the file's header only."""
    try:
        with Image.open(path) as im:
            try:
                orientation = int(im.getexif().get(EXIF_ORIENTATION, 1))
            except (OSError, SyntaxError, ValueError, TypeError, KeyError):
                orientation = 1  # unreadable EXIF: the pixels as stored (what exif_transpose does then too)
            return im.size[1], im.size[0], orientation
    except FileNotFoundError:
        raise CorruptFileError(path, "file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptFileError(path, f"{type(e).__name__}: {e}") from e


def image_orientation(path: str) -> int:
    """The EXIF orientation tag of an image file (1, upright, when it has none)."""
    return _header(path)[2]


def image_size(path: str) -> tuple[int, int]:
    """`(height, width)` of an image as `read_rgb` returns it (upright), from the header alone: no pixels
    are decoded. Raises `CorruptFileError` for unreadable files and decompression bombs (more pixels than
    PIL's `Image.MAX_IMAGE_PIXELS` allows)."""
    h, w, orientation = _header(path)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def orient_like_image(label: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a label map stored on its image's pixel grid the way `read_rgb` turns the image upright."""
    if orientation not in _UPRIGHT:
        return label
    turned = Image.fromarray(np.ascontiguousarray(label, dtype=np.int32)).transpose(_UPRIGHT[orientation])
    return np.asarray(turned, dtype=np.int32)


def require_files(paths: Sequence[str], dataset: str, root: str, hint: str) -> None:
    """Raise `RawLayoutError` listing the missing `paths` (first five) followed by `hint`."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        listed = "\n  ".join(missing[:5]) + (f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RawLayoutError(f"The {dataset} data under {root!r} is incomplete; missing:\n  {listed}\n{hint}")


@dataclass
class PairedFileSource:
    """Images and label files addressed by path lists (COCO-Stuff, Cityscapes, image folders)."""

    name: str
    class_names: tuple[str, ...]
    ids: list[str]
    image_paths: list[str]
    label_paths: list[str | None]
    label_map: Callable[[np.ndarray], np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self, index: int) -> str:
        return self.image_paths[index]

    @property
    def has_labels(self) -> bool:
        """Whether any image has a label file (an image folder without `labels/` has none)."""
        return any(p is not None for p in self.label_paths)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_rgb(self.image_paths[index])
        label_path = self.label_paths[index]
        if label_path is None:
            return image, np.full(image.shape[:2], -1, np.int32)
        # Label files are drawn on the image's stored pixel grid (COCO, Cityscapes): the turn read_rgb gives
        # the image by its EXIF orientation is given to the label too, so the two stay aligned.
        label = orient_like_image(read_label_png(label_path), image_orientation(self.image_paths[index]))
        if label.shape != image.shape[:2]:
            raise CorruptFileError(label_path, f"label size {label.shape} differs from image size "
                                               f"{image.shape[:2]} of {self.image_paths[index]}")
        return image, self.label_map(label)


COCO_HINT = (
    "Download the official STEGO COCO-Stuff bundle " + STEGO_ZIP_URL.format("cocostuff") + " (about 20 GB), unzip "
    "it and pass its cocostuff/ directory, which holds images/{train2017,val2017}/<id>.jpg, "
    "annotations/{train2017,val2017}/<id>.png (COCO-Stuff-164k 182-class PNGs) and curated/{train2017,val2017}/"
    "Coco164kFull_Stuff_Coarse*.txt. Images and annotations can also come from cocodataset.org (train2017.zip, "
    "val2017.zip, stuffthingmaps_trainval2017.zip).")
COCO_LISTS = {"train": ("train2017", "Coco164kFull_Stuff_Coarse.txt"),
              "val": ("val2017", "Coco164kFull_Stuff_Coarse_7.txt")}


def cocostuff27_source(root: str, split: str) -> PairedFileSource:
    """COCO-Stuff-27: IIC curated image lists, 182 fine classes mapped to 27 coarse (train list / val list _7)."""
    subdir, list_name = COCO_LISTS[_check_split(split, COCO_LISTS, "cocostuff27")]
    list_path = os.path.join(root, "curated", subdir, list_name)
    require_files([os.path.join(root, "images", subdir), os.path.join(root, "annotations", subdir), list_path],
             "cocostuff27", root, COCO_HINT)
    with open(list_path) as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise RawLayoutError(f"{list_path} lists no images. {COCO_HINT}")
    return PairedFileSource(
        "cocostuff27", classes.COCOSTUFF27_CLASSES, ids,
        [os.path.join(root, "images", subdir, i + ".jpg") for i in ids],
        [os.path.join(root, "annotations", subdir, i + ".png") for i in ids],
        classes.cocostuff27_labels)


CITYSCAPES_HINT = (
    "Register at https://www.cityscapes-dataset.com/downloads/ and download leftImg8bit_trainvaltest.zip and "
    "gtFine_trainvaltest.zip; unzip both into the same directory so that it holds leftImg8bit/{train,val}/<city>/"
    "*_leftImg8bit.png and gtFine/{train,val}/<city>/*_gtFine_labelIds.png (the torchvision Cityscapes layout; "
    "the official STEGO bundle " + STEGO_ZIP_URL.format("cityscapes") + " has the same layout).")


def cityscapes27_source(root: str, split: str) -> PairedFileSource:
    """Cityscapes-27 (fine annotations): labelIds - 7, 27 classes; cities and files in sorted order.

    torchvision lists files in `os.listdir` order, which depends on the file system; sorting makes the
    order (and so k-NN tables and batches) reproducible.
    """
    split = _check_split(split, {"train": 0, "val": 0, "test": 0}, "cityscapes27")
    img_root = os.path.join(root, "leftImg8bit", split)
    gt_root = os.path.join(root, "gtFine", split)
    require_files([img_root, gt_root], "cityscapes27", root, CITYSCAPES_HINT)
    ids, images, labels = [], [], []
    for city in sorted(os.listdir(img_root)):
        for fn in sorted(os.listdir(os.path.join(img_root, city))):
            if not fn.endswith("_leftImg8bit.png"):
                continue
            stem = fn[: -len("_leftImg8bit.png")]
            ids.append(stem)
            images.append(os.path.join(img_root, city, fn))
            labels.append(os.path.join(gt_root, city, stem + "_gtFine_labelIds.png"))
    if not ids:
        raise RawLayoutError(f"No *_leftImg8bit.png images under {img_root}/<city>/. {CITYSCAPES_HINT}")
    require_files(labels, "cityscapes27", root, CITYSCAPES_HINT)
    return PairedFileSource("cityscapes27", classes.CITYSCAPES27_CLASSES, ids, images, labels,
                            classes.cityscapes27_labels)


POTSDAM_HINT = (
    "Download the official STEGO Potsdam bundle " + STEGO_ZIP_URL.format("potsdam") + ", unzip it and pass its "
    "potsdam/ directory, which holds imgs/<id>.mat (key 'img'), gt/<id>.mat (key 'gt'), labelled_train.txt and "
    "labelled_test.txt.")
POTSDAM_LISTS = {"train": ("labelled_train.txt",), "val": ("labelled_test.txt",),
                 "unlabelled_train": ("unlabelled_train.txt",), "all": ("all.txt",),
                 "train+val": ("labelled_train.txt", "labelled_test.txt")}


def potsdam_image(arr: np.ndarray, path: str) -> np.ndarray:
    """Potsdam `img` array (RGBIR, `[H, W, 4]`) -> uint8 RGB, checking the value range.

    The official code calls `to_pil_image` on the array: uint8 (what IIC's `potsdam_prepare.py` writes,
    and IIC's loader asserts) is used unchanged; a float array would be multiplied by 255, so floats must
    lie in [0, 1]. Anything else is refused rather than silently rescaled.
    """
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise CorruptFileError(path, f"'img' must be [H, W, 3 or 4] (RGB[IR]), got shape {arr.shape}")
    rgb = arr[..., :3]  # the official code drops the IR channel
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    if np.issubdtype(rgb.dtype, np.floating) and rgb.size and 0.0 <= rgb.min() and rgb.max() <= 1.0:
        return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    raise CorruptFileError(path, f"'img' has dtype {rgb.dtype} and range [{rgb.min()}, {rgb.max()}]; expected "
                                 f"uint8 0..255 or float 0..1")


@dataclass
class PotsdamSource:
    """Potsdam `.mat` tiles (200x200 RGBIR, IIC preparation) with 6 or merged 3 classes."""

    name: str
    root: str
    ids: list[str]
    class_names: tuple[str, ...]
    label_map: Callable[[np.ndarray], np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self, index: int) -> str:
        return os.path.join(self.root, "imgs", self.ids[index] + ".mat")

    @property
    def has_labels(self) -> bool:
        """Whether any tile has a `gt/<id>.mat` (the unlabelled splits have none)."""
        return any(os.path.exists(os.path.join(self.root, "gt", i + ".mat")) for i in self.ids)

    def _loadmat(self, path: str, key: str) -> np.ndarray:
        import scipy.io

        try:
            return np.asarray(scipy.io.loadmat(path)[key])
        except FileNotFoundError:
            raise CorruptFileError(path, "file not found") from None
        except KeyError:
            raise CorruptFileError(path, f"no variable {key!r} in the .mat file") from None
        except (OSError, ValueError, TypeError) as e:
            raise CorruptFileError(path, f"{type(e).__name__}: {e}") from e

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path = self.describe(index)
        image = potsdam_image(self._loadmat(img_path, "img"), img_path)
        gt_path = os.path.join(self.root, "gt", self.ids[index] + ".mat")
        if not os.path.exists(gt_path):
            # Unlabelled tiles; the official code would label them all 1 (a real class), we ignore them.
            return image, np.full(image.shape[:2], -1, np.int32)
        gt = self._loadmat(gt_path, "gt")
        if gt.shape != image.shape[:2]:
            raise CorruptFileError(gt_path, f"gt shape {gt.shape} differs from image shape {image.shape[:2]}")
        return image, self.label_map(gt)


def _potsdam(name: str, class_names: tuple[str, ...], label_map: Callable) -> Callable[[str, str], PotsdamSource]:
    def make(root: str, split: str) -> PotsdamSource:
        lists = POTSDAM_LISTS[_check_split(split, POTSDAM_LISTS, name)]
        list_paths = [os.path.join(root, n) for n in lists]
        require_files([os.path.join(root, "imgs"), *list_paths], name, root, POTSDAM_HINT)
        ids = []
        for p in list_paths:
            with open(p) as f:
                ids.extend(line.strip() for line in f if line.strip())
        return PotsdamSource(name, root, ids, class_names, label_map)

    return make


FOLDER_HINT = ("An image folder holds imgs/{train,val}/<name>.<jpg|png|webp|tif> and optionally "
               "labels/{train,val}/<name>.png (single-channel class ids, same stem as the image).")


def image_folder_source(root: str, split: str) -> PairedFileSource:
    """Own images: `imgs/<split>/*` sorted by name, labels paired by file stem (raw values, -1 if none)."""
    img_dir = os.path.join(root, "imgs", split)
    require_files([img_dir], "image_folder", root, FOLDER_HINT)
    names = sorted(fn for fn in os.listdir(img_dir) if fn.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise RawLayoutError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {img_dir}. {FOLDER_HINT}")
    stems = [os.path.splitext(n)[0] for n in names]
    if len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise ValueError(f"{img_dir} has several images with the same name stem ({dup[:5]}); labels are paired by "
                         f"stem, so rename them")
    label_dir = os.path.join(root, "labels", split)
    if os.path.isdir(label_dir):
        labels: list[str | None] = [os.path.join(label_dir, s + ".png") for s in stems]
        require_files([p for p in labels if p], "image_folder", root,
                 f"Every image needs a label PNG with the same stem when {label_dir} exists. {FOLDER_HINT}")
    else:
        labels = [None] * len(names)
    return PairedFileSource("image_folder", (), stems, [os.path.join(img_dir, n) for n in names], labels,
                            lambda x: x.astype(np.int32))


@dataclass
class ArraySource:
    """In-memory images and labels (the synthetic dataset)."""

    name: str
    class_names: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    @property
    def has_labels(self) -> bool:
        return bool(np.any(np.asarray(self.labels) >= 0))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[index], self.labels[index]


SYNTHETIC_VAL_SEED_OFFSET = 123  # val seed = seed + 123, as the demo measurements (train 0, val 123)


def synthetic_source(n: int, seed: int, size: int, n_classes: int) -> ArraySource:
    """The synthetic dataset generated in memory."""
    images, labels = synthetic.generate(n, seed, size=size, n_classes=n_classes)
    names = synthetic.CLASS_NAMES if n_classes == 5 else tuple(f"class{i}" for i in range(n_classes))
    return ArraySource("synthetic", names, images, labels, [f"synthetic-{seed}-{i:06d}" for i in range(n)])


def _check_split(split: str, allowed, dataset: str) -> str:
    if split not in allowed:
        raise ValueError(f"{dataset} has no split {split!r}; choose one of {sorted(allowed)}")
    return split


RAW_SOURCES: dict[str, Callable[[str, str], Source]] = {
    "cocostuff27": cocostuff27_source,
    "cityscapes27": cityscapes27_source,
    "potsdam3": _potsdam("potsdam3", classes.POTSDAM3_CLASSES, classes.potsdam3_labels),
    "potsdam": _potsdam("potsdam", classes.POTSDAM6_CLASSES, classes.potsdam6_labels),
    "image_folder": image_folder_source,
}
