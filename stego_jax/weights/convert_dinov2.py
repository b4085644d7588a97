"""Maps DINOv2 state dicts onto the stego_jax DINOv2 Flax param tree.

Source layouts: the official hub `.pth` (facebookresearch/dinov2 `DinoVisionTransformer`, also
with chunked blocks `blocks.<chunk>.<i>.`), Hugging Face `Dinov2Model` /
`Dinov2WithRegistersModel`, timm's `vit_*_patch14_dinov2` / `_reg4_dinov2` and our flat Flax
('a/b/c') exports. Each is brought to the official key layout, the architecture is read off the
tensors (the interpolation settings are the hub's for that kind of model: registers mean the
`_reg` builders' antialias and zero offset), every key is checked against the shapes that
architecture needs, and the tensors are transposed into Flax's layout.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from stego_jax.models.dinov2 import DinoV2Config, swiglu_hidden
from stego_jax.weights._layout import (
    TorchToFlax,
    apply_overrides,
    attention_shapes,
    check_tensors,
    flax_to_torch,
    fuse_hf_qkv,
    mlp_shapes,
    resolve_config,
    stem_shapes,
    strip_prefixes,
)

# DDP, DINOv2's meta-arch ("teacher.backbone." once the 'teacher' entry is selected) and HF
# task-model wrappers.
_STRIP_PREFIXES = ("module.", "backbone.", "dinov2.")
# Not part of the backbone: DINO/iBOT heads of a training checkpoint, classifier heads.
_DROP_PREFIXES = ("head.", "dino_head.", "ibot_head.", "pooler.", "classifier.")

_DINOV2_MARKERS = re.compile(
    r"(^|\.)(mask_token|register_tokens|reg_token)$"
    r"|\.ls[12]\.gamma$|/ls[12]/gamma$|\.layer_scale[12]\.lambda1$"
    r"|\.mlp\.w12\.weight$|/mlp/w12/kernel$|\.mlp\.weights_in\.weight$"
)

_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
}


def _strip(key: str) -> str:
    return strip_prefixes(key, _STRIP_PREFIXES)


def looks_like_dinov2(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict (any supported layout) holds a DINOv2 ViT: it has LayerScale,
    register or mask tokens, or a SwiGLU feed-forward, none of which a DINO v1 ViT has."""
    return any(_DINOV2_MARKERS.search(_strip(str(k))) for k in sd)


def _hf_to_official(sd: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    top = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        if m is None:
            out[key] = value  # reported as unexpected by the shape check
            continue
        i, rest = int(m.group(1)), m.group(2)
        if (lm := re.fullmatch(r"layer_scale([12])\.lambda1", rest)) is not None:
            out[f"blocks.{i}.ls{lm.group(1)}.gamma"] = value
            continue
        if (qm := re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)):
            qkv.setdefault((i, qm.group(2)), {})[qm.group(1)] = value
            continue
        name, _, kind = rest.rpartition(".")
        if name in _HF_BLOCK and kind in ("weight", "bias"):
            out[f"blocks.{i}.{_HF_BLOCK[name]}.{kind}"] = value
        else:
            out[key] = value
    out.update(fuse_hf_qkv(qkv, where))
    return out


def _timm_to_official(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm's DINOv2 layout -> official keys.

    timm's `_reg4_dinov2` models are `no_embed_class`: their `cls_token` is the official CLS plus
    the CLS position row, `pos_embed` has the patch rows only and the registers are `reg_token`.
    Only that sum ever reaches the network, so a zero CLS position row restores it exactly. timm
    stores ViT-g's fused SwiGLU as `mlp.fc1` [2*hidden, D] / `mlp.fc2` [D, hidden].
    """
    out = dict(sd)
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
        pos = out.get("pos_embed")
        if pos is not None and pos.ndim == 3:
            n = pos.shape[1]
            if math.isqrt(n) ** 2 == n:  # patch rows only: add the CLS row
                out["pos_embed"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    for key in list(out):
        m = re.fullmatch(r"(blocks\.\d+\.mlp\.)fc1\.weight", key)
        if m is None:
            continue
        fc2 = out.get(m.group(1) + "fc2.weight")
        if fc2 is not None and fc2.ndim == 2 and out[key].shape[0] == 2 * fc2.shape[1]:
            for old, new in (("fc1", "w12"), ("fc2", "w3")):
                for kind in ("weight", "bias"):
                    k = f"{m.group(1)}{old}.{kind}"
                    if k in out:
                        out[f"{m.group(1)}{new}.{kind}"] = out.pop(k)
    return out


def _flax_to_official(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat 'a/b/c' paths of our param tree -> official keys (inverse of `dinov2_to_flax`)."""
    return flax_to_torch(
        sd, ("cls_token", "pos_embed", "register_tokens", "mask_token"), ("bias", "gamma")
    )


def to_official_layout(
    sd: Mapping[str, np.ndarray], where: str
) -> tuple[dict[str, np.ndarray], str]:
    """Any supported DINOv2 layout -> (official key layout, layout name).

    Layout names: "dinov2" (official), "huggingface", "timm", "flax".
    """
    sd = {_strip(str(k)): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(_DROP_PREFIXES)}
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd):
        return _hf_to_official(sd, where), "huggingface"
    if any("/" in k for k in sd):
        return _flax_to_official(sd), "flax"
    # Official chunked blocks (block_chunks > 0, as in training): blocks.<chunk>.<i>. -> blocks.<i>.
    sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    if "reg_token" in sd or _timm_swiglu(sd):
        return _timm_to_official(sd), "timm"
    return sd, "dinov2"


