"""Download a resource while hashing it, with retries (the agent's and the staging host's).

A partial file never stays at the target: the bytes go to ``<name>.part`` and are renamed
once complete. Transient failures (5xx, 408, 429, network errors) are retried with backoff;
a client error or a ``file://`` failure is not, it will not heal.

The bytes are copied and hashed at once by ``aicert.guest_runtime.copyhash``: a ``file://``
resource by the kernel (``copy_file_range``) with the copy's bytes hashed alongside, an
``http(s)://`` one through reused buffers, hashed in a second thread; the digest is that of
the bytes written, and memory stays the same whatever the file's size.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from aicert.guest_runtime.copyhash import copy_and_hash, copy_file_and_hash
from aicert.guest_runtime.errors import DownloadError
from aicert.guest_runtime.hostutil import ProgressCallback

DOWNLOAD_ATTEMPTS = 4
# How often, at most, a long download reports its progress.
PROGRESS_INTERVAL_S = 1.0

T = TypeVar("T")


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
    partial = target.with_name(target.name + ".part")

    def once() -> tuple[str, int]:
        return _download_once(url, partial, timeout_s, progress, on_bytes, on_total)

    def undo() -> None:  # a failed or interrupted try leaves no partial file
        partial.unlink(missing_ok=True)

    digest, size = with_retries(url, once, undo=undo, attempts=attempts, progress=progress)
    os.replace(partial, target)
    if progress:
        progress(f"downloaded {target.name}: {size} bytes")
    return digest, size


def with_retries(
    url: str,
    once: Callable[[], T],
    *,
    undo: Callable[[], None],
    attempts: int = DOWNLOAD_ATTEMPTS,
    progress: ProgressCallback | None = None,
) -> T:
    """``once()`` (one try at fetching ``url``), tried again with backoff after a failure
    that may heal; ``undo()`` after each failed or interrupted try removes what it wrote.

    Raises:
        DownloadError: every try failed, or one failed in a way that will not heal; the
            message has the last error.
    """
    scheme = urllib.parse.urlsplit(url).scheme
    last_error: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            return once()
        except (OSError, DownloadError, http.client.HTTPException) as exc:
            undo()
            last_error = exc
            if not _may_heal(exc, scheme):
                break
        except BaseException:
            undo()
            raise
        if attempt < attempts:
            delay = min(2.0 ** (attempt - 1), 10.0)
            if progress:
                progress(f"download of {url} failed ({last_error}); retrying in {delay:.0f} s")
            time.sleep(delay)
    raise DownloadError(f"resources: cannot download {url}: {last_error}")


def _may_heal(error: Exception, scheme: str) -> bool:
    """Whether trying again may succeed: a server error, a timeout or a dropped connection
    may; a client error (4xx but 408 and 429) or a local file's failure will not."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code in (408, 429)
    return scheme != "file"


class DownloadProgress:
    """Counts the bytes of one try, passes them on, and says how far it got at most every
    ``PROGRESS_INTERVAL_S``."""

    def __init__(
        self,
        name: str,
        total: int | None,
        progress: ProgressCallback | None,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        self.size = 0
        self._name, self._total, self._progress, self._on_bytes = name, total, progress, on_bytes
        self._last_report = 0.0

    def __call__(self, count: int) -> None:
        self.size += count
        if self._on_bytes is not None:
            self._on_bytes(count)
        if self._progress is None:
            return
        now = time.monotonic()
        if now - self._last_report > PROGRESS_INTERVAL_S:
            self._last_report = now
            total = self._total
            pct = f" ({100 * self.size / total:.0f}%)" if total else ""
            self._progress(f"downloading {self._name}: {self.size / 1e6:.1f} MB{pct}")


def _local_path(url: str) -> Path:
    """The file a ``file://`` URL names (on this machine: no host, or ``localhost``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise DownloadError(f"{url}: a file:// URL names a file on this machine (file:///path)")
    return Path(urllib.request.url2pathname(parts.path))


@contextlib.contextmanager
def open_resource(url: str, timeout_s: float = 60.0) -> Iterator[tuple[BinaryIO, int | None]]:
    """The bytes of ``url`` as an open stream, with their size where it is known (a regular
    file's size, an HTTP ``Content-Length``). A ``file://`` URL gives an unbuffered file
    (``fileno()`` works), an ``http(s)://`` one the server's response."""
    if urllib.parse.urlsplit(url).scheme == "file":
        with _local_path(url).open("rb", buffering=0) as source:
            info = os.fstat(source.fileno())
            # A regular file's size is known; a device's or a pipe's is not (st_size 0).
            yield source, (info.st_size if stat.S_ISREG(info.st_mode) else None)
        return
    request = urllib.request.Request(url, headers={"User-Agent": "aicert"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
        yield response, int(response.headers.get("Content-Length") or 0) or None


def _download_once(
    url: str,
    partial: Path,
    timeout_s: float,
    progress: ProgressCallback | None,
    on_bytes: Callable[[int], None] | None,
    on_total: Callable[[int | None], None] | None,
) -> tuple[str, int]:
    """One try: ``url`` into ``partial`` (renamed by the caller); (sha256 hex, size) of what
    ``partial`` holds."""
    with open_resource(url, timeout_s) as (source, total):
        if on_total is not None:
            on_total(total)
        reporter = DownloadProgress(partial.name.removesuffix(".part"), total, progress, on_bytes)
        if isinstance(source, io.FileIO):
            digest, size = copy_file_and_hash(source, partial, on_bytes=reporter)
        else:
            with partial.open("wb", buffering=0) as handle:
                digest, size = copy_and_hash(source, handle, on_bytes=reporter)
    if total is not None and size != total:
        raise DownloadError(f"received {size} of {total} bytes")
    return digest, size
