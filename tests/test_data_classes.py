"""Class lists and label mappings vs the official STEGO tables (official `src/data.py`: `Coco.fine_to_coarse`,
`CityscapesSeg`, `Potsdam.fine_to_coarse`; `get_class_labels` in `src/train_segmentation.py`)."""

import numpy as np
import pytest

from stego_jax.data import classes

# The official COCO-Stuff-27 table, written out by hand from `Coco.fine_to_coarse` and `get_class_labels`
# (coarse index | name | fine ids).
PUBLISHED_COCO27 = """
0 electronic 71-76 | 1 appliance 77-82 | 2 food 51-60 | 3 furniture 61-70 | 4 indoor 83-90 | 5 kitchen 43-50
6 accessory 25-32 | 7 animal 15-24 | 8 outdoor 9-14 | 9 person 0 | 10 sports 33-42 | 11 vehicle 1-8
12 ceiling 101-102 | 13 floor 100,113-117 | 14 food 120-121,152,169
15 furniture 97,106-107,109,111,122,129,132,155,160,164 | 16 rawmaterial 99,131,138,142
17 textile 91-92,103-104,108,130,136,140,151,166-167 | 18 wall 170-176 | 19 window 179-180
20 building 94-95,127,150,157,165 | 21 ground 110,124-125,135,139,143-144,146,148,153,158
22 plant 93,96,118,123,128,133,141,162,168 | 23 sky 105,156 | 24 solid 126,134,149,159,161,181
25 structural 98,112,137,145,163 | 26 water 119,147,154,177-178
"""


def parse_published():
    table = {}
    for cell in PUBLISHED_COCO27.replace("\n", " | ").split("|"):
        if not cell.strip():
            continue
        idx, name, ids = cell.split()
        fines = []
        for part in ids.split(","):
            lo, _, hi = part.partition("-")
            fines.extend(range(int(lo), int(hi or lo) + 1))
        table[int(idx)] = (name, fines)
    return table


def test_coco27_table_matches_published():
    table = parse_published()
    assert sorted(table) == list(range(27))
    assert classes.COCOSTUFF27_CLASSES == tuple(table[c][0] for c in range(27))
    want = {f: c for c, (_, fines) in table.items() for f in fines}
    assert len(want) == 182 and sorted(want) == list(range(182))
    assert classes.COCOSTUFF_FINE_TO_COARSE == want


def test_coco27_label_mapping():
    fine = np.array([[0, 1, 181, 255], [105, 156, 170, 200]], np.uint8)
    np.testing.assert_array_equal(classes.cocostuff27_labels(fine), [[9, 11, 24, -1], [23, 23, 18, -1]])


def test_cityscapes27_mapping_and_names():
    names = ("road, sidewalk, parking, rail track, building, wall, fence, guard rail, bridge, tunnel, pole, "
             "polegroup, traffic light, traffic sign, vegetation, terrain, sky, person, rider, car, truck, bus, "
             "caravan, trailer, train, motorcycle, bicycle").split(", ")
    assert classes.CITYSCAPES27_CLASSES == tuple(names)
    ids = np.arange(-1, 40)
    got = classes.cityscapes27_labels(ids)
    want = np.where((ids >= 7) & (ids <= 33), ids - 7, -1)
    np.testing.assert_array_equal(got, want)
    assert got[ids == 7][0] == 0 and got[ids == 26][0] == names.index("car")  # labelId 26 is car


def test_potsdam_merge():
    gt = np.array([0, 1, 2, 3, 4, 5, 255, 7])
    np.testing.assert_array_equal(classes.potsdam3_labels(gt), [0, 1, 2, 2, 0, 1, -1, -1])
    np.testing.assert_array_equal(classes.potsdam6_labels(gt), [0, 1, 2, 3, 4, 5, -1, -1])
    assert len(classes.POTSDAM3_CLASSES) == 3 and len(classes.POTSDAM6_CLASSES) == 6


def test_class_names_lookup():
    from stego_jax.data import class_names

    assert class_names("cocostuff27")[23] == "sky" and len(class_names("cityscapes27")) == 27
    assert class_names("potsdam3") == classes.POTSDAM3_CLASSES and len(class_names("synthetic")) == 5
    with pytest.raises(ValueError, match="image_folder"):
        class_names("image_folder")
