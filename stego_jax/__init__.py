"""stego_jax: STEGO (unsupervised semantic segmentation by distilling feature correspondences) in JAX."""

__version__ = "0.1.0"
