"""Pieces of the key conversion that every ViT family shares.

The DINO, DINOv2 and DINOv3 converters (`convert.py`, `convert_dinov2.py`, `convert_dinov3.py`)
bring a state dict to their official torch key layout, check it, and transpose it into the Flax
param tree of `models/`; the steps that are the same for all of them live here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

# Hugging Face's split attention projections, in the row order of torch's fused qkv.
HF_QKV = ("query", "key", "value")


def strip_prefixes(key: str, prefixes: Iterable[str]) -> str:
    """`key` without any run of the wrapper `prefixes` (e.g. 'module.backbone.'), in any order."""
    prefixes = tuple(prefixes)
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def fuse_hf_qkv(
    qkv: Mapping[tuple[int, str], Mapping[str, np.ndarray]], where: str
) -> dict[str, np.ndarray]:
    """{(block, 'weight'|'bias'): {'query'|'key'|'value': array}} -> fused `blocks.<i>.attn.qkv.*`.

    HF's conversions split qkv rows as [0:D]=q, [D:2D]=k, [2D:3D]=v, each head-major, so
    concatenating in that order restores the (3, heads, head_dim) row order torch reshapes to.
    """
    out: dict[str, np.ndarray] = {}
    for (i, kind), parts in sorted(qkv.items()):
        missing = [p for p in HF_QKV if p not in parts]
        if missing:
            raise ValueError(
                f"{where}: encoder.layer.{i}.attention.attention.{missing[0]}.{kind} is missing "
                f"(needed with the {sorted(parts)} entries to build the qkv projection)"
            )
        shapes = {p: parts[p].shape for p in HF_QKV}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{where}: layer {i} query/key/value {kind} shapes differ: {shapes}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate([parts[p] for p in HF_QKV], axis=0)
    return out


def flax_to_torch(
    sd: Mapping[str, np.ndarray], as_is: Iterable[str], leaves: Iterable[str] = ("bias",)
) -> dict[str, np.ndarray]:
    """Flat 'a/b/c' paths of our param tree -> official torch keys.

    Keys in `as_is` (top-level tokens and embeddings) keep their names; Dense kernels and the
    patch convolution are transposed back, LayerNorm scales become weights, and parameters
    named in `leaves` keep their leaf name. Anything else passes through, to be reported as
    unexpected by the shape check.
    """
    as_is, leaves = set(as_is), set(leaves)
    out: dict[str, np.ndarray] = {}
    for key, v in sd.items():
        parts = key.split("/")
        if (m := re.fullmatch(r"blocks_(\d+)", parts[0])) is not None:
            parts[0] = f"blocks.{m.group(1)}"
        name, leaf = ".".join(parts[:-1]), parts[-1]
        if key in as_is:
            out[key] = v
        elif key == "patch_embed/kernel" and v.ndim == 4:
            out["patch_embed.proj.weight"] = v.transpose(3, 2, 0, 1)
        elif key == "patch_embed/bias":
            out["patch_embed.proj.bias"] = v
        elif leaf == "kernel" and v.ndim == 2:
            out[name + ".weight"] = v.T
        elif leaf == "scale":
            out[name + ".weight"] = v
        elif leaf in leaves:
            out[f"{name}.{leaf}"] = v
        else:
            out[key] = v
    return out


def stem_shapes(d: int, p: int, pos_rows: int | None = None) -> dict[str, tuple[int, ...]]:
    """Torch shapes of the CLS token, the learned position embedding of `pos_rows` rows (none
    if None) and the patch embedding of a width-`d`, patch-`p` ViT."""
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d)}
    if pos_rows is not None:
        shapes["pos_embed"] = (1, pos_rows, d)
    shapes["patch_embed.proj.weight"] = (d, 3, p, p)
    shapes["patch_embed.proj.bias"] = (d,)
    return shapes


def attention_shapes(b: str, d: int) -> dict[str, tuple[int, ...]]:
    """Torch shapes of block `b`'s two LayerNorms and its attention (qkv bias excluded)."""
    return {
        b + "norm1.weight": (d,),
        b + "norm1.bias": (d,),
        b + "attn.qkv.weight": (3 * d, d),
        b + "attn.proj.weight": (d, d),
        b + "attn.proj.bias": (d,),
        b + "norm2.weight": (d,),
        b + "norm2.bias": (d,),
    }


def mlp_shapes(b: str, d: int, h: int) -> dict[str, tuple[int, ...]]:
    """Torch shapes of block `b`'s GELU MLP of hidden width `h`."""
    return {
        b + "mlp.fc1.weight": (h, d),
        b + "mlp.fc1.bias": (h,),
        b + "mlp.fc2.weight": (d, h),
        b + "mlp.fc2.bias": (d,),
    }


