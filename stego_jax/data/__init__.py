"""Datasets, transforms and the input pipeline."""
