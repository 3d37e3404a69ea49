"""Dependencies as measured wheels, for the training image (``training_image``).

The training container never reaches a network, and containers here cannot reach the package
index anyway (the host's TLS trust store is not theirs). So the agent resolves
``requirements.txt`` on the host with the host's pip configuration, downloading wheels for the
container's interpreter (Debian bookworm: CPython 3.11, glibc 2.36, x86_64) whatever the host
runs. Each wheel's SHA-256 is measured; the image build (``training_image``) then installs
exactly those files, with pip checking those hashes, in a build whose network is disabled.

With a ``DependencyCache`` (``wheel_cache``), measured wheels are kept by SHA-256; a fully
pinned ``requirements.txt`` is resolved once per pip configuration and target, later runs take
the recorded wheels from the cache (each re-hashed; one that does not match is downloaded
again by its digest), and a training image built from the same inputs is reused. Unpinned
requirements are resolved by pip on every run.
"""

from __future__ import annotations

import configparser
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
from pathlib import Path

from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from aicert.guest_runtime.hostutil import ProgressCallback, run_streaming
from aicert.guest_runtime.wheel_cache import (
    REFRESH_ENV,
    DependencyCache,
    WheelInfo,
    unpinned_reason,
)
from aicert.hashing import sha256_file

__all__ = [
    "WheelInfo",
    "WheelhouseError",
    "has_requirements",
    "resolve_wheelhouse",
    "staged_wheelhouse",
]

# Bookworm's glibc is 2.36: every manylinux_2_N with N <= 36 runs there. pip does not expand
# manylinux_2_N to lower N by itself (only the legacy manylinux2014/2010 aliases), so all are
# listed, with the legacy names for wheels tagged only that way.
GLIBC_MINOR = 36
TARGET_PLATFORMS: tuple[str, ...] = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
)


class WheelhouseError(RuntimeError):
    """Dependencies could not be resolved, or the training image could not be built."""


def has_requirements(requirements: Path) -> bool:
    """Whether the file holds anything but blank lines and comments."""
    for line in requirements.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return True
    return False


# pip never asks a question here, nor looks for a newer pip.
_PIP_ENV = {"PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run_streaming(argv: list[str], progress: ProgressCallback | None) -> None:
    run_streaming(
        argv, progress, env=_PIP_ENV, error=WheelhouseError, tail_lines=30, what="pip download"
    )


def _wheel_info(path: Path) -> WheelInfo:
    try:
        name, version, _build, _tags = parse_wheel_filename(path.name)
    except InvalidWheelFilename as exc:
        raise WheelhouseError(f"not a wheel file name: {path.name}: {exc}") from exc
    sha256, size = sha256_file(path)
    return WheelInfo(
        name=str(name), version=str(version), filename=path.name, sha256=sha256, size=size
    )


def staged_wheelhouse(folder: Path) -> list[WheelInfo]:
    """The wheels an orchestrator staged in ``folder`` (hashed here), sorted by file name."""
    paths = sorted(folder.iterdir()) if folder.is_dir() else []
    not_wheels = [path.name for path in paths if path.suffix != ".whl" or not path.is_file()]
    if not_wheels:
        raise WheelhouseError(f"staged wheels: files that are not wheels: {not_wheels}")
    return [_wheel_info(path) for path in paths]


def _target_arguments(python_version: str) -> list[str]:
    """pip's options for wheels that install in the container, whatever the host is."""
    version_tag = python_version.replace(".", "")
    platforms = [arg for platform in TARGET_PLATFORMS for arg in ("--platform", platform)]
    return [
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "--abi",
        f"cp{version_tag}",
        "--abi",
        "abi3",
        "--abi",
        "none",
        *platforms,
    ]


def _pip_download(
    requirements: Path, folder: Path, target: list[str], progress: ProgressCallback | None
) -> list[Path]:
    """``pip download`` of ``requirements`` into ``folder`` (empty); the files it wrote."""
    _run_streaming(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--requirement",
            str(requirements),
            "--dest",
            str(folder),
            *target,
            "--progress-bar",
            "off",
        ],
        progress,
    )
    downloaded = sorted(path for path in folder.iterdir() if not path.name.startswith("."))
    not_wheels = [path.name for path in downloaded if path.suffix != ".whl"]
    if not_wheels:
        raise WheelhouseError(f"pip downloaded files that are not wheels: {not_wheels}")
    return downloaded


