"""Class lists and label mappings of the STEGO benchmarks (COCO-Stuff-27, Cityscapes-27, Potsdam-3/6).

Mappings are lookup tables applied with one `np.take`; every raw value outside the table becomes -1 (ignore).
"""

from __future__ import annotations

import numpy as np

# COCO-Stuff-27: coarse index -> (name, fine COCO-Stuff-164k ids), as the official `Coco.fine_to_coarse`
# (official `src/data.py`, class `Coco`) and `get_class_labels` (official `src/train_segmentation.py`).
_COCO27: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("electronic", tuple(range(71, 77))),
    ("appliance", tuple(range(77, 83))),
    ("food", tuple(range(51, 61))),
    ("furniture", tuple(range(61, 71))),
    ("indoor", tuple(range(83, 91))),
    ("kitchen", tuple(range(43, 51))),
    ("accessory", tuple(range(25, 33))),
    ("animal", tuple(range(15, 25))),
    ("outdoor", tuple(range(9, 15))),
    ("person", (0,)),
    ("sports", tuple(range(33, 43))),
    ("vehicle", tuple(range(1, 9))),
    ("ceiling", (101, 102)),
    ("floor", (100, 113, 114, 115, 116, 117)),
    ("food", (120, 121, 152, 169)),
    ("furniture", (97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164)),
    ("rawmaterial", (99, 131, 138, 142)),
    ("textile", (91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167)),
    ("wall", tuple(range(170, 177))),
    ("window", (179, 180)),
    ("building", (94, 95, 127, 150, 157, 165)),
    ("ground", (110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158)),
    ("plant", (93, 96, 118, 123, 128, 133, 141, 162, 168)),
    ("sky", (105, 156)),
    ("solid", (126, 134, 149, 159, 161, 181)),
    ("structural", (98, 112, 137, 145, 163)),
    ("water", (119, 147, 154, 177, 178)),
)
COCOSTUFF27_CLASSES: tuple[str, ...] = tuple(name for name, _ in _COCO27)
COCOSTUFF_FINE_TO_COARSE: dict[int, int] = {f: c for c, (_, fines) in enumerate(_COCO27) for f in fines}

CITYSCAPES27_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider",
    "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
CITYSCAPES_FIRST_NONVOID = 7  # labelIds 0..6 are void classes

POTSDAM6_CLASSES: tuple[str, ...] = ("roads", "buildings", "vegetation", "trees", "cars", "clutter")
POTSDAM3_CLASSES: tuple[str, ...] = ("roads and cars", "buildings and clutter", "trees and vegetation")
POTSDAM_FINE_TO_COARSE: dict[int, int] = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}


def _lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    lut = np.full(size, -1, np.int32)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


_COCO_LUT = _lut(COCOSTUFF_FINE_TO_COARSE)
_CITYSCAPES_LUT = _lut({i: i - CITYSCAPES_FIRST_NONVOID for i in range(CITYSCAPES_FIRST_NONVOID,
                                                                        CITYSCAPES_FIRST_NONVOID + 27)})
_POTSDAM3_LUT = _lut(POTSDAM_FINE_TO_COARSE)
_POTSDAM6_LUT = _lut({i: i for i in range(6)})


def _apply(lut: np.ndarray, raw: np.ndarray) -> np.ndarray:
    raw = np.asarray(raw).astype(np.int64)
    # Values outside the table (negative, or beyond 255) are ignore as well.
    inside = (raw >= 0) & (raw < lut.size)
    return np.where(inside, lut[np.clip(raw, 0, lut.size - 1)], -1).astype(np.int32)


def cocostuff27_labels(fine: np.ndarray) -> np.ndarray:
    """COCO-Stuff-164k fine ids (0..181, 255 unlabeled) -> 27 coarse classes, -1 ignore.

    The official code maps ids 182..254 to 0 (its zero-initialized buffer); they never occur in the
    real annotations, and we map them to -1 instead.
    """
    return _apply(_COCO_LUT, fine)


def cityscapes27_labels(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds -> labelId - 7 for labelIds 7..33, else -1 (void, license plate -1)."""
    return _apply(_CITYSCAPES_LUT, label_ids)


def potsdam3_labels(gt: np.ndarray) -> np.ndarray:
    """Potsdam 6 classes -> 3: {0,4}->0, {1,5}->1, {2,3}->2; 255 and any other value -> -1."""
    return _apply(_POTSDAM3_LUT, gt)


def potsdam6_labels(gt: np.ndarray) -> np.ndarray:
    """Potsdam 6 classes unchanged (0..5); 255 and any other value -> -1."""
    return _apply(_POTSDAM6_LUT, gt)
