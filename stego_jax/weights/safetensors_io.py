"""Reads `.safetensors` and `.npz` weight files into flat dicts of numpy arrays (no pickle)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

# The safetensors format spec's dtype names (huggingface/safetensors: safetensors/src/tensor.rs).
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Reads every tensor of a `.safetensors` file: {name: array} with the stored dtype and shape.

    Layout: little-endian u64 header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}, then the byte buffer the offsets index.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    blob = path.read_bytes()
    if len(blob) < 8:
        raise ValueError(
            f"{path} is too short to be a .safetensors file; re-download or re-export it"
        )
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ValueError(
            f"{path}: header length {n} exceeds the file size; the file is truncated or not "
            ".safetensors"
        )
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path}: unreadable .safetensors header ({e}); the file is corrupt"
        ) from None
    data = memoryview(blob)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{path}: tensor {name!r} has an unsupported or malformed entry {info!r:.120}"
            ) from None
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != size:
            raise ValueError(
                f"{path}: tensor {name!r} (shape {shape}, {info['dtype']}) has byte range "
                f"[{begin}, {end}) but needs {size} bytes within a {len(data)}-byte buffer; the "
                "file is truncated or corrupt"
            )
        out[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).copy()
    return out


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a `.npz` archive of plain arrays (object arrays would need pickle: refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        raise ValueError(
            f"{path}: cannot read it as a .npz of plain arrays ({e}); re-export it without "
            "object arrays"
        ) from None
