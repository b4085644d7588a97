"""Shared test set-up: 8 simulated CPU devices (set before JAX is imported) and small fixtures."""

import os

# Sharding tests need several devices; on CPU XLA can simulate them. This must run before
# the first `import jax` anywhere in the test session.
# The suite runs as 2 pytest-xdist workers on 2 cores: one XLA thread each avoids the two
# workers' thread pools fighting over the cores (measured ~2.5x faster steps under contention).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Programs the tests start as subprocesses use a compilation cache of this session only.
if "STEGO_JAX_COMPILATION_CACHE" not in os.environ:
    import tempfile

    os.environ["STEGO_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="stego_jax_xla_")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")


@pytest.fixture(scope="session")
def n_devices() -> int:
    return jax.device_count()
