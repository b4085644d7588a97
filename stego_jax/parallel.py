"""Device mesh, batch sharding and the multi-host start (`jax.distributed`)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(config: Any = None) -> bool:
    """Start `jax.distributed` when a coordinator is configured.

    Sources, in order: `config.distributed.{coordinator_address,num_processes,process_id}`,
    then the environment (`STEGO_COORDINATOR`, `STEGO_NUM_PROCESSES`, `STEGO_PROCESS_ID`).
    On TPU pods / SLURM, `jax.distributed.initialize()` with no arguments discovers the
    cluster itself: set `config.distributed.auto=True`. Returns True if started.
    """
    dist = config.get("distributed", None) if config is not None else None
    addr = (dist.get("coordinator_address") if dist else None) or os.environ.get("STEGO_COORDINATOR")
    auto = bool(dist.get("auto", False)) if dist else False
    if not addr and not auto:
        return False
    if jax.distributed.is_initialized():
        return True
    if auto:
        jax.distributed.initialize()
        return True
    num = (dist.get("num_processes") if dist else None) or os.environ.get("STEGO_NUM_PROCESSES")
    pid = dist.get("process_id") if dist else None
    if pid is None:
        pid = os.environ.get("STEGO_PROCESS_ID")
    if num is None or pid is None:
        raise ValueError(
            "config.distributed.coordinator_address is set but num_processes/process_id are not; "
            "set both (or STEGO_NUM_PROCESSES / STEGO_PROCESS_ID)"
        )
    jax.distributed.initialize(addr, num_processes=int(num), process_id=int(pid))
    return True


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D data-parallel mesh over all devices of all processes."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


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


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy batch -> global jax arrays sharded along the batch axis."""
    sharding = data_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
    }
