"""DINO backbone weights: registry, cached download, torch-free checkpoint reading and conversion
to the Flax ViT params."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from stego_jax.models.vit import ViTConfig
from stego_jax.weights.convert import (
    convert_state_dict,
    flatten_params,
    infer_config,
    select_state_dict,
    to_dino_layout,
)
from stego_jax.weights.download import default_cache_dir, fetch, sidecar_path
from stego_jax.weights.errors import CheckpointError, UnreadableFileError
from stego_jax.weights.registry import DEFAULT_BASE_URL, REGISTRY, WeightSpec, get_spec
from stego_jax.weights.safetensors_io import load_npz, load_safetensors
from stego_jax.weights.torch_pickle import load_torch_checkpoint

__all__ = [
    "CheckpointError",
    "UnreadableFileError",
    "REGISTRY",
    "WeightSpec",
    "load_dino",
    "read_checkpoint",
    "resolve_base_url",
    "flatten_params",
    "load_torch_checkpoint",
    "load_safetensors",
    "load_npz",
]


# Registry names already warned about in this process (one warning each).
_UNPINNED_WARNED: set[str] = set()


def resolve_base_url(base_url: str | None = None) -> str:
    """The download base: `base_url`, else $STEGO_JAX_WEIGHTS_URL, else the official host."""
    return base_url or os.environ.get("STEGO_JAX_WEIGHTS_URL") or DEFAULT_BASE_URL


def read_checkpoint(path: str | Path) -> Any:
    """Reads a local `.pth`/`.pt`, `.safetensors` or `.npz` file into numpy arrays.

    No torch needed and no code from the file is run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return load_torch_checkpoint(path)
    if suffix == ".safetensors":
        return load_safetensors(path)
    if suffix == ".npz":
        return load_npz(path)
    raise CheckpointError(
        path,
        f"{path}: unsupported weights file type {suffix!r}; use .pth/.pt, .safetensors or .npz"
    )


def load_dino(
    name_or_path: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    base_url: str | None = None,
    num_heads: int | None = None,
) -> tuple[ViTConfig, dict[str, Any]]:
    """Loads a DINO ViT backbone as (ViTConfig, Flax params of float32 numpy arrays).

    `name_or_path` is a registry name (see `REGISTRY`: dino_vits16, dino_vits8, dino_vits8_300ep,
    dino_vitb16, dino_vitb8), downloaded once into `cache_dir` (default $STEGO_JAX_CACHE or
    ~/.cache/stego_jax/weights) from `base_url` (default $STEGO_JAX_WEIGHTS_URL or the official
    host), or a local file in the DINO/timm, Hugging Face ViT or flat Flax ('a/b/c') key layout.
    The architecture comes from the tensor shapes; `num_heads` overrides the default
    embed_dim // 64 (for registry names it comes from the registry).
    """
    path = Path(name_or_path).expanduser()
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        spec = get_spec(name_or_path)
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        url = spec.url(resolve_base_url(base_url))
        if spec.sha256 is None and spec.name not in _UNPINNED_WARNED:
            _UNPINNED_WARNED.add(spec.name)
            warnings.warn(
                f"{spec.name}: no published SHA-256 is pinned for {spec.path}, so the first file "
                f"seen at {cache / spec.filename} is trusted and its digest recorded in "
                f"{sidecar_path(cache / spec.filename)}; later loads are checked against that "
                "record only. Compare the file with a trusted copy if in doubt.",
                stacklevel=2,
            )
        path = fetch(
            url,
            cache / spec.filename,
            sha256=spec.sha256,
            progress=progress,
        )
        sd = select_state_dict(read_checkpoint(path), str(path))
        # Check the architecture first: a wrong file should say so, not fail on some derived shape.
        arch = infer_config(to_dino_layout(sd, str(path))[0], str(path), num_heads=1)
        found = (arch.patch_size, arch.embed_dim, arch.depth)
        want = (spec.patch_size, spec.embed_dim, spec.depth)
        if found != want:
            raise ValueError(
                f"{path} (for {spec.name}) holds a ViT with patch/embed_dim/depth {found}, "
                f"expected {want}; the file is not the {spec.name} checkpoint. Delete it and load "
                "again to re-download it."
            )
        return convert_state_dict(sd, str(path), num_heads or spec.num_heads)
    if not path.exists():
        raise FileNotFoundError(
            f"{name_or_path!s} is neither a registry name ({sorted(REGISTRY)}) nor an existing file"
        )
    return convert_state_dict(
        select_state_dict(read_checkpoint(path), str(path)), str(path), num_heads
    )