def is_floating(a: np.ndarray) -> bool:
    """Whether a tensor read from a checkpoint holds floating-point numbers (bfloat16 included)."""
    return bool(np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16")


def check_tensors(
    sd: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    optional: Mapping[str, tuple[int, ...]],
    where: str,
    arch: str,
    note: str = "",
) -> None:
    """Raises ValueError naming the first mis-shaped, non-floating, missing or unexpected tensor.

    The shapes of the tensors present are checked first, so a file of another model says so at
    its first tensor. `arch` describes the architecture in the messages (e.g. "a DINOv2 ViT
    with ..."); `note` follows each key name.
    """
    for k, shape in {**expected, **optional}.items():
        if k not in sd:
            continue
        if tuple(sd[k].shape) != shape:
            raise ValueError(
                f"{where}: tensor {k!r}{note} has shape {list(sd[k].shape)}, expected "
                f"{list(shape)} for {arch}"
            )
        if not is_floating(sd[k]):
            raise ValueError(f"{where}: tensor {k!r}{note} has dtype {sd[k].dtype}, not floating")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(
            f"{where}: tensor {missing[0]!r}{note} is missing (expected shape "
            f"{list(expected[missing[0]])}) for {arch}; {len(missing)} missing in all"
        )
    extra = sorted(k for k in sd if k not in expected and k not in optional)
    if extra:
        raise ValueError(
            f"{where}: unexpected tensor {extra[0]!r}{note} with shape {list(sd[extra[0]].shape)} "
            f"({len(extra)} unexpected in all); it is not part of {arch}"
        )


def apply_overrides(cfg, overrides: Mapping[str, Any]):
    """`dataclasses.replace` that names the allowed fields on a wrong one."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown backbone override(s) {unknown} for {type(cfg).__name__}; allowed: "
            f"{sorted(fields)}"
        )
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def resolve_config(
    claimed, num_heads: int | None, overrides: Mapping[str, Any], infer: Callable[[], Any]
):
    """The architecture a file is checked against: `claimed` (a registry entry's hub
    configuration, so a wrong file fails naming the tensor) with `num_heads` and `overrides`
    applied, else what `infer()` reads off the tensors."""
    if claimed is None:
        return infer()
    if num_heads:
        overrides = {"num_heads": num_heads, **overrides}
    return apply_overrides(claimed, overrides)


class TorchToFlax:
    """Reads official-layout torch tensors as float32 numpy arrays in the Flax layout.

    Linear weights [out, in] become kernels [in, out]; the patch conv [D, 3, p, p] (OIHW)
    becomes an HWIO kernel [p, p, 3, D]; LayerNorm weight becomes scale.
    """

    def __init__(self, sd: Mapping[str, np.ndarray]):
        self.sd = sd

    def f32(self, key: str, transpose: tuple[int, ...] | None = None) -> np.ndarray:
        a = np.asarray(self.sd[key]).astype(np.float32)
        return np.ascontiguousarray(a.transpose(transpose) if transpose else a)

    def dense(self, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
        out = {"kernel": self.f32(prefix + ".weight", (1, 0))}
        if bias:
            out["bias"] = self.f32(prefix + ".bias")
        return out

    def norm(self, prefix: str) -> dict[str, np.ndarray]:
        return {"scale": self.f32(prefix + ".weight"), "bias": self.f32(prefix + ".bias")}

    def patch_embed(self) -> dict[str, np.ndarray]:
        return {
            "kernel": self.f32("patch_embed.proj.weight", (2, 3, 1, 0)),
            "bias": self.f32("patch_embed.proj.bias"),
        }

    def mlp(self, b: str, names: Iterable[str] = ("fc1", "fc2")) -> dict[str, Any]:
        """Block `b`'s feed-forward: one Dense per name under `mlp.`."""
        return {n: self.dense(f"{b}mlp.{n}") for n in names}

    def block(
        self, b: str, qkv_bias: bool, mlp: dict[str, Any], layer_scale: bool = False
    ) -> dict[str, Any]:
        """Block `b` (e.g. 'blocks.3.'): pre-norm attention and feed-forward `mlp`, optionally
        with LayerScale gammas `ls1`/`ls2`."""
        blk: dict[str, Any] = {
            "norm1": self.norm(b + "norm1"),
            "attn": {
                "qkv": self.dense(b + "attn.qkv", qkv_bias),
                "proj": self.dense(b + "attn.proj"),
            },
            "norm2": self.norm(b + "norm2"),
            "mlp": mlp,
        }
        if layer_scale:
            blk["ls1"] = {"gamma": self.f32(b + "ls1.gamma")}
            blk["ls2"] = {"gamma": self.f32(b + "ls2.gamma")}
        return blk
