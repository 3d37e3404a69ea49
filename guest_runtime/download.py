"""Download a resource while hashing it, with retries (the agent's and the staging host's).

A partial file never stays at the target: the bytes go to ``<name>.part`` and are renamed
once complete. Transient failures (5xx, 408, 429, network errors) are retried with backoff;
a client error or a ``file://`` failure is not, it will not heal.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from aicert.guest_runtime.errors import DownloadError
from aicert.guest_runtime.hostutil import ProgressCallback

DOWNLOAD_ATTEMPTS = 4
DOWNLOAD_CHUNK = 4 * 1024 * 1024
# How often, at most, a long download reports its progress.
PROGRESS_INTERVAL_S = 1.0


def download(
    url: str,
    target: Path,
    *,
    progress: ProgressCallback | None = None,
    attempts: int = DOWNLOAD_ATTEMPTS,
    timeout_s: float = 60.0,
    on_bytes: Callable[[int], None] | None = None,
    on_total: Callable[[int | None], None] | None = None,
) -> tuple[str, int]:
    """Stream ``url`` to ``target`` while hashing it; retry transient failures with backoff.

    Args:
        url: ``http(s)://`` or ``file://``.
        target: where the complete file lands.
        progress: receives human-readable progress messages.
        attempts: tries in all.
        timeout_s: socket timeout of one try.
        on_bytes: receives the size of each chunk written.
        on_total: receives the Content-Length (None when the server gives none).

    Returns:
        (sha256 hex, size).

    Raises:
        DownloadError: every try failed; the message has the last error.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    partial = target.with_name(target.name + ".part")
    last_error: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            digest, size = _download_once(
                url, target, partial, timeout_s, progress, on_bytes, on_total
            )
            os.replace(partial, target)
            if progress:
                progress(f"downloaded {target.name}: {size} bytes")
            return digest, size
        except urllib.error.HTTPError as exc:
            partial.unlink(missing_ok=True)
            last_error = exc
            if exc.code < 500 and exc.code not in (408, 429):
                break  # a client error will not heal by retrying
        except (OSError, DownloadError) as exc:
            partial.unlink(missing_ok=True)
            last_error = exc
            if scheme == "file":
                break
        if attempt < attempts:
            delay = min(2.0 ** (attempt - 1), 10.0)
            if progress:
                progress(f"download of {url} failed ({last_error}); retrying in {delay:.0f} s")
            time.sleep(delay)
    raise DownloadError(f"resources: cannot download {url}: {last_error}")


def _download_once(
    url: str,
    target: Path,
    partial: Path,
    timeout_s: float,
    progress: ProgressCallback | None,
    on_bytes: Callable[[int], None] | None,
    on_total: Callable[[int | None], None] | None,
) -> tuple[str, int]:
    """One try: ``url`` into ``partial`` (renamed to ``target`` by the caller); (sha256 hex,
    size) of what was received."""
    digest = hashlib.sha256()
    size = 0
    request = urllib.request.Request(url, headers={"User-Agent": "aicert"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
        total = int(response.headers.get("Content-Length") or 0) or None
        if on_total is not None:
            on_total(total)
        with partial.open("wb") as handle:
            last_report = 0.0
            while chunk := response.read(DOWNLOAD_CHUNK):
                digest.update(chunk)
                handle.write(chunk)
                size += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
                now = time.monotonic()
                if progress and now - last_report > PROGRESS_INTERVAL_S:
                    last_report = now
                    pct = f" ({100 * size / total:.0f}%)" if total else ""
                    progress(f"downloading {target.name}: {size / 1e6:.1f} MB{pct}")
    if total is not None and size != total:
        raise DownloadError(f"{url}: received {size} of {total} bytes")
    return digest.hexdigest(), size
