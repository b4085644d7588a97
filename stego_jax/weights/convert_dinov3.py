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

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from stego_jax.models.dinov3 import DinoV3Config, swiglu_hidden

_STRIP_PREFIXES = ("module.", "backbone.")
_DROP_PREFIXES = ("head.", "dino_head.", "ibot_head.", "local_cls_norm.")
_MARKERS = re.compile(r"(^|\.)(storage_tokens|rope_embed\.periods|attn\.qkv\.bias_mask)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


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


def apply_overrides(cfg: DinoV3Config, overrides: Mapping[str, Any]) -> DinoV3Config:
    """`dataclasses.replace` that names the allowed fields on a wrong one."""
    if not overrides:
        return cfg
    allowed = {f.name for f in dataclasses.fields(cfg)}
    wrong = sorted(set(overrides) - allowed)
    if wrong:
        raise ValueError(f"unknown DinoV3Config field(s) {wrong}; allowed: {sorted(allowed)}")
    return dataclasses.replace(cfg, **overrides)


def expected_shapes(cfg: DinoV3Config) -> dict[str, tuple[int, ...]]:
    """Every key of an official DINOv3 state dict for `cfg` with its torch shape."""
    d, p, h = cfg.embed_dim, cfg.patch_size, cfg.mlp_dim
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
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
    for k, shape in {**expected, **optional}.items():
        if k not in sd:
            continue
        if tuple(sd[k].shape) != shape:
            raise ValueError(
                f"{where}: tensor {k!r} has shape {list(sd[k].shape)}, expected {list(shape)} "
                f"for {arch}"
            )
        if not np.issubdtype(sd[k].dtype, np.floating) and sd[k].dtype.name != "bfloat16":
            raise ValueError(f"{where}: tensor {k!r} has dtype {sd[k].dtype}, not floating")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(
            f"{where}: tensor {missing[0]!r} is missing (expected shape "
            f"{list(expected[missing[0]])}) for {arch}; {len(missing)} missing in all"
        )
    extra = sorted(k for k in sd if k not in expected and k not in optional)
    if extra:
        raise ValueError(
            f"{where}: unexpected tensor {extra[0]!r} with shape {list(sd[extra[0]].shape)} "
            f"({len(extra)} unexpected in all); it is not part of {arch}"
        )
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

    def f32(key: str, transpose: tuple[int, ...] | None = None) -> np.ndarray:
        a = np.asarray(sd[key]).astype(np.float32)
        return np.ascontiguousarray(a.transpose(transpose) if transpose else a)

    def dense(prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
        out = {"kernel": f32(prefix + ".weight", (1, 0))}
        if bias:
            out["bias"] = f32(prefix + ".bias")
        return out

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {"scale": f32(prefix + ".weight"), "bias": f32(prefix + ".bias")}

    params: dict[str, Any] = {
        "patch_embed": {
            "kernel": f32("patch_embed.proj.weight", (2, 3, 1, 0)),
            "bias": f32("patch_embed.proj.bias"),
        },
        "cls_token": f32("cls_token"),
        "rope_embed": {"periods": f32("rope_embed.periods")},
        "norm": norm("norm"),
    }
    if cfg.num_storage_tokens:
        params["storage_tokens"] = f32("storage_tokens")
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        if cfg.ffn == "swiglu":
            mlp = {n: dense(b + f"mlp.{n}") for n in ("w1", "w2", "w3")}
        else:
            mlp = {"fc1": dense(b + "mlp.fc1"), "fc2": dense(b + "mlp.fc2")}
        blk: dict[str, Any] = {
            "norm1": norm(b + "norm1"),
            "attn": {"qkv": dense(b + "attn.qkv", cfg.qkv_bias), "proj": dense(b + "attn.proj")},
            "norm2": norm(b + "norm2"),
            "mlp": mlp,
        }
        if cfg.layer_scale:
            blk["ls1"] = {"gamma": f32(b + "ls1.gamma")}
            blk["ls2"] = {"gamma": f32(b + "ls2.gamma")}
        params[f"blocks_{i}"] = blk
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
    if claimed is not None:
        if num_heads:
            overrides = {"num_heads": num_heads, **overrides}
        cfg = apply_overrides(claimed, overrides)
    else:
        cfg = infer_config(sd, where, num_heads, **overrides)
    check_shapes(sd, cfg, where)
    return cfg, dinov3_to_flax(sd, cfg)