def _timm_swiglu(sd: Mapping[str, np.ndarray]) -> bool:
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    return (
        fc1 is not None and fc2 is not None and fc1.ndim == 2 and fc2.ndim == 2
        and fc1.shape[0] == 2 * fc2.shape[1]
    )


def _need(sd: Mapping[str, np.ndarray], key: str, ndim: int, where: str) -> np.ndarray:
    if key not in sd:
        raise ValueError(
            f"{where}: key {key!r} is missing, so the DINOv2 architecture cannot be inferred; "
            f"found keys such as {sorted(sd)[:6]}"
        )
    if sd[key].ndim != ndim:
        raise ValueError(f"{where}: {key!r} has shape {list(sd[key].shape)}, expected {ndim}-d")
    return sd[key]


def infer_config(
    sd: Mapping[str, np.ndarray],
    where: str,
    num_heads: int | None = None,
    **overrides: Any,
) -> DinoV2Config:
    """The DINOv2 architecture of an official-layout state dict.

    Patch size, width, depth, FFN type and width, LayerScale, qkv bias, registers and the stored
    grid come from the tensors; the head count is not in the shapes (`num_heads`, else
    embed_dim // 64 as every hub model); the interpolation settings are the hub's: registers ->
    antialias, offset 0 (the `_reg` builders), else offset 0.1 without antialias. `overrides`
    replace any `DinoV2Config` field.
    """
    w = _need(sd, "patch_embed.proj.weight", 4, where)
    d, c, p, p2 = w.shape
    if c != 3 or p != p2:
        raise ValueError(
            f"{where}: 'patch_embed.proj.weight' has shape {list(w.shape)}, expected [D, 3, p, p]"
        )
    indices = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not indices or indices != list(range(len(indices))):
        raise ValueError(f"{where}: blocks must be numbered 0..depth-1, found {indices}")
    rows = _need(sd, "pos_embed", 3, where).shape[1]
    g = math.isqrt(max(rows - 1, 0))
    if g * g != rows - 1 or g == 0:
        raise ValueError(f"{where}: 'pos_embed' has {rows} rows; expected 1 + G*G")
    if "blocks.0.mlp.w12.weight" in sd:
        ffn = "swiglu"
        hidden = _need(sd, "blocks.0.mlp.w12.weight", 2, where).shape[0] // 2
        # The official SwiGLU width comes from mlp_ratio 4 (the only one the hub uses).
        mlp_ratio = 4.0
        if swiglu_hidden(d, mlp_ratio) != hidden:
            raise ValueError(
                f"{where}: 'blocks.0.mlp.w12.weight' has {2 * hidden} rows; the official fused "
                f"SwiGLU of width {d} (mlp_ratio 4) has {2 * swiglu_hidden(d, mlp_ratio)}"
            )
    else:
        ffn = "mlp"
        hidden = _need(sd, "blocks.0.mlp.fc1.weight", 2, where).shape[0]
        mlp_ratio = hidden / d
        if int(d * mlp_ratio) != hidden:
            raise ValueError(f"{where}: MLP width {hidden} is not representable for width {d}")
    regs = sd.get("register_tokens")
    num_reg = int(regs.shape[1]) if regs is not None and regs.ndim == 3 else 0
    if num_heads is None:
        if d % 64:
            raise ValueError(
                f"{where}: embed_dim {d} is not a multiple of DINOv2's head_dim 64, so the number "
                "of heads cannot be guessed; pass num_heads="
            )
        num_heads = d // 64
    if num_heads <= 0 or d % num_heads:
        raise ValueError(f"{where}: embed_dim {d} is not divisible by num_heads={num_heads}")
    cfg = DinoV2Config(
        patch_size=p,
        embed_dim=d,
        depth=len(indices),
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        ffn=ffn,
        num_register_tokens=num_reg,
        layer_scale="blocks.0.ls1.gamma" in sd,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        img_size=g * p,
        interpolate_offset=0.0 if num_reg else 0.1,
        interpolate_antialias=bool(num_reg),
    )
    return apply_overrides(cfg, overrides)


