"""Datasets, transforms and the input pipeline."""

from stego_jax.data.dataset import DATASETS, Dataset, build_dataset, class_names
from stego_jax.data.pipeline import batches, plan_step
from stego_jax.data.sources import CorruptFileError, RawLayoutError
from stego_jax.data.synthetic import generate
from stego_jax.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop,
    five_crop,
    normalize,
    official_transform,
    resize_short_nearest,
)

__all__ = [
    "DATASETS", "Dataset", "build_dataset", "class_names", "batches", "plan_step", "CorruptFileError", "RawLayoutError",
    "generate", "IMAGENET_MEAN", "IMAGENET_STD", "center_crop", "five_crop", "normalize", "official_transform",
    "resize_short_nearest",
]
