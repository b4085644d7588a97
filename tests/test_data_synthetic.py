"""Synthetic dataset: determinism, shapes and class statistics (the dataset is described in docs/demo.md)."""

import numpy as np

from stego_jax.data.synthetic import generate


def test_generate_shapes_and_determinism():
    im, lb = generate(50, 3)
    assert im.shape == (50, 96, 96, 3) and im.dtype == np.uint8
    assert lb.shape == (50, 96, 96) and lb.dtype == np.int32
    im2, lb2 = generate(50, 3)
    np.testing.assert_array_equal(im, im2)
    np.testing.assert_array_equal(lb, lb2)
    # image i depends only on (seed, i): a shorter run is a prefix
    im3, lb3 = generate(10, 3)
    np.testing.assert_array_equal(im[:10], im3)
    assert not np.array_equal(generate(5, 4)[0], im[:5])


def test_class_statistics():
    im, lb = generate(120, 123)
    freq = np.bincount(lb.ravel(), minlength=5) / lb.size
    assert 0.6 <= freq[0] <= 0.72, freq
    assert np.all((freq[1:] > 0.05) & (freq[1:] < 0.12)), freq
    # 2-3 objects per image: between 1 and 4 distinct classes in every image, background always present
    for labels in lb:
        present = np.unique(labels)
        assert present[0] == 0 and 2 <= len(present) <= 4
    # colour is a poor cue: mean colours of classes 1 and 2 (and 3 and 4) are close
    means = np.array([im[lb == c].mean(0) for c in range(5)])
    assert np.abs(means[1] - means[2]).max() < 20 and np.abs(means[3] - means[4]).max() < 20
    assert np.abs(means[1] - means[3]).max() > 50


def test_textures_are_distinguishable():
    im, lb = generate(60, 0)
    grey = im.astype(np.float32).mean(-1)
    # horizontal stripes vary along y much more than along x; checker varies along both
    def grad_ratio(c):
        inside = (lb == c)[:, 1:, 1:] & (lb == c)[:, :-1, 1:] & (lb == c)[:, 1:, :-1]
        dy = np.abs(np.diff(grey, axis=1))[:, :, 1:][inside].mean()
        dx = np.abs(np.diff(grey, axis=2))[:, 1:, :][inside].mean()
        return dy / dx
    assert grad_ratio(1) > 2.0
    assert 0.5 < grad_ratio(2) < 2.0


def test_other_sizes_and_classes():
    im, lb = generate(4, 0, size=64, n_classes=7)
    assert im.shape == (4, 64, 64, 3) and lb.max() < 7
