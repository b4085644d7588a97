"""Torch-free reader for PyTorch checkpoints (zip and legacy format) through a restricted unpickler.

Only the globals a tensor state dict needs (and those of a PyTorch Lightning .ckpt: omegaconf
hyper-parameters, callback and optimizer states, rebuilt as plain dicts) can be named by the pickle;
anything else is refused before it is called, so no code from a checkpoint ever runs.
"""

from __future__ import annotations

import argparse
import collections
import io
import math
import pickle
import pickletools
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from stego_jax.weights.errors import CheckpointError

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
_ZIP_MAGIC = b"PK\x03\x04"
# A deflated zip member expands at most ~1032x; anything claiming more is not a real zip.
_MAX_DEFLATE_RATIO = 1100
_MAX_NDIM = 32
_REDOWNLOAD = (
    "Delete it and download it again (or re-save it with torch.save(state_dict, path) or as "
    ".safetensors)"
)
# What a malformed pickle or zip can raise from the standard library while it is read.
_MALFORMED = (
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    ValueError,
    OverflowError,
    struct.error,
    UnicodeDecodeError,
    NotImplementedError,
    RuntimeError,  # includes RecursionError (a deeply nested object) and encrypted zip members
    OSError,
)


class _Refused(pickle.UnpicklingError):
    """Raised by our own checks of a malformed stream; its message names the file."""


class _Forbidden(_Refused):
    """A global outside the allow-list; its message already names the file and the fix."""


