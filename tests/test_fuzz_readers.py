"""Seeded mutation fuzzing of the readers of untrusted files: the torch-free checkpoint reader
(.pth zip and legacy, .safetensors, .npz) and the image readers (`read_rgb`, `read_label_png`).

Inputs are built from the torch-written fixtures and small files written here: truncated,
bit-flipped, overwritten with large integers, spliced with another file, and the same applied to
one member of a zip (re-zipped with a valid CRC, so the pickle / .npy header parsers themselves are
reached). Each input must end in a correct load or the project's own error naming the file -
never another exception, never past 2 s, never an allocation the file cannot justify: the traced
peak stays within 64 bytes per input byte + 16 MiB for weights, and for images (whose header
may justify up to PIL's pixel limit, set to 2^20 here) within 64 bytes per input byte + 48 bytes
per allowed pixel (a few float64 copies in the 16-bit path).
"""

from __future__ import annotations

import io
import signal
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from stego_jax.data.sources import CorruptFileError, read_label_png, read_rgb
from stego_jax.weights import CheckpointError, load_npz, load_safetensors, load_torch_checkpoint

FIX = Path(__file__).parent / "fixtures"
SEED = 11
PER_SEED = 190  # x 12 seed files = 2,280 inputs
TIME_LIMIT_S = 2.0
PIXEL_LIMIT = 1 << 20


class _Hang(Exception):
    pass


