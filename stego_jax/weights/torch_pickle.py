"""Torch-free reader for PyTorch checkpoints (zip and legacy format) through a restricted unpickler.

Only the globals a tensor state dict needs can be named by the pickle; anything else is refused
before it is called, so no code from a checkpoint ever runs.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

# torch.<Name>Storage -> numpy dtype of one element (torch.serialization writes these names).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _Refused(pickle.UnpicklingError):
    """Raised by our own checks; its message already names the file and the fix."""


class _StorageType:
    """Stands in for torch.<Name>Storage: only carries the element dtype."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A flat typed buffer, filled from the file when a tensor first needs it."""

    def __init__(self, dtype: np.dtype, numel: int, read: Callable[[], bytes], where: str) -> None:
        self.dtype, self.numel, self._read, self.where = dtype, numel, read, where
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            raw = self._read()
            need = self.numel * self.dtype.itemsize
            if len(raw) < need:
                raise ValueError(
                    f"{self.where}: storage holds {len(raw)} bytes, the checkpoint says it needs "
                    f"{need}; "
                    "the file is truncated or corrupt, re-download or re-save it"
                )
            self._array = np.frombuffer(raw, dtype=self.dtype, count=self.numel)
        return self._array


class _Tensor:
    """A tensor as the pickle describes it; read from its storage once the whole file is parsed."""

    def __init__(
        self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def numpy(self) -> np.ndarray:
        if not all(self.size):
            return np.zeros(self.size, dtype=self.storage.dtype)
        item = self.storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            self.storage.array()[self.offset :],
            shape=self.size,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.array(view, order="C")  # contiguous, owns its memory


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _Tensor:
    """Stand-in for torch._utils._rebuild_tensor_v2: records a (strided) view of a storage."""
    if not isinstance(storage, _Storage):
        raise _Refused(
            "malformed checkpoint: a tensor is built from something that is not a storage"
        )
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise _Refused(
            f"{storage.where}: malformed tensor size {size!r:.80} / stride {stride!r:.80}"
        )
    ints = (storage_offset, *size, *stride)
    if not all(type(v) is int and v >= 0 for v in ints):
        raise _Refused(
            f"{storage.where}: malformed tensor (offset {storage_offset!r}, size {size!r}, "
            f"stride {stride!r})"
        )
    # Bounds check before any as_strided: a hostile size/stride must not read outside the buffer.
    if (
        all(size)
        and storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel
    ):
        raise _Refused(
            f"{storage.where}: tensor of size {size}, stride {stride} at offset {storage_offset} "
            "reaches "
            f"past its storage of {storage.numel} elements; the file is corrupt"
        )
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, *state: Any
) -> Any:
    """torch._utils._rebuild_parameter(_with_state): a Parameter is just its tensor here."""
    return data


# (module, name) -> the harmless stand-in returned by find_class.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    # DINO's full training checkpoints store their command-line args; a Namespace only holds
    # attributes.
    # Unpickled by NEWOBJ + BUILD, i.e. object.__new__ and a __dict__ update: nothing else runs.
    ("argparse", "Namespace"): argparse.Namespace,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(
        self, file: io.BufferedIOBase, where: str, load_storage: Callable[[tuple], _Storage]
    ) -> None:
        super().__init__(file)
        self._where, self._load_storage = where, load_storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(
                f"checkpoint {self._where} wants to call {module}.{name}, which is not allowed; "
                "refusing to load. Only tensors, dicts and lists can be read; re-save the weights "
                "as a plain state_dict "
                "(torch.save(model.state_dict(), path)) or as .safetensors"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
            raise _Refused(f"checkpoint {self._where}: unsupported persistent id {pid!r:.80}")
        if not isinstance(pid[1], _StorageType):
            raise _Refused(f"checkpoint {self._where}: storage of unknown type {pid[1]!r:.80}")
        return self._load_storage(pid)


def _unpickle(
    data: io.BufferedIOBase, where: str, load_storage: Callable[[tuple], _Storage]
) -> Any:
    try:
        return _RestrictedUnpickler(data, where, load_storage).load()
    except _Refused as e:
        raise ValueError(str(e)) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        ValueError,
    ) as e:
        # A malformed opcode stream (or a disallowed call signature) surfaces as one of these.
        raise ValueError(
            f"checkpoint {where} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); "
            "re-save it "
            "with torch>=1.6 (torch.save(state_dict, path)) or as .safetensors"
        ) from None


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ValueError(
                f"{path} is a zip file but not a PyTorch checkpoint "
                f"(expected one '<name>/data.pkl', "
                f"found {len(pkls)}); is it a TorchScript archive? Save a state_dict instead"
            )
        root = pkls[0][: -len("data.pkl")]
        order = "little"
        if root + "byteorder" in names:
            order = zf.read(root + "byteorder").decode().strip()
            if order not in ("little", "big"):
                raise ValueError(f"{path}: unknown byteorder {order!r} in the checkpoint")
        storages: dict[str, _Storage] = {}

        def load_storage(pid: tuple) -> _Storage:
            _, stype, key, _location, numel = pid[:5]
            key = key.decode() if isinstance(key, bytes) else str(key)
            if key not in storages:
                member = f"{root}data/{key}"
                if member not in names:
                    raise _Refused(f"checkpoint {path}: storage {member} is missing from the zip")
                dtype = stype.dtype if order == "little" else stype.dtype.newbyteorder(">")
                storages[key] = _Storage(
                    dtype, int(numel), lambda m=member: zf.read(m), f"{path}:{member}"
                )
            return storages[key]

        with zf.open(pkls[0]) as f:
            result = _unpickle(f, str(path), load_storage)
        return _materialize(result)


