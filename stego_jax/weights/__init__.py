"""Backbone weights (DINO v1, DINOv2, DINOv3): registry, cached download, torch-free checkpoint reading
and conversion to the Flax backbone params."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

from stego_jax.models.dinov2 import DinoV2Config, dinov2_config
from stego_jax.models.dinov3 import DinoV3Config, dinov3_config
from stego_jax.models.vit import ViTConfig
from stego_jax.weights import convert_dinov2, convert_dinov3
from stego_jax.weights.convert import (
    convert_state_dict,
    flatten_params,
    infer_config,
    select_state_dict,
    to_dino_layout,
)
from stego_jax.weights.download import default_cache_dir, fetch, sidecar_path
from stego_jax.weights.errors import CheckpointError, UnreadableFileError
from stego_jax.weights.registry import (
    DEFAULT_BASE_URL,
    DINOV2_REGISTRY,
    DINOV3_REGISTRY,
    DINOV3_REQUEST_URL,
    REGISTRY,
    WeightSpec,
    get_spec,
    is_registered,
)
from stego_jax.weights.safetensors_io import load_npz, load_safetensors
from stego_jax.weights.torch_pickle import load_torch_checkpoint

__all__ = [
    "CheckpointError",
    "UnreadableFileError",
    "REGISTRY",
    "DINOV2_REGISTRY",
    "DINOV3_REGISTRY",
    "dinov3_dir",
    "WeightSpec",
    "load_backbone",
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


def resolve_base_url(base_url: str | None = None, spec: WeightSpec | None = None) -> str:
    """The download base: `base_url`, else $STEGO_JAX_WEIGHTS_URL (a mirror holding every
    registry path under one base), else the official host of `spec` (DINO's by default)."""
    return (
        base_url
        or os.environ.get("STEGO_JAX_WEIGHTS_URL")
        or (spec.base_url if spec is not None else DEFAULT_BASE_URL)
    )


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


def load_backbone(
    name_or_path: str | Path,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    base_url: str | None = None,
    num_heads: int | None = None,
    **overrides: Any,
) -> tuple[ViTConfig | DinoV2Config | DinoV3Config, dict[str, Any]]:
    """Loads a frozen backbone as (config, Flax params of float32 numpy arrays), any family.

    `name_or_path` is a registry name (DINO: dino_vits16, dino_vits8, dino_vits8_300ep,
    dino_vitb16, dino_vitb8; DINOv2: dinov2_vit{s,b,l,g}14 and their `_reg` variants),
    downloaded once into `cache_dir` (default $STEGO_JAX_CACHE or ~/.cache/stego_jax/weights)
    from `base_url` (default $STEGO_JAX_WEIGHTS_URL or the family's official host), or a local
    .pth/.pt/.safetensors/.npz file in any supported key layout (DINO/timm, Hugging Face ViT or
    Dinov2, flat Flax 'a/b/c'). The family (DINOv2 files have LayerScale, mask or register
    tokens, or a SwiGLU FFN), FFN type, registers and stored grid come from the tensors; the
    DINOv2 interpolation settings are the official hub builders' for that kind of model. A
    registry file must hold exactly the entry's architecture, else the error names the tensor.
    `num_heads` overrides the default embed_dim // 64; `overrides` replace config fields
    (`ViTConfig` or `DinoV2Config`, e.g. interpolate_antialias=False).

    DINOv3 (dinov3_vits16, dinov3_vits16plus, dinov3_vitb16, dinov3_vitl16) is never downloaded:
    its weights are released after a request, and a registry name is the official file found in
    `dinov3_dir()` ($STEGO_JAX_DINOV3_DIR, default <cache_dir>/dinov3); a path to the official
    .pth works too. A DINOv3 file (storage tokens, RoPE periods or a key-bias mask) is read in
    the official key layout only; its heads come from the RoPE periods.

    Returns `ViTConfig` for DINO v1, `DinoV2Config` for DINOv2, `DinoV3Config` for DINOv3;
    `stego_jax.models.build_backbone` makes the matching module.
    """
    path = Path(name_or_path).expanduser()
    if str(name_or_path) in DINOV3_REGISTRY:
        spec = DINOV3_REGISTRY[str(name_or_path)]
        path = _find_dinov3(spec, cache_dir)
        sd = select_state_dict(read_checkpoint(path), str(path))
        return _load_registered_dinov3(spec, sd, str(path), num_heads, overrides)
    if is_registered(name_or_path):
        spec = get_spec(str(name_or_path))
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        url = spec.url(resolve_base_url(base_url, spec))
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
        if spec.family == "dinov2":
            return _load_registered_dinov2(spec, sd, str(path), num_heads, overrides)
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
        return _v1(sd, str(path), num_heads or spec.num_heads, overrides)
    if not path.exists():
        raise FileNotFoundError(
            f"{name_or_path!s} is neither a registry name "
            f"({sorted(REGISTRY) + sorted(DINOV2_REGISTRY) + sorted(DINOV3_REGISTRY)}) nor an "
            "existing file"
        )
    sd = select_state_dict(read_checkpoint(path), str(path))
    # Before DINOv2: DINOv3 files carry DINOv2's markers (mask token, LayerScale) too.
    if convert_dinov3.looks_like_dinov3(sd):
        return convert_dinov3.convert_state_dict(sd, str(path), num_heads, **overrides)
    if convert_dinov2.looks_like_dinov2(sd):
        return convert_dinov2.convert_state_dict(sd, str(path), num_heads, **overrides)
    return _v1(sd, str(path), num_heads, overrides)


def _v1(sd, where: str, num_heads: int | None, overrides: dict[str, Any]):
    cfg, params = convert_state_dict(sd, where, num_heads)
    if overrides:
        cfg = convert_dinov2.apply_overrides(cfg, overrides)
    return cfg, params


def _load_registered_dinov2(spec: WeightSpec, sd, where: str, num_heads, overrides):
    """A registry DINOv2 file against its hub configuration (the entry's name)."""
    claimed = dinov2_config(spec.name)
    claimed = dataclasses.replace(
        claimed,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        num_register_tokens=spec.num_register_tokens,
    )
    try:
        return convert_dinov2.convert_state_dict(
            sd, where, num_heads, claimed=claimed, **overrides
        )
    except ValueError as e:
        raise ValueError(
            f"{e}; the file is not the {spec.name} checkpoint. Delete it and load again to "
            "re-download it."
        ) from None


def dinov3_dir(cache_dir: str | Path | None = None) -> Path:
    """Where DINOv3 registry names are looked up: $STEGO_JAX_DINOV3_DIR, else `<cache>/dinov3`
    (cache: `cache_dir`, $STEGO_JAX_CACHE or ~/.cache/stego_jax/weights)."""
    env = os.environ.get("STEGO_JAX_DINOV3_DIR")
    if env:
        return Path(env).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return cache / "dinov3"


def _find_dinov3(spec: WeightSpec, cache_dir) -> Path:
    """The official file of a DINOv3 entry in `dinov3_dir()`: its exact hub name, else the one
    `dinov3_<arch>_pretrain_*.pth` there (another hash or weights set)."""
    folder = dinov3_dir(cache_dir)
    exact = folder / spec.path
    if exact.is_file():
        return exact
    stem = spec.path.split("_pretrain_")[0]
    found = sorted(folder.glob(f"{stem}_pretrain_*.pth")) if folder.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise FileNotFoundError(
            f"{spec.name}: several candidate files in {folder}: {[f.name for f in found]}; keep "
            f"one, or set model.backbone to the path of the file to use"
        )
    raise FileNotFoundError(
        f"{spec.name}: {exact} not found. DINOv3 weights are released under the DINOv3 License "
        f"after a request at {DINOV3_REQUEST_URL}; download {spec.path} with the link you are "
        f"sent and put it in {folder} (set $STEGO_JAX_DINOV3_DIR to use another folder), or set "
        "model.backbone to the file's path."
    )


def _load_registered_dinov3(spec: WeightSpec, sd, where: str, num_heads, overrides):
    """A registry DINOv3 file against its hub configuration."""
    try:
        return convert_dinov3.convert_state_dict(
            sd, where, num_heads, claimed=dinov3_config(spec.name), **overrides
        )
    except ValueError as e:
        raise ValueError(f"{e}; the file is not the {spec.name} checkpoint") from None


load_dino = load_backbone  # the DINO v1 name, kept for existing callers
