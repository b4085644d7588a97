"""Reads `.safetensors` and `.npz` weight files into flat dicts of numpy arrays (no pickle)."""

from __future__ import annotations

import io
import json
import math
import struct
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from stego_jax.weights.errors import CheckpointError, UnreadableFileError

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


_REDOWNLOAD = "Delete it and download or export it again"
# A deflated zip member expands at most ~1032x; anything claiming more is not a real archive.
_MAX_DEFLATE_RATIO = 1100


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Reads every tensor of a `.safetensors` file: {name: array} with the stored dtype and shape.

    Layout: little-endian u64 header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}, then the byte buffer the offsets index.
    Raises CheckpointError (a ValueError) naming the file when it is truncated or corrupt; every
    declared size is checked against the bytes the file holds before an array is built.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    blob = path.read_bytes()
    corrupt = f"the file is truncated or corrupt. {_REDOWNLOAD}"
    if len(blob) < 8:
        raise CheckpointError(
            path, f"{path} is too short to be a .safetensors file; re-download or re-export it"
        )
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise CheckpointError(
            path,
            f"{path}: header length {n} exceeds the file size; the file is truncated or not "
            f".safetensors. {_REDOWNLOAD}",
        )
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(
            path, f"{path}: unreadable .safetensors header ({str(e)[:200]}); {corrupt}"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(path, f"{path}: the .safetensors header is not a JSON object; {corrupt}")
    data = memoryview(blob)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(_nonneg_int(d) for d in info["shape"])
            begin, end = (_nonneg_int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise CheckpointError(
                path,
                f"{path}: tensor {name!r:.80} has an unsupported or malformed entry "
                f"{info!r:.120}; {corrupt}",
            ) from None
        # Python ints: a shape claiming 10^12 elements cannot wrap around to a plausible size.
        size = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != size:
            raise CheckpointError(
                path,
                f"{path}: tensor {name!r:.80} (shape {shape}, {info['dtype']}) has byte range "
                f"[{begin}, {end}) but needs {size} bytes within a {len(data)}-byte buffer; the "
                f"file is truncated or corrupt. {_REDOWNLOAD}",
            )
        out[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).copy()
    return out


def _nonneg_int(v: object) -> int:
    if type(v) is not int or v < 0:
        raise ValueError(v)
    return v


def read_npz(
    path: str | Path,
    *,
    fix: str,
    error: Callable[[Path, str], UnreadableFileError] = CheckpointError,
) -> dict[str, np.ndarray]:
    """Reads every array of a `.npz` archive with the checks np.load leaves out.

    Each member's `.npy` header is read first and its shape x itemsize compared with the bytes the
    member holds (np.load would allocate whatever the header claims), and a member's size with
    what the archive can hold; object arrays (pickle) are refused. Any failure raises `error(path,
    message)` naming the file, what is wrong and `fix`. Valid archives give what np.load gives.
    """
    path = Path(path)
    archive_size = path.stat().st_size
    corrupt = f"the file is truncated or corrupt. {fix}"
    if not zipfile.is_zipfile(path):
        raise error(path, f"{path} is not a .npz archive (no zip directory); {corrupt}")
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = info.filename
                key = name[: -len(".npy")] if name.endswith(".npy") else name
                size = _checked_member_size(info, archive_size)
                if size is None:
                    raise error(
                        path, f"{path}: member {name!r:.80} claims {info.file_size} bytes (method "
                        f"{info.compress_type}) that the {archive_size}-byte archive cannot hold; "
                        f"{corrupt}"
                    )
                with zf.open(info) as f:
                    if not name.endswith(".npy"):
                        out[key] = f.read()  # np.load gives other members as bytes, too
                        continue
                    version = np.lib.format.read_magic(f)
                    shape, fortran, dtype = _read_header(f, version)
                    if dtype.hasobject:
                        raise error(
                            path, f"{path}: array {key!r:.80} holds Python objects, which would "
                            "need pickle; refused. Re-export it with plain numeric arrays"
                        )
                    need = math.prod(shape) * dtype.itemsize
                    if f.tell() + need != size or (dtype.itemsize == 0 and math.prod(shape)):
                        raise error(
                            path, f"{path}: array {key!r:.80} declares shape {shape} of {dtype} "
                            f"({need} bytes) but its member holds {size - f.tell()} bytes; "
                            f"{corrupt}"
                        )
                with zf.open(info) as f:
                    out[key] = np.lib.format.read_array(f, allow_pickle=False)
    except UnreadableFileError:
        raise
    except (
        zipfile.BadZipFile, zlib.error, EOFError, ValueError, TypeError, KeyError, IndexError,
        OverflowError, SyntaxError, NotImplementedError, RuntimeError, OSError, UnicodeDecodeError,
        struct.error, tokenize.TokenError,  # np.lib.format parses a header with ast / tokenize
    ) as e:
        raise error(path, f"{path}: cannot read it ({type(e).__name__}: {str(e)[:200]}); {corrupt}") from None
    return out


def _checked_member_size(info: zipfile.ZipInfo, archive_size: int) -> int | None:
    """The member's uncompressed size, or None when the archive cannot hold that many bytes."""
    if info.compress_type == zipfile.ZIP_STORED:
        bound = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        bound = info.compress_size * _MAX_DEFLATE_RATIO + 1024
    else:
        return None  # numpy writes stored or deflated members only
    if info.compress_size > archive_size or info.file_size > bound:
        return None
    return info.file_size


def _read_header(f, version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype]:
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    if version == (3, 0):
        # 2.0 with a utf-8 header (non-latin-1 field names). Parsed as 2.0 only to size the array
        # (field names do not change the item size); np.lib.format.read_array reads it properly.
        (n,) = struct.unpack("<I", f.read(4))
        return np.lib.format.read_array_header_2_0(io.BytesIO(struct.pack("<I", n) + f.read(n)))
    raise ValueError(f"unknown .npy format version {version}")


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a `.npz` archive of plain arrays (object arrays would need pickle: refused).

    Raises CheckpointError (a ValueError) naming the file when it is truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    return read_npz(
        path,
        fix=f"{_REDOWNLOAD}; re-export it without object arrays (np.savez(path, **arrays))",
    )