class _StorageType:
    """Stands in for torch.<Name>Storage: only carries the element dtype."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A flat typed buffer, filled from the file when a tensor first needs it."""

    def __init__(
        self, dtype: np.dtype, numel: int, read: Callable[[], bytes], where: str, path: Path
    ) -> None:
        self.dtype, self.numel, self._read, self.where, self.path = dtype, numel, read, where, path
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            raw = self._read()
            need = self.numel * self.dtype.itemsize
            if len(raw) < need:
                raise CheckpointError(
                    self.path,
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
    if len(size) > _MAX_NDIM or not all(type(v) is int and v >= 0 for v in ints):
        raise _Refused(
            f"{storage.where}: malformed tensor (offset {storage_offset!r:.40}, size {size!r:.80}, "
            f"stride {stride!r:.80}); the file is corrupt"
        )
    # A tensor cannot hold more elements than its storage (no overlapping views in a state
    # dict): refuses a size claiming 10^12 elements before anything is allocated.
    if all(size) and math.prod(size) > storage.numel:
        raise _Refused(
            f"{storage.where}: tensor of size {size} has {math.prod(size)} elements but its "
            f"storage holds {storage.numel}; the file is corrupt"
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


def _plain_dict(*args: Any) -> dict:
    """Stand-in for collections.defaultdict(factory) and builtins.dict: always a plain dict.

    A pickled defaultdict is REDUCE(defaultdict, (factory,)) followed by SETITEMS; the factory
    (only ever the `dict` stand-in here) is dropped, so nothing is ever called on a missing key.
    """
    if len(args) > 1 or (args and args[0] is not _plain_dict and args[0] is not None):
        raise _Refused("malformed checkpoint: a dict is built from unexpected arguments")
    return {}


class _PickledState:
    """Stands in for an omegaconf object unpickled by NEWOBJ + BUILD: only keeps the state dict.

    `_materialize` turns it into plain data (a dict for a DictConfig, the value for a node); the
    omegaconf classes themselves are never imported or run.
    """

    kind = ""

    def __new__(cls, *args: Any) -> "_PickledState":
        if args:
            raise _Refused(f"malformed checkpoint: omegaconf {cls.kind} built with arguments")
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise _Refused(f"malformed checkpoint: omegaconf {self.kind} state is not a dict")
        self.state = state


class _DictConfig(_PickledState):
    kind = "DictConfig"


class _AnyNode(_PickledState):
    kind = "AnyNode"


class _Metadata(_PickledState):
    kind = "Metadata"


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
    # PyTorch Lightning .ckpt files (the released STEGO checkpoints): hyper-parameters saved as an
    # omegaconf DictConfig, callback states, optimizer states. Rebuilt as plain Python data.
    ("collections", "defaultdict"): _plain_dict,
    ("builtins", "dict"): _plain_dict,
    ("__builtin__", "dict"): _plain_dict,  # protocol-2 pickles name builtins so
    ("typing", "Any"): "typing.Any",  # a string: cannot be called or instantiated
    ("omegaconf.dictconfig", "DictConfig"): _DictConfig,
    ("omegaconf.base", "ContainerMetadata"): _Metadata,
    ("omegaconf.base", "Metadata"): _Metadata,
    ("omegaconf.nodes", "AnyNode"): _AnyNode,
    # Lightning <= 1.4 keys callback states by the callback class: only its name is kept.
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): (
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    ),
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
        except (KeyError, TypeError):
            raise _Forbidden(
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


def _scan(data: io.BytesIO, where: str) -> None:
    """Walks one pickle's opcodes without building anything, from the current position.

    The C unpickler allocates what a length field or memo index claims before it reads; this pass
    (pure Python, reading only what is there) refuses a truncated or inflated stream first.
    """
    start = data.tell()
    n_ops = 0
    try:
        for op, arg, _ in pickletools.genops(data):
            n_ops += 1
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (
                isinstance(arg, int) and 0 <= arg <= n_ops
            ):
                raise _Refused(f"checkpoint {where}: memo index {arg!r:.40} is out of range")
    except _Refused:
        raise
    except (ValueError, EOFError, struct.error, UnicodeDecodeError, OverflowError) as e:
        raise _Refused(f"checkpoint {where}: malformed pickle stream ({e})") from None
    data.seek(start)


def _unpickle(
    data: io.BytesIO,
    where: str,
    load_storage: Callable[[tuple], _Storage],
    path: Path,
    problem: str,
) -> Any:
    """Unpickles one object from `data`; any failure becomes a CheckpointError naming `path`.

    `problem` says what a malformed stream means here (a corrupt file, or not a checkpoint at all).
    """
    try:
        _scan(data, where)
        return _RestrictedUnpickler(data, where, load_storage).load()
    except _Forbidden as e:
        raise CheckpointError(path, str(e)) from None
    except _Refused as e:
        raise CheckpointError(path, f"{e}. {problem}") from None
    except _MALFORMED as e:
        raise CheckpointError(
            path, f"checkpoint {where}: {problem} ({type(e).__name__}: {str(e)[:200]})"
        ) from None


def _member_size(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive_size: int, path: Path) -> int:
    """The uncompressed size of a zip member, refused when the archive cannot hold it."""
    if info.compress_type == zipfile.ZIP_STORED:
        bound = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        bound = info.compress_size * _MAX_DEFLATE_RATIO + 1024
    else:
        raise CheckpointError(
            path, f"member {info.filename} uses zip compression method {info.compress_type}, "
            f"which PyTorch never writes; the file is corrupt. {_REDOWNLOAD}"
        )
    if info.compress_size > archive_size or info.file_size > bound:
        raise CheckpointError(
            path, f"member {info.filename} claims {info.file_size} bytes, more than the "
            f"{archive_size}-byte file can hold: the file is truncated or corrupt. {_REDOWNLOAD}"
        )
    return info.file_size


def _load_zip(path: Path) -> Any:
    archive_size = path.stat().st_size
    corrupt = f"the zip checkpoint is truncated or corrupt. {_REDOWNLOAD}"
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        names = list(infos)
        pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(
                path,
                f"{path} is a zip file but not a PyTorch checkpoint "
                f"(expected one '<name>/data.pkl', "
                f"found {len(pkls)}); is it a TorchScript archive? Save a state_dict instead",
            )
        root = pkls[0][: -len("data.pkl")]
        order = "little"
        if root + "byteorder" in names:
            _member_size(zf, infos[root + "byteorder"], archive_size, path)
            order = zf.read(root + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise CheckpointError(
                    path, f"{path}: unknown byteorder {order[:20]!r} in the checkpoint; {corrupt}"
                )
        storages: dict[str, _Storage] = {}

        def load_storage(pid: tuple) -> _Storage:
            _, stype, key, _location, numel = pid[:5]
            key = key.decode() if isinstance(key, bytes) else str(key)
            if type(numel) is not int or numel < 0:
                raise _Refused(f"checkpoint {path}: storage {key[:40]!r} has size {numel!r:.40}")
            if key not in storages:
                member = f"{root}data/{key}"
                if member not in infos:
                    raise _Refused(f"checkpoint {path}: storage {member} is missing from the zip")
                have = _member_size(zf, infos[member], archive_size, path)
                if numel * stype.dtype.itemsize > have:
                    raise _Refused(
                        f"checkpoint {path}: storage {member} holds {have} bytes but the "
                        f"checkpoint says it has {numel} elements of {stype.dtype.itemsize} bytes; "
                        "the file is truncated or corrupt"
                    )
                dtype = stype.dtype if order == "little" else stype.dtype.newbyteorder(">")
                storages[key] = _Storage(
                    dtype, numel, lambda m=member: zf.read(m), f"{path}:{member}", path
                )
            return storages[key]

        _member_size(zf, infos[pkls[0]], archive_size, path)
        pickle_bytes = io.BytesIO(zf.read(pkls[0]))
        result = _unpickle(pickle_bytes, str(path), load_storage, path, corrupt)
        return _materialize(result)


def _load_legacy(path: Path) -> Any:
    """Reads the pre-1.6 torch.save format.

    Layout: pickles of magic number, protocol, sys_info, the object, the storage key list, then for
    each key an int64 element count and the raw elements.
    """
    with open(path, "rb") as f:
        blob = f.read()
    buf = io.BytesIO(blob)
    corrupt = f"the legacy checkpoint is truncated or corrupt. {_REDOWNLOAD}"

    def no_storage(pid: tuple) -> _Storage:
        raise _Refused(f"checkpoint {path}: unexpected storage reference outside the object pickle")

    def plain(what: str, problem: str = corrupt) -> Any:
        # The header pickles hold only ints, dicts and strings; the same restriction applies.
        return _unpickle(buf, f"{path} ({what})", no_storage, path, problem)

    not_torch = (
        "it is neither a zip PyTorch checkpoint nor the legacy format. If it should be one, it is "
        f"corrupt: {_REDOWNLOAD[0].lower()}{_REDOWNLOAD[1:]}; otherwise re-save it with torch>=1.6 "
        "(torch.save(state_dict, path)) or as .safetensors"
    )
    magic = plain("header", not_torch)
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise CheckpointError(path, f"{path} has no PyTorch magic number: {not_torch}")
    if plain("header") != _LEGACY_PROTOCOL:
        raise CheckpointError(
            path, f"{path}: unsupported legacy torch protocol version; re-save it with torch>=1.6"
        )
    sys_info = plain("header")
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise CheckpointError(
            path,
            f"{path}: big-endian legacy checkpoints are not supported; re-save it with torch>=1.6",
        )

    roots: dict[str, _Storage] = {}
    fill: dict[str, bytes] = {}

    def load_storage(pid: tuple) -> Any:
        if len(pid) != 6:
            raise _Refused(f"checkpoint {path}: malformed legacy storage id")
        _, stype, key, _location, numel, view = pid
        key = str(key)
        if type(numel) is not int or not 0 <= numel * stype.dtype.itemsize <= len(blob):
            raise _Refused(
                f"checkpoint {path}: storage {key[:40]!r} claims {numel!r:.40} elements, more than "
                f"the {len(blob)}-byte file holds"
            )
        if key not in roots:
            roots[key] = _Storage(
                stype.dtype, numel, lambda k=key: fill[k], f"{path}:storage {key}", path
            )
        if view is None:
            return roots[key]
        view_key, offset, size = view
        base = roots[key]
        if not (
            type(offset) is int
            and type(size) is int
            and 0 <= offset
            and 0 <= size
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
            path,
        )

    result = _unpickle(buf, str(path), load_storage, path, corrupt)
    keys = plain("storage keys")
    if not isinstance(keys, list):
        raise CheckpointError(path, f"{path}: malformed storage key list; {corrupt}")
    pos = buf.tell()
    for key in keys:
        # Each storage: int64 element count, then the raw little-endian elements.
        key = str(key)
        if key not in roots or pos + 8 > len(blob):
            raise CheckpointError(path, f"{path}: storage {key[:40]!r} is missing; {corrupt}")
        (numel,) = struct.unpack("<q", blob[pos : pos + 8])
        nbytes = numel * roots[key].dtype.itemsize
        if numel != roots[key].numel or pos + 8 + nbytes > len(blob):
            raise CheckpointError(
                path, f"{path}: storage {key[:40]!r} ({roots[key].numel} elements) is cut short "
                f"or has a wrong size ({numel}); {corrupt}"
            )
        fill[key] = blob[pos + 8 : pos + 8 + nbytes]
        pos += 8 + nbytes
    missing = sorted(set(roots) - set(fill))
    if missing:
        raise CheckpointError(path, f"{path}: storage {missing[0][:40]!r} has no data; {corrupt}")
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
    if isinstance(obj, _DictConfig):
        # Only the content: `_parent` points back up the tree, `_metadata` is typing information.
        content = getattr(obj, "state", {}).get("_content")
        if isinstance(content, dict):
            return {k: _materialize(v) for k, v in content.items()}
        return content  # None (an empty config) or a '???' / interpolation string
    if isinstance(obj, _AnyNode):
        return _materialize(getattr(obj, "state", {}).get("_val"))
    if isinstance(obj, _Metadata):
        return None
    return obj


def load_torch_checkpoint(path: str | Path) -> Any:
    """Reads a `torch.save` file without torch and without running any code from it.

    Returns the saved object with every tensor as a numpy array (float32/float16/bfloat16/int64/...,
    same shape and values). Raises FileNotFoundError if `path` is missing and CheckpointError (a
    ValueError) naming the file and the fix if it is truncated, corrupt, not a torch checkpoint, or
    names anything beyond tensors, storages, dicts, argparse args and a Lightning checkpoint's
    omegaconf hyper-parameters (returned as plain dicts) and callback class. Sizes the file declares are
    checked against what it holds before anything is allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
        if head == _ZIP_MAGIC:
            raise CheckpointError(
                path, f"{path} starts like a zip PyTorch checkpoint but its zip directory is "
                f"missing: the file is truncated or corrupt. {_REDOWNLOAD}"
            )
        return _load_legacy(path)
    except CheckpointError:
        raise
    except _MALFORMED as e:
        raise CheckpointError(
            path, f"{path} is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}). "
            f"{_REDOWNLOAD}"
        ) from None