def _pip_config_files() -> list[Path]:
    """The configuration files pip reads, as pip's documentation lists them ("Configuration":
    global, user, site, and ``PIP_CONFIG_FILE``); whether each exists is for the caller."""
    configured = os.environ.get("PIP_CONFIG_FILE")
    if configured == os.devnull:  # pip's documented way to load no file at all
        return []
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    xdg_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    files = [Path(folder) / "pip" / "pip.conf" for folder in xdg_dirs.split(os.pathsep)]
    files += [Path("/etc/pip.conf"), Path.home() / ".pip" / "pip.conf"]
    files += [Path(xdg_home) / "pip" / "pip.conf", Path(sys.prefix) / "pip.conf"]
    if configured:
        files.append(Path(configured))
    return files


def _named_files(config_text: str) -> list[str]:
    """The constraint and requirement files a pip configuration file names."""
    parser = configparser.RawConfigParser()
    try:
        parser.read_string(config_text)
    except configparser.Error:
        return []
    return [
        path
        for section in parser.sections()
        for key in ("constraint", "requirement")
        for path in parser.get(section, key, fallback="").split()
    ]


def _pip_settings() -> str:
    """What besides the requirements and the target decides a resolution on this host: the
    ``PIP_*`` variables, the bytes of pip's configuration files, and of the constraint and
    requirement files these name. Read directly (no ``pip config list``, which costs a pip
    start-up); a file that pip would not read only makes the key stricter."""
    lines = [
        f"env {name}={value}"
        for name, value in sorted(os.environ.items())
        if name.startswith("PIP_")
    ]
    named = [
        *os.environ.get("PIP_CONSTRAINT", "").split(),
        *os.environ.get("PIP_REQUIREMENT", "").split(),
    ]
    for path in _pip_config_files():
        try:
            text = path.read_bytes()
        except OSError:
            continue
        lines.append(f"file {path}: sha256 {hashlib.sha256(text).hexdigest()}")
        named += _named_files(text.decode("utf-8", errors="replace"))
    for name in named:
        try:
            lines.append(f"named {name}: sha256 {sha256_file(Path(name))[0]}")
        except OSError:
            lines.append(f"named {name}: unreadable")
    return "\n".join(lines)


def resolution_key(requirements: Path, target: list[str]) -> tuple[str, dict[str, str]]:
    """The key of a recorded resolution, and what it is made of.

    A resolution is decided by the requirements' bytes, the target (interpreter, ABI and
    platform tags), pip's version and pip's configuration (index URLs, find-links,
    constraints). Not by the index's current contents: reusing the record means resolving as
    the first run did, on purpose (``AICERT_REFRESH_DEPENDENCIES`` resolves again).
    """
    inputs = {
        "requirements_sha256": hashlib.sha256(requirements.read_bytes()).hexdigest(),
        "target": " ".join(target),
        "pip_version": importlib.metadata.version("pip"),
        # A digest only: index URLs may carry credentials, and the record is a plain file.
        "pip_config_sha256": hashlib.sha256(_pip_settings().encode()).hexdigest(),
    }
    encoded = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest(), inputs


def _refetch(
    wheel: WheelInfo, folder: Path, target: list[str], progress: ProgressCallback | None
) -> None:
    """Download exactly ``wheel`` again (by name, version and digest) into ``folder``."""
    with tempfile.TemporaryDirectory(prefix=".refetch-", dir=folder) as scratch_dir:
        scratch = Path(scratch_dir)
        pinned = scratch / "requirement.txt"
        pinned.write_text(
            f"{wheel.name}=={wheel.version} --hash=sha256:{wheel.sha256}\n", encoding="utf-8"
        )
        (scratch / "wheels").mkdir()
        problem = None
        try:
            downloaded = _pip_download(pinned, scratch / "wheels", ["--no-deps", *target], progress)
            if [path.name for path in downloaded] != [wheel.filename]:
                problem = f"pip gave {[path.name for path in downloaded]}"
            elif sha256_file(downloaded[0]) != (wheel.sha256, wheel.size):
                problem = "pip gave other bytes"
        except WheelhouseError as exc:
            problem = str(exc)
        if problem is not None:
            raise WheelhouseError(
                f"{wheel.filename} (sha256 {wheel.sha256}), recorded by an earlier resolution, "
                f"is not intact in the dependency cache and cannot be downloaded again: "
                f"{problem}\nResolve again: aicert run --refresh-dependencies "
                f"(or {REFRESH_ENV}=1)"
            )
        os.replace(downloaded[0], folder / wheel.filename)


