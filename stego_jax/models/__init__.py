"""Flax models: the frozen DINO ViT backbone, the STEGO head and probes, demo featurizers."""