def _load_legacy(path: Path) -> Any:
    """Reads the pre-1.6 torch.save format.

    Layout: pickles of magic number, protocol, sys_info, the object, the storage key list, then for
    each key an int64 element count and the raw elements.
    """
    with open(path, "rb") as f:
        blob = f.read()
    buf = io.BytesIO(blob)

    def no_storage(pid: tuple) -> _Storage:
        raise _Refused(f"checkpoint {path}: unexpected storage reference outside the object pickle")

    def plain(what: str) -> Any:
        # The header pickles hold only ints, dicts and strings; the same restriction applies.
        return _unpickle(buf, f"{path} ({what})", no_storage)

    magic = plain("header")
    if magic != _LEGACY_MAGIC:
        raise ValueError(
            f"{path} is neither a zip PyTorch checkpoint nor the legacy format (bad magic number); "
            "re-save it with torch>=1.6 (torch.save(state_dict, path)) or as .safetensors"
        )
    if plain("header") != _LEGACY_PROTOCOL:
        raise ValueError(
            f"{path}: unsupported legacy torch protocol version; re-save it with torch>=1.6"
        )
    sys_info = plain("header")
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError(
            f"{path}: big-endian legacy checkpoints are not supported; re-save it with torch>=1.6"
        )

    roots: dict[str, _Storage] = {}
    fill: dict[str, bytes] = {}

    def load_storage(pid: tuple) -> Any:
        if len(pid) != 6:
            raise _Refused(f"checkpoint {path}: malformed legacy storage id")
        _, stype, key, _location, numel, view = pid
        key = str(key)
        if key not in roots:
            roots[key] = _Storage(
                stype.dtype, int(numel), lambda k=key: fill[k], f"{path}:storage {key}"
            )
        if view is None:
            return roots[key]
        view_key, offset, size = view
        base = roots[key]
        if not (
            type(offset) is int
            and type(size) is int
            and 0 <= offset
            and offset + size <= base.numel
        ):
            raise _Refused(
                f"checkpoint {path}: storage view {view_key!r:.40} lies outside storage {key!r:.40}"
            )
        return _Storage(
            base.dtype,
            int(size),
            lambda b=base, o=int(offset), n=int(size): b.array()[o : o + n].tobytes(),
            f"{path}:storage {view_key}",
        )

    result = _unpickle(buf, str(path), load_storage)
    keys = plain("storage keys")
    if not isinstance(keys, list):
        raise ValueError(f"{path}: malformed legacy checkpoint (storage key list)")
    pos = buf.tell()
    for key in keys:
        # Each storage: int64 element count, then the raw little-endian elements.
        if str(key) not in roots or pos + 8 > len(blob):
            raise ValueError(f"{path}: legacy checkpoint is truncated or corrupt (storage {key})")
        (numel,) = struct.unpack("<q", blob[pos : pos + 8])
        nbytes = numel * roots[str(key)].dtype.itemsize
        fill[str(key)] = blob[pos + 8 : pos + 8 + nbytes]
        pos += 8 + nbytes
    return _materialize(result)


def _materialize(obj: Any) -> Any:
    """Replaces every _Tensor in the loaded containers by its numpy array."""
    # Tensors are read only now because legacy files store the data after the object pickle.
    if isinstance(obj, _Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: _materialize(v) for k, v in vars(obj).items()})
    return obj


def load_torch_checkpoint(path: str | Path) -> Any:
    """Reads a `torch.save` file without torch and without running any code from it.

    Returns the saved object with every tensor as a numpy array (float32/float16/bfloat16/int64/...,
    same shape and values). Raises FileNotFoundError if `path` is missing and ValueError if the file
    is not a torch checkpoint or names anything beyond tensors, storages, dicts and argparse args.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)