def _recorded_wheels(
    cache: DependencyCache,
    key: str,
    folder: Path,
    target: list[str],
    progress: ProgressCallback | None,
) -> list[WheelInfo] | None:
    """The wheels recorded for ``key``, taken from the cache into ``folder`` and each checked
    against its digest (a missing or changed one downloaded again); None: no record."""
    wheels = cache.read_resolution(key)
    if wheels is None:
        return None
    for wheel in wheels:
        if not cache.take_wheel(wheel, folder / wheel.filename):
            if progress is not None:
                progress(
                    f"{wheel.filename}: missing from the dependency cache or not matching its "
                    f"sha256 {wheel.sha256}; downloading it again"
                )
            _refetch(wheel, folder, target, progress)
            cache.add_wheel(folder / wheel.filename, wheel)
    if progress is not None:
        progress(
            f"requirements.txt: {len(wheels)} wheels as resolved by an earlier run "
            "(from the dependency cache, each SHA-256 checked)"
        )
    return sorted(wheels, key=lambda wheel: wheel.filename)


def _reusable_key(
    requirements: Path, target: list[str], progress: ProgressCallback
) -> tuple[str, dict[str, str]] | None:
    """The resolution key of a fully pinned ``requirements``; None (said why) otherwise."""
    reason = unpinned_reason(requirements)
    if reason is not None:
        progress(
            f"requirements.txt: {reason}: resolving with pip "
            "(pin every requirement with == to reuse the resolution)"
        )
        return None
    return resolution_key(requirements, target)


def resolve_wheelhouse(
    requirements: Path,
    dest: Path,
    *,
    python_version: str = "3.11",
    progress: ProgressCallback | None = None,
    cache: DependencyCache | None = None,
) -> list[WheelInfo]:
    """The wheels that satisfy ``requirements`` (dependencies included), into ``dest``.

    Only binary wheels for CPython ``python_version`` on glibc x86_64 are accepted, so that
    they install in the container whatever the host is. Uses the host's pip configuration.
    Returns the wheels sorted by file name; an empty or comment-only file gives ``[]``.
    ``dest`` keeps exactly the returned wheels' files afterwards (older files are removed).

    With ``cache``: every wheel is kept there by its SHA-256, and a fully pinned
    ``requirements`` (``wheel_cache.unpinned_reason``) resolved before under the same pip
    configuration and target gives the recorded wheels without asking the index (unless
    ``cache.refresh``). Each wheel's digest is measured from the file in ``dest``.
    """
    requirements = Path(requirements)
    if not has_requirements(requirements):
        return []
    report = progress or (lambda _message: None)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = _target_arguments(python_version)
    key = None if cache is None else _reusable_key(requirements, target, report)
    # A fresh folder per call: the result lists what this resolution chose, not leftovers.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as download_dir:
        folder = Path(download_dir)
        wheels = None
        if cache is not None and key is not None:
            if cache.refresh:
                report("requirements.txt: resolving again (refresh requested)")
            else:
                wheels = _recorded_wheels(cache, key[0], folder, target, progress)
        if wheels is None:
            wheels = [
                _wheel_info(path) for path in _pip_download(requirements, folder, target, progress)
            ]
            if cache is not None:
                for wheel in wheels:
                    cache.add_wheel(folder / wheel.filename, wheel)
                if key is not None:
                    cache.write_resolution(key[0], wheels, key[1])
        for old in dest.iterdir():
            if old.suffix == ".whl" and (old.is_file() or old.is_symlink()):
                old.unlink()
        for wheel in wheels:
            os.replace(folder / wheel.filename, dest / wheel.filename)
    return wheels