def _safetensors_bytes() -> bytes:
    """A small .safetensors file of three dtypes, written by the format's layout."""
    import json
    import struct

    arrays = {"a": np.arange(12, dtype="<f4").reshape(3, 4), "b": np.arange(5, dtype="<i8"),
              "c": np.ones((2, 2), "<f2")}
    names = {"a": "F32", "b": "I64", "c": "F16"}
    header, data, off = {"__metadata__": {"format": "np"}}, b"", 0
    for k, a in arrays.items():
        raw = a.tobytes()
        header[k] = {"dtype": names[k], "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _npz_bytes(compressed: bool) -> bytes:
    buf = io.BytesIO()
    arrays = {"w": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "ids": np.arange(7),
              "name": np.array("vit")}
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _image_bytes(fmt: str, mode: str) -> bytes:
    rng = np.random.default_rng(0)
    shape = (24, 20) if mode in ("L", "P") else (24, 20, 3)
    im = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
    if mode == "P":
        im = im.convert("P")
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


# (name, suffix, bytes, reader, the project's error type)
def _seeds() -> list[tuple[str, str, bytes, Callable, type]]:
    pth = [(n, ".pth", (FIX / n).read_bytes(), load_torch_checkpoint, CheckpointError)
           for n in ("tiny_dino_fp32.pth", "tiny_dino_half.pth", "tiny_dino_noncontig.pth",
                     "tiny_dino_legacy.pth", "malicious_legacy.pth")]
    return pth + [
        ("tiny_hf_vit.safetensors", ".safetensors", (FIX / "tiny_hf_vit.safetensors").read_bytes(),
         load_safetensors, CheckpointError),
        ("small.safetensors", ".safetensors", _safetensors_bytes(), load_safetensors, CheckpointError),
        ("stored.npz", ".npz", _npz_bytes(False), load_npz, CheckpointError),
        ("deflated.npz", ".npz", _npz_bytes(True), load_npz, CheckpointError),
        ("rgb.png", ".png", _image_bytes("PNG", "RGB"), read_rgb, CorruptFileError),
        ("label.png", ".png", _image_bytes("PNG", "P"), read_label_png, CorruptFileError),
        ("rgb.jpg", ".jpg", _image_bytes("JPEG", "RGB"), read_rgb, CorruptFileError),
    ]


def _mutate_bytes(data: bytes, rng: np.random.Generator, others: list[bytes]) -> tuple[bytes, str]:
    n = len(data)
    kind = int(rng.integers(6))
    if kind == 0 or n < 2:
        cut = int(rng.integers(0, max(n, 1)))
        return data[:cut], f"truncate@{cut}"
    b = bytearray(data)
    if kind == 1:
        flips = int(rng.integers(1, 9))
        for _ in range(flips):
            b[int(rng.integers(n))] ^= 1 << int(rng.integers(8))
        return bytes(b), f"flip{flips}"
    if kind == 2:  # a large integer where a length / count / index may be
        pos, width = int(rng.integers(n)), int(rng.choice([1, 2, 4, 8]))
        val = int(rng.choice([0xFF, 0x7F, 0x80, 0x00])).to_bytes(1, "little") * width
        b[pos : pos + width] = val
        return bytes(b[:n]), f"overwrite@{pos}x{width}"
    if kind == 3:  # splice with another file
        other = others[int(rng.integers(len(others)))]
        a, c = int(rng.integers(n)), int(rng.integers(max(len(other), 1)))
        return data[:a] + other[c:], f"splice@{a}+{c}"
    if kind == 4:  # delete or duplicate a chunk
        a = int(rng.integers(n))
        w = int(rng.integers(1, min(64, n - a) + 1))
        if rng.integers(2):
            return data[:a] + data[a + w :], f"delete@{a}x{w}"
        return data[: a + w] + data[a : a + w] + data[a + w :], f"dup@{a}x{w}"
    pos = int(rng.integers(n))  # random bytes
    w = int(rng.integers(1, 17))
    b[pos : pos + w] = rng.integers(0, 256, w, dtype=np.uint8).tobytes()
    return bytes(b[:n]), f"random@{pos}x{w}"


def _mutate(data: bytes, rng: np.random.Generator, others: list[bytes]) -> tuple[bytes, str]:
    """Whole-file mutation, or (for zips, half the time) one member mutated and re-zipped."""
    if data[:4] == b"PK\x03\x04" and rng.integers(2):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [(i, z.read(i)) for i in z.infolist()]
        k = int(rng.integers(len(members)))
        new, how = _mutate_bytes(members[k][1], rng, [m for _, m in members])
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for j, (info, body) in enumerate(members):
                z.writestr(info, new if j == k else body)
        return buf.getvalue(), f"member {members[k][0].filename}: {how}"
    return _mutate_bytes(data, rng, others)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pickletools on a mangled STRING opcode
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_fuzzed_inputs_load_or_fail_with_the_project_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIXEL_LIMIT)
    seeds = _seeds()
    rng = np.random.default_rng(SEED)
    all_bytes = [s[2] for s in seeds]

    def on_alarm(signum, frame):
        raise _Hang()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    tracemalloc.start()
    failures, counts, t0 = [], {}, time.perf_counter()
    try:
        for name, suffix, seed_bytes, reader, error in seeds:
            # Each seed loads as is (else the fuzzing would start from a broken file).
            path = tmp_path / f"seed{suffix}"
            path.write_bytes(seed_bytes)
            if name.startswith("malicious"):
                with pytest.raises(error):
                    reader(path)
            else:
                reader(path)
            ok = refused = 0
            for i in range(PER_SEED):
                data, how = _mutate(seed_bytes, rng, all_bytes)
                path = tmp_path / f"{name}-{i}{suffix}"
                path.write_bytes(data)
                where = f"{name} #{i} ({how})"
                tracemalloc.reset_peak()
                base = tracemalloc.get_traced_memory()[0]
                start = time.perf_counter()
                signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S + 1.0)
                try:
                    reader(path)
                    ok += 1
                except _Hang:
                    failures.append(f"{where}: still running after {TIME_LIMIT_S + 1.0} s")
                except error as e:
                    refused += 1
                    if str(path) not in str(e):
                        failures.append(f"{where}: {type(e).__name__} does not name the file: {e}")
                except Exception as e:  # noqa: BLE001  the point of the test
                    failures.append(f"{where}: {type(e).__name__}: {str(e)[:200]}")
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                elapsed = time.perf_counter() - start
                peak = tracemalloc.get_traced_memory()[1] - base
                budget = 64 * len(data) + (
                    48 * PIXEL_LIMIT if error is CorruptFileError else 16 << 20)
                if elapsed > TIME_LIMIT_S:
                    failures.append(f"{where}: took {elapsed:.2f} s")
                if peak > budget:
                    failures.append(f"{where}: allocated {peak} bytes for a {len(data)}-byte file")
                path.unlink()
            counts[name] = (ok, refused, PER_SEED - ok - refused)
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old_handler)
    total = sum(sum(c) for c in counts.values())
    print(f"\nfuzzed {total} inputs in {time.perf_counter() - t0:.1f} s; (loaded, refused, other) "
          f"per seed: {counts}")
    assert total >= 2000
    assert not failures, f"{len(failures)} of {total} inputs misbehaved:\n" + "\n".join(failures[:20])
    assert all(refused > 0 for _, refused, _ in counts.values())