def expected_shapes(cfg: DinoV2Config) -> dict[str, tuple[int, ...]]:
    """Every key of an official DINOv2 state dict for `cfg` with its torch shape (mask_token
    included: the hub files carry it, though inference never uses it)."""
    d, p, g, h = cfg.embed_dim, cfg.patch_size, cfg.pos_grid, cfg.mlp_dim
    shapes: dict[str, tuple[int, ...]] = {
        **stem_shapes(d, p, pos_rows=1 + g * g),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if cfg.num_register_tokens:
        shapes["register_tokens"] = (1, cfg.num_register_tokens, d)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes.update(attention_shapes(b, d))
        if cfg.qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
        if cfg.ffn == "swiglu":
            shapes.update(
                {
                    b + "mlp.w12.weight": (2 * h, d),
                    b + "mlp.w12.bias": (2 * h,),
                    b + "mlp.w3.weight": (d, h),
                    b + "mlp.w3.bias": (d,),
                }
            )
        else:
            shapes.update(mlp_shapes(b, d, h))
        if cfg.layer_scale:
            shapes[b + "ls1.gamma"] = (d,)
            shapes[b + "ls2.gamma"] = (d,)
    return shapes


def check_shapes(
    sd: Mapping[str, np.ndarray], cfg: DinoV2Config, where: str, layout: str = "dinov2"
) -> None:
    """Raises ValueError naming the first missing, unexpected or mis-shaped tensor."""
    expected = expected_shapes(cfg)
    optional = {"mask_token": (1, cfg.embed_dim)}
    note = "" if layout == "dinov2" else f" (official name of the {layout}-layout entry)"
    arch = (
        f"a DINOv2 ViT with patch {cfg.patch_size}, embed_dim {cfg.embed_dim}, depth {cfg.depth}, "
        f"{cfg.ffn} FFN, {cfg.num_register_tokens} registers"
    )
    check_tensors(sd, expected, optional, where, arch, note)


def dinov2_to_flax(sd: Mapping[str, np.ndarray], cfg: DinoV2Config) -> dict[str, Any]:
    """Official-layout state dict -> nested Flax params of float32 numpy arrays (mask_token,
    unused at inference, is dropped)."""

    t = TorchToFlax(sd)
    params: dict[str, Any] = {
        "patch_embed": t.patch_embed(),
        "cls_token": t.f32("cls_token"),
        "pos_embed": t.f32("pos_embed"),
        "norm": t.norm("norm"),
    }
    if cfg.num_register_tokens:
        params["register_tokens"] = t.f32("register_tokens")
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        mlp = t.mlp(b, ("w12", "w3") if cfg.ffn == "swiglu" else ("fc1", "fc2"))
        params[f"blocks_{i}"] = t.block(b, cfg.qkv_bias, mlp, cfg.layer_scale)
    return params


def convert_state_dict(
    sd: Mapping[str, np.ndarray],
    where: str,
    num_heads: int | None = None,
    claimed: DinoV2Config | None = None,
    **overrides: Any,
) -> tuple[DinoV2Config, dict[str, Any]]:
    """Any supported DINOv2 layout -> (DinoV2Config, Flax params).

    With `claimed` (a registry entry's hub configuration) the tensors are checked against that
    architecture instead of the one they imply, so a wrong file fails naming the tensor.
    """
    sd, layout = to_official_layout(sd, where)
    cfg = resolve_config(
        claimed, num_heads, overrides, lambda: infer_config(sd, where, num_heads, **overrides)
    )
    check_shapes(sd, cfg, where, layout)
    return cfg, dinov2_to_flax(sd, cfg)
