"""The programs' persistent compilation cache: written by one process, reused by the next."""

import os
import subprocess
import sys

import pytest

from stego_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: enable the cache the way the programs do, compile one function, report.
SCRIPT = """
import sys
import jax
from stego_jax import parallel
path = parallel.enable_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even this tiny compile
jax.jit(lambda x: (x * 2 + 1).sum())(jax.numpy.arange(7.0)).block_until_ready()
print(path)
"""


def _run(env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def _files(path: str) -> list[str]:
    return sorted(f for _, _, fs in os.walk(path) for f in fs)


def test_second_process_reuses_the_first_ones_compilation(tmp_path):
    env = {**os.environ, parallel.ENV_COMPILATION_CACHE: str(tmp_path / "xla")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    assert _run(env) == str(tmp_path / "xla")
    first = _files(tmp_path / "xla")
    assert first, "nothing was written to the cache"
    _run(env)
    assert _files(tmp_path / "xla") == first  # a hit: no new entry


def test_default_folder_and_off(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items()
           if k not in (parallel.ENV_COMPILATION_CACHE, "JAX_COMPILATION_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    assert _run(env) == str(tmp_path / "stego_jax" / "xla")
    assert _files(tmp_path / "stego_jax" / "xla")
    for off in ("off", "0", "none"):
        monkeypatch.setenv(parallel.ENV_COMPILATION_CACHE, off)
        assert parallel.enable_compilation_cache() is None


def test_unwritable_folder_warns_and_stays_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning, match="compilation cache off.*STEGO_JAX_COMPILATION_CACHE"):
        assert parallel.enable_compilation_cache(str(blocker / "xla")) is None
