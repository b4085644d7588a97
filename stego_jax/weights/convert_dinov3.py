"""Maps DINOv3 state dicts (the official hub `.pth` layout) onto the stego_jax DINOv3 param tree.

The architecture is read off the tensors: width from `cls_token`, depth from the block indices,
patch from the patch embedding, storage tokens from `storage_tokens`, the FFN from `mlp.w1`
(SwiGLU) or `mlp.fc1` (MLP), the head width from the RoPE periods (D_head = 4 * len(periods),
so the number of heads needs no guess), the key-bias mask from `attn.qkv.bias_mask`. The norm
eps and RoPE base are the hub builders'. Every key is checked against the shapes that
architecture needs; a file that does not fit fails naming the tensor.

`mask_token` (training only) and `local_cls_norm.*` (the ViT-L SAT-493M checkpoint's norm for
local crops, "never used during eval") are dropped. The periods come from the file (the
official model loads that buffer too). The bias mask must be the official one (ones, zeros over
the key third, ones), which the model applies.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from stego_jax.models.dinov3 import DinoV3Config, swiglu_hidden
from stego_jax.weights._layout import (
    TorchToFlax,
    apply_overrides,
    check_tensors,
    resolve_config,
    stem_shapes,
    strip_prefixes,
)

_STRIP_PREFIXES = ("module.", "backbone.")
_DROP_PREFIXES = ("head.", "dino_head.", "ibot_head.", "local_cls_norm.")
_MARKERS = re.compile(r"(^|\.)(storage_tokens|rope_embed\.periods|attn\.qkv\.bias_mask)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _strip(key: str) -> str:
    return strip_prefixes(key, _STRIP_PREFIXES)


def looks_like_dinov3(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict holds a DINOv3 ViT: storage tokens, RoPE periods or a key-bias
    mask, none of which DINO v1 or DINOv2 files have."""
    return any(_MARKERS.search(_strip(str(k))) for k in sd)


def to_official_layout(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        k = _strip(str(k))
        if k.startswith(_DROP_PREFIXES):
            continue
        out[k] = v
    return out


def _need(sd: Mapping[str, np.ndarray], key: str, ndim: int, where: str) -> np.ndarray:
    if key not in sd:
        raise ValueError(f"{where}: tensor {key!r} is missing; not a DINOv3 ViT checkpoint")
    a = sd[key]
    if a.ndim != ndim:
        raise ValueError(f"{where}: tensor {key!r} has shape {list(a.shape)}, expected {ndim} dims")
    return a


def infer_config(
    sd: Mapping[str, np.ndarray], where: str, num_heads: int | None = None, **overrides: Any
) -> DinoV3Config:
    """The DINOv3 architecture of an official-layout state dict."""
    d = int(_need(sd, "cls_token", 3, where).shape[-1])
    patch = int(_need(sd, "patch_embed.proj.weight", 4, where).shape[-1])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK.match(k))), default=-1)
    if depth < 1:
        raise ValueError(f"{where}: no 'blocks.<i>.' tensors; not a DINOv3 ViT checkpoint")
    storage = int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0
    n_periods = int(_need(sd, "rope_embed.periods", 1, where).shape[0])
    head_dim = 4 * n_periods
    if head_dim == 0 or d % head_dim:
        raise ValueError(
            f"{where}: tensor 'rope_embed.periods' has {n_periods} periods; embed_dim {d} is not "
            f"a multiple of the head width 4 * {n_periods}"
        )
    heads = d // head_dim
    if num_heads and num_heads != heads:
        raise ValueError(
            f"{where}: num_heads={num_heads} does not fit tensor 'rope_embed.periods' "
            f"({n_periods} periods: head width {head_dim}, {heads} heads for embed_dim {d})"
        )
    if "blocks.0.mlp.w1.weight" in sd:
        ffn = "swiglu"
        hidden = int(_need(sd, "blocks.0.mlp.w1.weight", 2, where).shape[0])
        # The hub's S+/16 uses ratio 6; any ratio whose aligned width matches reproduces it.
        ratio = next(
            (r for r in (6.0, 4.0, 3.0, hidden * 1.5 / d) if swiglu_hidden(int(d * r)) == hidden),
            None,
        )
        if ratio is None:
            raise ValueError(
                f"{where}: tensor 'blocks.0.mlp.w1.weight' has {hidden} rows, not a SwiGLU "
                f"width int(D * ratio * 2/3) aligned to 8 for embed_dim {d}"
            )
    else:
        ffn = "mlp"
        ratio = int(_need(sd, "blocks.0.mlp.fc1.weight", 2, where).shape[0]) / d
    cfg = DinoV3Config(
        patch_size=patch,
        embed_dim=d,
        depth=depth,
        num_heads=heads,
        ffn_ratio=ratio,
        ffn=ffn,
        num_storage_tokens=storage,
        layer_scale="blocks.0.ls1.gamma" in sd,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        mask_k_bias="blocks.0.attn.qkv.bias_mask" in sd,
    )
    return apply_overrides(cfg, overrides)


