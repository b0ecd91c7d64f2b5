"""Bounded HTTP downloads for static checkpoint hubs (used by :mod:`headprobe.probes.hub`).

A static hub is untrusted: every download is capped in size (the registry's ``size_bytes`` for a checkpoint and
``$HEADPROBE_MAX_DOWNLOAD_MB``, default 2048), in time (``$HEADPROBE_HUB_TIMEOUT`` seconds per file, default
1800, and 30 s of silence), follows redirects only within the same scheme, host and port, and streams into a
temporary folder inside the hub's cache folder; files are moved into place only once every one of a checkpoint's
files matches its sha256, so a failed download leaves nothing.
"""
from __future__ import annotations

import hashlib
import http.client
import math
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from headprobe.probes.checkpoint import CheckpointError, sha256

MAX_DOWNLOAD_MB = 2048.0  # default of $HEADPROBE_MAX_DOWNLOAD_MB
TIMEOUT_S = 1800.0  # default of $HEADPROBE_HUB_TIMEOUT: seconds one file may take in all
IDLE_TIMEOUT_S = 30.0  # seconds a connection may stay silent
BLOCK = 1 << 16


class NetworkError(CheckpointError):
    """The hub could not be reached, stalled or hung up (as opposed to answering something hostile)."""


def show(value: object, most: int = 60) -> str:
    """``value`` for a one-line message: its repr (control characters escaped), shortened."""
    text = repr(value)
    return text if len(text) <= most else text[:most - 3] + "..."


def env_number(name: str, default: float) -> float:
    """A positive number from the environment variable ``name`` (``default`` when unset); a one-line error else."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise CheckpointError(f"{name}={raw!r} is not a positive number: unset it or set e.g. {name}={default:g}")
    return value


def max_bytes() -> tuple[int, str]:
    """(the most bytes one download may bring, which setting says so) from $HEADPROBE_MAX_DOWNLOAD_MB."""
    mb = env_number("HEADPROBE_MAX_DOWNLOAD_MB", MAX_DOWNLOAD_MB)
    return int(mb * 1e6), f"HEADPROBE_MAX_DOWNLOAD_MB={mb:g}"


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)


class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme, host and port; anything else is a one-line error."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            fp.close()
            raise CheckpointError(f"{req.full_url} redirects to another host ({show(newurl)}): refused, a static "
                                  f"hub serves its own files; check the hub URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _net_error(url: str, err: BaseException, timeout: float) -> NetworkError:
    reason = getattr(err, "reason", err)
    if isinstance(reason, TimeoutError):
        return NetworkError(f"{url} timed out (no data for {min(timeout, IDLE_TIMEOUT_S):g} s): raise "
                            f"HEADPROBE_HUB_TIMEOUT (now {timeout:g}) if the hub is slow, or check your connection")
    return NetworkError(f"cannot download {url} ({type(err).__name__}: {show(str(reason), 200)}): check the hub "
                        f"URL or your connection; nothing was kept")


def _copy(response, url: str, sink: Callable[[bytes], object], limit: int, why: str, timeout: float) -> int:
    """Copy an open response's body into ``sink`` block by block, within ``limit`` bytes and ``timeout`` s."""
    too_big = CheckpointError(f"{url} is bigger than {limit} bytes ({why}): the hub is corrupt or hostile, or raise "
                              f"the limit if you trust it; nothing was kept")
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    deadline, size = time.monotonic() + timeout, 0
    while block := response.read1(BLOCK):  # returns what one receive brings: a drip cannot hold it
        size += len(block)
        if size > limit:
            raise too_big
        if time.monotonic() > deadline:
            raise CheckpointError(f"{url} timed out (unfinished after {timeout:g} s): raise HEADPROBE_HUB_TIMEOUT "
                                  f"if the hub is slow; nothing was kept")
        sink(block)
    if declared.isdigit() and size < int(declared):
        raise NetworkError(f"cannot download {url} (the connection closed after {size} of the {declared} bytes it "
                           f"announced): try again later; nothing was kept")
    return size


def stream(url: str, sink: Callable[[bytes], object], limit: int, why: str) -> int:
    """Copy the body of ``url`` into ``sink(block)``: at most ``limit`` bytes (``why`` names whose limit), within
    $HEADPROBE_HUB_TIMEOUT seconds, redirects only to the same origin; returns the number of bytes."""
    timeout = env_number("HEADPROBE_HUB_TIMEOUT", TIMEOUT_S)
    opener = urllib.request.build_opener(_SameOrigin())
    try:
        with opener.open(url, timeout=min(timeout, IDLE_TIMEOUT_S)) as response:
            return _copy(response, url, sink, limit, why, timeout)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _net_error(url, err, timeout) from None


def get(url: str, limit: int, why: str) -> bytes:
    """The body of ``url``, bounded as in :func:`stream`."""
    blocks: list[bytes] = []
    stream(url, blocks.append, limit, why)
    return b"".join(blocks)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in its folder; nothing is left if that fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download_one(url: str, path: Path, digest: str, limit: int, why: str) -> int:
    """Stream ``url`` into the new file ``path`` and check its sha256; the number of bytes."""
    h = hashlib.sha256()
    with open(path, "xb") as out:
        size = stream(url, lambda block: (h.update(block), out.write(block)), limit, why)
    if h.hexdigest() != digest:
        raise CheckpointError(f"{url} does not match the sha256 in the hub's registry (tampered, truncated or "
                              f"changed after publishing): nothing was kept")
    return size


def download(url: str, hashes: dict[str, str], size_bytes: int, dest: Path, staging_root: Path) -> Path:
    """Fetch ``url/<name>`` for each file of ``hashes`` (name -> sha256, validated) that ``dest`` lacks, into a
    temporary folder in ``staging_root``; move them into ``dest`` only once every one matches. ``size_bytes`` (the
    registry's, 0 if unknown) bounds them all together."""
    missing = {n: d for n, d in hashes.items() if not ((dest / n).is_file() and sha256(dest / n) == d)}
    if not missing:
        return dest
    cap, why = max_bytes()
    if size_bytes > cap:
        raise CheckpointError(f"{url} declares {size_bytes / 1e6:.1f} MB, more than {why}: raise "
                              f"HEADPROBE_MAX_DOWNLOAD_MB if you trust this hub; nothing was fetched")
    limit = size_bytes or cap
    if size_bytes:
        why = f"what is left of the {size_bytes} bytes the registry declares for the checkpoint"
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=staging_root))
    try:
        for name, digest in missing.items():
            limit -= _download_one(f"{url}/{name}", staging / name, digest, limit, why)
        dest.mkdir(parents=True, exist_ok=True)
        for name in missing:
            os.replace(staging / name, dest / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
