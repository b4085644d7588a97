"""Transforms vs independent NumPy re-derivations of the torchvision/PIL semantics."""

import numpy as np
import pytest
from PIL import Image

from stego_jax.data import transforms as T


def pil_nearest_reference(n_in: int, n_out: int) -> np.ndarray:
    """PIL's affine nearest loop for a pure scale: start at scale/2, add scale per pixel, truncate (double)."""
    scale, v, out = n_in / n_out, 0.0, []
    v = scale * 0.5
    for _ in range(n_out):
        out.append(min(int(v), n_in - 1))
        v += scale
    return np.array(out)


def reference_resize_short(img, res):
    h, w = img.shape[:2]
    # torchvision _compute_resized_output_size for an int size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = res, int(res * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img[pil_nearest_reference(h, new_h)[:, None], pil_nearest_reference(w, new_w)[None, :]]


@pytest.mark.parametrize("hw", [(480, 640), (427, 640), (640, 427), (1024, 2048), (200, 200), (37, 91), (100, 50)])
@pytest.mark.parametrize("res", [224, 320, 96])
def test_resize_short_nearest_matches_reference(hw, res):
    rng = np.random.default_rng(hw[0] * res)
    img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    out = T.resize_short_nearest(img, res)
    np.testing.assert_array_equal(out, reference_resize_short(img, res))
    assert min(out.shape[:2]) == res
    # and the same as PIL resizing the whole image (torchvision's code path for PIL inputs)
    want = np.asarray(Image.fromarray(img).resize((out.shape[1], out.shape[0]), Image.NEAREST))
    np.testing.assert_array_equal(out, want)


def test_resize_labels_keep_ignore_and_dtype():
    lab = np.random.default_rng(0).integers(-1, 27, (333, 500)).astype(np.int32)
    out = T.resize_short_nearest(lab, 224)
    assert out.dtype == np.int32 and out.shape == (224, 336)
    np.testing.assert_array_equal(out, reference_resize_short(lab, 224))
    assert set(np.unique(out)) <= set(np.unique(lab))


def test_center_crop_rounding():
    img = np.arange(7 * 11).reshape(7, 11)
    # torchvision: int(round(x / 2.0)) with Python's round-half-even: round(1.5) = 2, round(2.5) = 2
    np.testing.assert_array_equal(T.center_crop(img, (4, 6)), img[2:6, 2:8])
    np.testing.assert_array_equal(T.center_crop(img, 5), img[1:6, 3:8])  # round(1.0) = 1, round(3.0) = 3
    with pytest.raises(ValueError, match="larger"):
        T.center_crop(img, 8)


def test_official_transform_shapes():
    img = np.random.default_rng(1).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    out = T.official_transform(img, 224, is_label=False)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    full = reference_resize_short(img, 224)  # 224 x 298
    left = int(round((298 - 224) / 2.0))
    np.testing.assert_array_equal(out, full[:, left:left + 224])


def test_five_crop_geometry():
    h, w = 101, 150
    img = np.arange(h * w).reshape(h, w)
    crops = T.five_crop(img, 0.5)
    ch, cw = 50, 75
    expected_corners = {"tl": (0, 0), "tr": (0, w - cw), "bl": (h - ch, 0), "br": (h - ch, w - cw),
                        "center": (int(round((h - ch) / 2)), int(round((w - cw) / 2)))}
    assert len(crops) == 5
    for name, c in zip(T.FIVE_CROP_NAMES, crops):
        top, left = expected_corners[name]
        assert c.shape == (ch, cw)
        # every crop's top-left value identifies its origin in the arange image
        assert divmod(int(c[0, 0]), w) == (top, left)
    # the four corners cover the image corners
    assert crops[0][0, 0] == img[0, 0] and crops[1][0, -1] == img[0, -1]
    assert crops[2][-1, 0] == img[-1, 0] and crops[3][-1, -1] == img[-1, -1]


def test_normalize_matches_formula():
    img = np.array([[[0, 128, 255]]], np.uint8)
    got = T.normalize(img)
    want = (np.array([0, 128, 255]) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(got[0, 0], want, rtol=1e-6)
    assert got.dtype == np.float32


def test_photometric_augment_deterministic_and_off_by_default():
    img = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    plain = T.official_transform(img, 64, is_label=False)
    a = T.official_transform(img, 64, False, augment=True, rng=np.random.default_rng(5))
    b = T.official_transform(img, 64, False, augment=True, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == plain.shape and not np.array_equal(a, plain)
    with pytest.raises(ValueError, match="Generator"):
        T.official_transform(img, 64, False, augment=True)


@pytest.mark.parametrize("shape,res", [((480, 640), 224), ((300, 224), 224), ((96, 96), 96), ((96, 96), 64),
                                       ((37, 91), 224), ((640, 427), 320)])
def test_official_transform_is_resize_then_center_crop(shape, res):
    img = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    np.testing.assert_array_equal(T.official_transform(img, res, is_label=False),
                                  T.center_crop(T.resize_short_nearest(img, res), res))
    lab = img[..., 0].astype(np.int32) - 1
    np.testing.assert_array_equal(T.official_transform(lab, res, is_label=True),
                                  T.center_crop(reference_resize_short(lab, res), res))
