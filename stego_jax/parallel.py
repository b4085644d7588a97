"""Device mesh, batch sharding and the multi-host start (`jax.distributed`)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment fallbacks of `config.distributed.*` (a launcher such as SLURM or a test sets them
# per process without editing the config file).
ENV_COORDINATOR = "STEGO_COORDINATOR"
ENV_NUM_PROCESSES = "STEGO_NUM_PROCESSES"
ENV_PROCESS_ID = "STEGO_PROCESS_ID"
ENV_CPU_DEVICES = "STEGO_CPU_DEVICES"


ENV_COMPILATION_CACHE = "STEGO_JAX_COMPILATION_CACHE"


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache for a command-line program; returns its folder.

    Compiled steps, backbones and CRFs of a given shape are then reused by later runs (a resumed
    training run, evaluate/predict again) instead of being compiled anew. The folder: `path`,
    else $STEGO_JAX_COMPILATION_CACHE, else one the user already gave JAX
    ($JAX_COMPILATION_CACHE_DIR), else $XDG_CACHE_HOME/stego_jax/xla (~/.cache/...).
    "off" (or "0", "none") turns it off; an unwritable folder only warns.
    """
    path = os.environ.get(ENV_COMPILATION_CACHE) if path is None else path
    if path is not None and path.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    if path is None and jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "stego_jax", "xla")
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:
        import warnings

        warnings.warn(f"compilation cache off ({e}); set ${ENV_COMPILATION_CACHE} to a writable "
                      "folder or to 'off'", RuntimeWarning)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Only compilations that take a while are worth a file.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def _section(config: Any) -> Any:
    """`config.distributed`, or None (no config, or a config without the section)."""
    return config.get("distributed", None) if config is not None else None


def _auto(dist: Any) -> bool:
    return bool(dist.get("auto", False)) if dist is not None else False


def _field(dist: Any, name: str, unset: Any, env: str | None) -> Any:
    """`config.distributed.<name>` unless it holds its 'unset' value (base_config uses "", 0 and
    -1, since ml_collections fields keep their type), then the environment, else None."""
    value = dist.get(name, unset) if dist is not None else unset
    if value is not None and value != unset:
        return value
    raw = os.environ.get(env, "") if env else ""
    return raw if raw != "" else None


def _int(value: Any, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r} must be an integer") from None


def set_cpu_devices(config: Any = None) -> int | None:
    """Simulate `config.distributed.cpu_devices` (or $STEGO_CPU_DEVICES) CPU devices in this process.

    Only effective before the JAX backend starts (the first computation or `jax.devices()`), so
    programs call it first thing. Used to run several processes x several CPU devices on one
    machine (the multi-host test); 0/unset leaves JAX's default. Returns the count set, or None.
    """
    n = _field(_section(config), "cpu_devices", 0, ENV_CPU_DEVICES)
    if n is None:
        return None
    n = _int(n, f"config.distributed.cpu_devices (or ${ENV_CPU_DEVICES})")
    if n <= 0:
        raise ValueError(f"config.distributed.cpu_devices (or ${ENV_CPU_DEVICES}) = {n} must be positive")
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        have = len(jax.local_devices(backend="cpu"))
        if have != n:
            raise RuntimeError(
                f"config.distributed.cpu_devices={n} but the JAX backend already started with {have} "
                f"CPU devices; set it before any JAX computation (e.g. ${ENV_CPU_DEVICES}={n} in the "
                f"environment of the program)")
        return n
    jax.config.update("jax_num_cpu_devices", n)
    return n


def distributed_requested(config: Any = None) -> bool:
    """Whether `initialize_distributed` would start several processes (a coordinator or `auto`)."""
    dist = _section(config)
    return _auto(dist) or bool(_field(dist, "coordinator_address", "", ENV_COORDINATOR))


def initialize_distributed(config: Any = None) -> bool:
    """Start `jax.distributed` when a coordinator is configured (call before any JAX computation).

    Sources, field by field: `config.distributed.{coordinator_address, num_processes, process_id}`
    ("" / 0 / -1 mean unset), then the environment (`STEGO_COORDINATOR`, `STEGO_NUM_PROCESSES`,
    `STEGO_PROCESS_ID`). On TPU pods / SLURM, `jax.distributed.initialize()` with no arguments
    discovers the cluster itself: set `config.distributed.auto=True`. Also applies
    `set_cpu_devices` first. Returns True if running distributed.
    """
    set_cpu_devices(config)
    if not distributed_requested(config):
        return False
    dist = _section(config)
    addr = _field(dist, "coordinator_address", "", ENV_COORDINATOR)
    if jax.distributed.is_initialized():
        return True
    if _auto(dist):
        jax.distributed.initialize()
        return True
    num = _field(dist, "num_processes", 0, ENV_NUM_PROCESSES)
    pid = _field(dist, "process_id", -1, ENV_PROCESS_ID)
    if num is None or pid is None:
        raise ValueError(
            f"the coordinator {addr!r} is set (config.distributed.coordinator_address or "
            f"${ENV_COORDINATOR}) but config.distributed.num_processes / process_id are not; set both "
            f"(or ${ENV_NUM_PROCESSES} / ${ENV_PROCESS_ID})")
    num = _int(num, f"config.distributed.num_processes (or ${ENV_NUM_PROCESSES})")
    pid = _int(pid, f"config.distributed.process_id (or ${ENV_PROCESS_ID})")
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"need num_processes >= 1 and 0 <= process_id < num_processes; got "
                         f"num_processes={num}, process_id={pid} (config.distributed or the environment)")
    jax.distributed.initialize(str(addr), num_processes=num, process_id=pid)
    return True


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D data-parallel mesh over all devices of all processes."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def local_mesh() -> Mesh:
    """A 1-D mesh over this process's devices only: for work each process does alone (no collectives)."""
    return make_mesh(jax.local_devices())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"config.batch_size={global_batch} must be a multiple of the device count ({n}); "
            f"use e.g. {((global_batch + n - 1) // n) * n}"
        )
    if global_batch % jax.process_count():
        raise ValueError(
            f"config.batch_size={global_batch} must be a multiple of the process count "
            f"({jax.process_count()})"
        )


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a `data_sharding(mesh)` batch of `global_batch` that live on this process.

    Read from the sharding rather than assumed to be `[i*B/P, (i+1)*B/P)`, so a mesh whose
    devices are not ordered by process still gets each process's own rows; they must be one
    contiguous block, as `jax.make_array_from_process_local_data` takes one block per process.
    """
    index_map = data_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = sorted({idx[0].start or 0 for idx in index_map.values()})
    stops = sorted({global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()})
    lo, hi = starts[0], stops[-1]
    if sum(b - a for a, b in zip(starts, stops)) != hi - lo:
        raise ValueError(
            f"this process's devices hold non-contiguous rows of the batch ({list(zip(starts, stops))}); "
            "build the mesh from jax.devices() (ordered by process)")
    return slice(lo, hi)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy batch -> global jax arrays sharded along the batch axis."""
    sharding = data_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
    }


def gather_to_host(x: Any) -> np.ndarray:
    """A (possibly multi-process) jax array -> the whole array as numpy on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_main(value: Any) -> Any:
    """Process 0's value of a small numpy/scalar tree on every process (no-op with one process):
    used where processes must take the same branch (e.g. 'does the cache exist?')."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(value)
