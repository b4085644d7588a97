"""Maps DINO/timm/Hugging Face/flat-Flax ViT state dicts onto the stego_jax Flax ViT param tree.

Every source layout is first brought to the official DINO torch key layout, checked key by key
against the shapes the inferred architecture needs, then transposed into Flax's layout.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from stego_jax.models.vit import ViTConfig
from stego_jax.weights._layout import (
    TorchToFlax,
    attention_shapes,
    flax_to_torch,
    fuse_hf_qkv,
    is_floating,
    mlp_shapes,
    stem_shapes,
    strip_prefixes,
)

# Wrappers around the backbone in DINO training: DDP ('module.'), MultiCropWrapper ('backbone.').
_STRIP_PREFIXES = ("module.", "backbone.")
# Not part of the backbone: DINO projection head / timm classifier, HF pooler and classifier.
_DROP_PREFIXES = ("head.", "pooler.", "classifier.")

# HF ViTModel per-block names -> DINO per-block names (the q/k/v split is handled separately).
_HF_BLOCK = {
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def select_state_dict(obj: Any, where: str) -> dict[str, np.ndarray]:
    """Finds the backbone state dict in a loaded checkpoint: the dict itself, or its 'teacher'
    (DINO training checkpoints), 'model' or 'state_dict' entry; returns {key: array}."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a dict of tensors, found {type(obj).__name__}")
    for key in ("teacher", "model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    non_arrays = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if non_arrays:
        raise ValueError(
            f"{where}: not a state dict of tensors (entries {non_arrays[:5]} are not tensors); "
            "expected the "
            "backbone weights themselves or a DINO training checkpoint with a 'teacher' entry"
        )
    return {str(k): v for k, v in obj.items()}


def _strip(key: str) -> str:
    return strip_prefixes(key, _STRIP_PREFIXES)


def _hf_to_dino(sd: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Hugging Face ViTModel keys -> DINO keys; q, k, v concatenated into qkv.

    HF's DINO conversion (transformers: convert_dino_to_pytorch.py) splits qkv rows as
    [0:D]=q, [D:2D]=k, [2D:3D]=v, each head-major, so concatenating in that order restores the
    (3, heads, head_dim) row order DINO's Attention reshapes to.
    """
    sd = {k[len("vit.") :] if k.startswith("vit.") else k: v for k, v in sd.items()}
    out: dict[str, np.ndarray] = {}
    top = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            out[key] = value  # reported as unexpected by the key check
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        qm = re.fullmatch(r"attention\.attention\.(query|key|value)", name)
        if qm:
            qkv.setdefault((i, kind), {})[qm.group(1)] = value
        elif name in _HF_BLOCK:
            out[f"blocks.{i}.{_HF_BLOCK[name]}.{kind}"] = value
        else:
            out[key] = value
    out.update(fuse_hf_qkv(qkv, where))
    return out


def _flax_to_dino(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat 'a/b/c' Flax paths (our own param tree) -> DINO keys, inverting `dino_to_flax`."""
    return flax_to_torch(sd, ("cls_token", "pos_embed"))


def to_dino_layout(sd: dict[str, np.ndarray], where: str) -> tuple[dict[str, np.ndarray], str]:
    """Normalises any supported key layout to the official DINO torch layout.

    Returns (state dict, layout name) with layout in {"dino", "huggingface", "flax"}. Wrapper
    prefixes ('module.', 'backbone.', HF's 'vit.') are stripped and head/pooler keys dropped.
    timm's ViT uses the DINO names already.
    """
    sd = {_strip(k): v for k, v in sd.items()}
    if any(k.startswith(("embeddings.", "encoder.layer.", "vit.embeddings.")) for k in sd):
        layout = "huggingface"
        sd = {k: v for k, v in sd.items() if not k.removeprefix("vit.").startswith(_DROP_PREFIXES)}
        sd = _hf_to_dino(sd, where)
    elif any("/" in k for k in sd):
        layout = "flax"
        sd = _flax_to_dino(sd)
    else:
        layout = "dino"
        sd = {k: v for k, v in sd.items() if not k.startswith(_DROP_PREFIXES)}
    return sd, layout


def expected_dino_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official DINO ViT state dict for `cfg`, with its torch shape."""
    d, p, g, h = cfg.embed_dim, cfg.patch_size, cfg.img_size // cfg.patch_size, cfg.mlp_dim
    shapes: dict[str, tuple[int, ...]] = {
        **stem_shapes(d, p, pos_rows=1 + g * g),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes.update(attention_shapes(b, d))
        shapes.update(mlp_shapes(b, d, h))
        if cfg.qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
    return shapes


def random_dino_state_dict(cfg: ViTConfig, *, scale: float = 0.02, seed: int = 0) -> dict[str, np.ndarray]:
    """A DINO ViT of `cfg`'s shapes in the official key layout with random weights (normal times
    `scale`; LayerNorms weight 1, bias 0): the FLOPs of the real model with no download, for
    benchmarks and offline checks of the whole chain. Save it with `np.savez` and name the file
    as `config.model.backbone`."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in expected_dino_shapes(cfg).items():
        if key.endswith(("norm1.weight", "norm2.weight")) or key == "norm.weight":
            sd[key] = np.ones(shape, np.float32)
        elif key.endswith(("norm1.bias", "norm2.bias")) or key == "norm.bias":
            sd[key] = np.zeros(shape, np.float32)
        else:
            sd[key] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return sd


def _need(sd: Mapping[str, np.ndarray], key: str, ndim: int, where: str) -> np.ndarray:
    if key not in sd:
        raise ValueError(
            f"{where}: key {key!r} is missing, so the architecture cannot be inferred; "
            f"is this a DINO ViT checkpoint? Found keys such as {sorted(sd)[:6]}"
        )
    if sd[key].ndim != ndim:
        raise ValueError(f"{where}: {key!r} has shape {sd[key].shape}, expected a {ndim}-d tensor")
    return sd[key]


def infer_config(
    sd: Mapping[str, np.ndarray], where: str, num_heads: int | None = None
) -> ViTConfig:
    """Reads the ViT architecture off a DINO-layout state dict's shapes.

    The head count is not in the shapes: `num_heads` if given, else embed_dim // 64 (DINO's ViTs
    all use head_dim 64: ViT-Ti 3, ViT-S 6, ViT-B 12 heads).
    """
    w = _need(sd, "patch_embed.proj.weight", 4, where)
    d, c, p, p2 = w.shape
    if c != 3 or p != p2:
        raise ValueError(
            f"{where}: 'patch_embed.proj.weight' has shape {w.shape}, expected [embed_dim, 3, p, p]"
        )
    indices = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not indices or indices != list(range(len(indices))):
        raise ValueError(
            f"{where}: transformer blocks must be numbered 0..depth-1, found indices {indices}"
        )
    hidden = _need(sd, "blocks.0.mlp.fc1.weight", 2, where).shape[0]
    rows = _need(sd, "pos_embed", 3, where).shape[1]
    g = math.isqrt(max(rows - 1, 0))
    if g * g != rows - 1 or g == 0:
        raise ValueError(
            f"{where}: 'pos_embed' has {rows} rows; expected 1 + G*G for a square G x G patch grid"
        )
    if num_heads is None:
        if d % 64:
            raise ValueError(
                f"{where}: embed_dim {d} is not a multiple of DINO's head_dim 64, so the number of "
                "heads "
                "cannot be guessed; pass num_heads="
            )
        num_heads = d // 64
    if num_heads <= 0 or d % num_heads:
        raise ValueError(f"{where}: embed_dim {d} is not divisible by num_heads={num_heads}")
    cfg = ViTConfig(
        patch_size=p,
        embed_dim=d,
        depth=len(indices),
        num_heads=num_heads,
        mlp_ratio=hidden / d,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        img_size=g * p,
    )
    if cfg.mlp_dim != hidden:  # int(D * ratio) must give back the stored hidden width
        raise ValueError(
            f"{where}: MLP hidden width {hidden} is not representable for embed_dim {d}"
        )
    return cfg


def check_shapes(
    sd: Mapping[str, np.ndarray], cfg: ViTConfig, where: str, layout: str = "dino"
) -> None:
    """Raises ValueError naming the first missing, unexpected or mis-shaped key (DINO key names)."""
    expected = expected_dino_shapes(cfg)
    note = "" if layout == "dino" else f" (DINO name of the {layout}-layout entry)"
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(
            f"{where}: key {missing[0]!r}{note} is missing "
            f"(expected shape {list(expected[missing[0]])}) "
            f"for a ViT with patch {cfg.patch_size}, embed_dim {cfg.embed_dim}, depth {cfg.depth}; "
            f"{len(missing)} key(s) missing in all"
        )
    extra = sorted(k for k in sd if k not in expected)
    if extra:
        raise ValueError(
            f"{where}: unexpected key {extra[0]!r}{note} with shape {list(sd[extra[0]].shape)} "
            f"({len(extra)} unexpected in all); it is not part of a DINO ViT backbone"
        )
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(
                f"{where}: {k!r}{note} has shape {list(sd[k].shape)}, expected {list(shape)} "
                "for a ViT "
                f"with patch {cfg.patch_size}, embed_dim {cfg.embed_dim}, depth {cfg.depth}"
            )
        if not is_floating(sd[k]):
            raise ValueError(
                f"{where}: {k!r}{note} has dtype {sd[k].dtype}, expected a floating-point tensor"
            )


def dino_to_flax(sd: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, Any]:
    """DINO-layout state dict -> nested Flax params of float32 numpy arrays.

    Linear weights [out, in] become kernels [in, out]; the patch conv [D, 3, p, p] (OIHW) becomes
    an HWIO kernel [p, p, 3, D]; LayerNorm weight becomes scale.
    """

    t = TorchToFlax(sd)
    params: dict[str, Any] = {
        "patch_embed": t.patch_embed(),
        "cls_token": t.f32("cls_token"),
        "pos_embed": t.f32("pos_embed"),
        "norm": t.norm("norm"),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        params[f"blocks_{i}"] = t.block(b, cfg.qkv_bias, t.mlp(b))
    return params


def convert_state_dict(
    sd: Mapping[str, np.ndarray], where: str, num_heads: int | None = None
) -> tuple[ViTConfig, dict[str, Any]]:
    """Any supported layout -> (ViTConfig, Flax params); `where` names the source in errors."""
    dino, layout = to_dino_layout(dict(sd), where)
    cfg = infer_config(dino, where, num_heads)
    check_shapes(dino, cfg, where, layout)
    return cfg, dino_to_flax(dino, cfg)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested param dict -> flat {'a/b/c': array}, the layout of our `.npz` backbone exports."""
    flat: dict[str, np.ndarray] = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            flat.update(flatten_params(v, f"{prefix}{k}/"))
        else:
            flat[prefix + k] = np.asarray(v)
    return flat
