"""Cached, resumable, checksummed download of weight files over plain urllib."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

# Retries after the first attempt, and the first back-off delay in seconds (doubled each retry).
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF = 1.0
TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class _Incomplete(OSError):
    """The connection ended before the announced number of bytes arrived."""


def default_cache_dir() -> Path:
    """$STEGO_JAX_CACHE if set, else ~/.cache/stego_jax/weights."""
    env = os.environ.get("STEGO_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stego_jax" / "weights"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(dest: Path) -> Path:
    """Where the digest of the cached file `dest` is recorded."""
    return dest.with_name(dest.name + ".sha256")


def _write_sidecar(dest: Path, digest: str) -> None:
    tmp = dest.with_name(dest.name + ".sha256.tmp")
    tmp.write_text(f"{digest}  {dest.name}\n")
    os.replace(tmp, sidecar_path(dest))


def verify_cached(dest: Path, sha256: str | None = None, url: str | None = None) -> None:
    """Checks a cached file against the pinned `sha256`, else the digest recorded at its download.

    A pinned digest always wins over the recorded one (a stale record from an earlier, wrong file
    is replaced once the file matches the pin). Without a pin, a file with no record (placed by
    hand) gets its digest recorded now, so later corruption is caught.
    Raises ValueError naming the file, both digests and how to recover when they differ.
    """
    digest = sha256_file(dest)
    sidecar = sidecar_path(dest)
    if sha256 is not None:
        expected, source = sha256.lower(), "the published checksum pinned in the registry"
    elif sidecar.is_file():
        expected, source = (
            sidecar.read_text().split()[0].lower(),
            f"the checksum recorded in {sidecar} at its first download",
        )
    else:
        _write_sidecar(dest, digest)
        return
    if digest != expected:
        where = f" from {url}" if url else ""
        raise ValueError(
            f"cached weights {dest} are corrupt: sha256 {digest} does not match {source} "
            f"({expected}). "
            f"Delete {dest} and {sidecar} and load again to re-download it, or download it"
            f"{where} by hand and place it at {dest}."
        )
    if sha256 is not None and (
        not sidecar.is_file() or sidecar.read_text().split()[:1] != [expected]
    ):
        _write_sidecar(dest, digest)


def _download_once(url: str, part: Path, progress: bool) -> None:
    """One HTTP attempt: resumes `part` with a Range request when it already holds bytes."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "stego_jax"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S
        )
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # The partial file is not a prefix the server can continue (it changed?): start over.
            part.unlink()
        raise
    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length is not None else None
        mode = "wb"
        if have and resp.status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == have:
                mode = "ab"
        if mode == "wb":
            have = 0  # the server ignored the Range header (plain 200) or answered another range
        total = have + length if length is not None else None
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=part.name[: -len(".part")],
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            try:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except http.client.IncompleteRead as e:
                f.write(e.partial)
                raise _Incomplete(f"connection closed after {f.tell()} of {total} bytes") from None
        if total is not None and part.stat().st_size != total:
            raise _Incomplete(f"connection closed after {part.stat().st_size} of {total} bytes")


def fetch(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    retries: int | None = None,
    backoff: float | None = None,
) -> Path:
    """Returns `dest`, downloading it from `url` first if it is not cached; verified either way.

    The download goes to `<dest>.part` (resumed with an HTTP Range request after an interruption,
    restarted when the server ignores Range), is retried with exponential back-off, checked
    against `sha256` when given, its digest recorded in `<dest>.sha256`, then renamed atomically.
    Raises FileNotFoundError naming the URL and the path to place the file at when it cannot be
    downloaded, ValueError when a cached or downloaded file fails its checksum.
    """
    dest = Path(dest)
    if dest.is_file():
        verify_cached(dest, sha256, url)
        return dest
    retries = DEFAULT_RETRIES if retries is None else retries
    backoff = DEFAULT_BACKOFF if backoff is None else backoff
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _download_once(url, part, progress)
            error = None
            break
        except urllib.error.HTTPError as e:
            error = e
            if 400 <= e.code < 500 and e.code not in (408, 416, 429):
                break  # not found / forbidden: retrying will not help
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = e
    if error is not None:
        raise FileNotFoundError(
            f"could not download {dest.name} from {url} ({type(error).__name__}: {error}). "
            "If this machine "
            f"is offline, download {url} elsewhere and place it at {dest} "
            "(or set STEGO_JAX_WEIGHTS_URL to a reachable mirror)."
        ) from error
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise ValueError(
            f"downloaded {url} has sha256 {digest}, expected {sha256}; the download was "
            "corrupted or the "
            f"file on the server changed. Deleted the partial file {part}; load again to retry."
        )
    _write_sidecar(dest, digest)
    os.replace(part, dest)
    return dest