def expected_shapes(cfg: DinoV3Config) -> dict[str, tuple[int, ...]]:
    """Every key of an official DINOv3 state dict for `cfg` with its torch shape."""
    d, p, h = cfg.embed_dim, cfg.patch_size, cfg.mlp_dim
    shapes: dict[str, tuple[int, ...]] = {
        **stem_shapes(d, p),
        "rope_embed.periods": (cfg.head_dim // 4,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if cfg.num_storage_tokens:
        shapes["storage_tokens"] = (1, cfg.num_storage_tokens, d)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            shapes[b + n + ".weight"] = shapes[b + n + ".bias"] = (d,)
        shapes[b + "attn.qkv.weight"] = (3 * d, d)
        if cfg.qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
            if cfg.mask_k_bias:
                shapes[b + "attn.qkv.bias_mask"] = (3 * d,)
        shapes[b + "attn.proj.weight"] = (d, d)
        shapes[b + "attn.proj.bias"] = (d,)
        if cfg.ffn == "swiglu":
            for n in ("w1", "w2"):
                shapes[b + f"mlp.{n}.weight"] = (h, d)
                shapes[b + f"mlp.{n}.bias"] = (h,)
            shapes[b + "mlp.w3.weight"] = (d, h)
            shapes[b + "mlp.w3.bias"] = (d,)
        else:
            shapes[b + "mlp.fc1.weight"] = (h, d)
            shapes[b + "mlp.fc1.bias"] = (h,)
            shapes[b + "mlp.fc2.weight"] = (d, h)
            shapes[b + "mlp.fc2.bias"] = (d,)
        if cfg.layer_scale:
            shapes[b + "ls1.gamma"] = shapes[b + "ls2.gamma"] = (d,)
    return shapes


def check_shapes(sd: Mapping[str, np.ndarray], cfg: DinoV3Config, where: str) -> None:
    """Raises ValueError naming the first missing, unexpected or mis-shaped tensor, or a key-bias
    mask other than the official one."""
    expected = expected_shapes(cfg)
    optional = {"mask_token": (1, cfg.embed_dim)}
    arch = (
        f"a DINOv3 ViT with patch {cfg.patch_size}, embed_dim {cfg.embed_dim}, depth {cfg.depth}, "
        f"{cfg.ffn} FFN (hidden {cfg.mlp_dim}), {cfg.num_storage_tokens} storage tokens"
    )
    check_tensors(sd, expected, optional, where, arch)
    d = cfg.embed_dim
    official = np.repeat(np.asarray([1.0, 0.0, 1.0], np.float32), d)
    for k in expected:
        if k.endswith("bias_mask") and not np.array_equal(
            np.asarray(sd[k]).astype(np.float32), official
        ):
            raise ValueError(
                f"{where}: tensor {k!r} is not the official key-bias mask (ones, zeros over "
                f"rows {d}:{2 * d}, ones)"
            )


def dinov3_to_flax(sd: Mapping[str, np.ndarray], cfg: DinoV3Config) -> dict[str, Any]:
    """Official-layout state dict -> nested Flax params of float32 numpy arrays."""

    t = TorchToFlax(sd)
    params: dict[str, Any] = {
        "patch_embed": t.patch_embed(),
        "cls_token": t.f32("cls_token"),
        "rope_embed": {"periods": t.f32("rope_embed.periods")},
        "norm": t.norm("norm"),
    }
    if cfg.num_storage_tokens:
        params["storage_tokens"] = t.f32("storage_tokens")
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        mlp = t.mlp(b, ("w1", "w2", "w3") if cfg.ffn == "swiglu" else ("fc1", "fc2"))
        params[f"blocks_{i}"] = t.block(b, cfg.qkv_bias, mlp, cfg.layer_scale)
    return params


def convert_state_dict(
    sd: Mapping[str, np.ndarray],
    where: str,
    num_heads: int | None = None,
    claimed: DinoV3Config | None = None,
    **overrides: Any,
) -> tuple[DinoV3Config, dict[str, Any]]:
    """An official-layout DINOv3 state dict -> (DinoV3Config, Flax params).

    With `claimed` (a registry entry's hub configuration) the tensors are checked against that
    architecture instead of the one they imply, so a wrong file fails naming the tensor.
    """
    sd = to_official_layout(sd)
    cfg = resolve_config(
        claimed, num_heads, overrides, lambda: infer_config(sd, where, num_heads, **overrides)
    )
    check_shapes(sd, cfg, where)
    return cfg, dinov3_to_flax(sd, cfg)
