"""The dependency cache: measured wheels by SHA-256, resolutions, and training images built.

A run's dependencies cost a resolution against the package index, the download of every wheel
and an image build. This cache keeps what a run measured so that the next run with the same
requirements can skip all three, while measuring exactly what it would have measured:

- ``wheels/<sha256>/<file name>``: each measured wheel, stored under the SHA-256 of its bytes.
  A cached wheel is never trusted for its name: whoever takes it hashes the bytes it got and
  compares with the digest it asked for (a mismatch discards the entry).
- ``resolutions/<key>.json``: the wheels (names, versions, file names, digests) that a fully
  pinned ``requirements.txt`` resolved to, keyed by the file's bytes, the target interpreter
  and platform tags and the pip configuration (see ``wheelhouse.resolution_key``).
- ``images/<inputs digest>.json``: the ID of the training image built from given inputs (base
  image ID, wheel digests, Dockerfile), for ``training_image.build_training_image`` to reuse.

Caching changes what a run costs, not what it measures: the certificate lists every wheel and
the image ID as before. Everything here is written to a temporary file and renamed into place,
so two runs can share the cache at once; a record that cannot be read is ignored (the run does
the work again). The orchestrator keeps its cache in ``$AICERT_HOME/cache/dependencies`` and
gives the local agent the same folder through ``AICERT_DEPENDENCY_CACHE``; a machine without it
(qemu, cloud VMs: fresh for each run) has no cache. Deleting the folder clears it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from aicert.hashing import sha256_file

CACHE_ENV = "AICERT_DEPENDENCY_CACHE"
REFRESH_ENV = "AICERT_REFRESH_DEPENDENCIES"
RECORD_FORMAT = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
_HASH_OPTIONS = re.compile(r"--hash[= ]\w+:[0-9a-fA-F]+(?: --hash[= ]\w+:[0-9a-fA-F]+)*")


@dataclass(frozen=True, slots=True)
class WheelInfo:
    """One downloaded wheel: distribution name (normalised), version, file name, SHA-256, size."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int


def dependency_cache_dir(home: Path) -> Path:
    """The dependency cache of an AICert home folder: ``<home>/cache/dependencies``."""
    return home / "cache" / "dependencies"


def refresh_requested() -> bool:
    """Whether ``$AICERT_REFRESH_DEPENDENCIES`` asks to resolve again (``aicert run
    --refresh-dependencies`` sets it): any value but empty, ``0``, ``false`` or ``no``."""
    return os.environ.get(REFRESH_ENV, "").strip().lower() not in ("", "0", "false", "no")


def unpinned_reason(requirements: Path) -> str | None:
    """Why a recorded resolution of ``requirements`` may not be reused, or None when it may.

    It may when every line pins one distribution to one version (``name==version``, with
    extras, an environment marker and ``--hash`` options allowed) and nothing else shapes the
    resolution from outside the file's bytes: no option lines (``-r``/``-c`` name other files,
    ``-e`` a source tree), no URL requirements, no ``${VARIABLE}`` (pip expands them).
    Transitive dependencies are not pinned by such a file: the record freezes them as the
    first resolution found them, which is what makes a later run reproduce it exactly.
    """
    logical = requirements.read_text(encoding="utf-8").replace("\\\n", " ")
    for number, raw in enumerate(logical.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        where = f"line {number} ({line!r})"
        if "${" in line:
            return f"{where} uses an environment variable"
        tokens = line.split()
        first_option = next((i for i, token in enumerate(tokens) if token.startswith("-")), None)
        if first_option == 0:
            return f"{where} is an option line, not a pinned requirement"
        options = tokens[first_option:] if first_option is not None else []
        if options and not _HASH_OPTIONS.fullmatch(" ".join(options)):
            return f"{where} has options other than --hash"
        text = " ".join(tokens[:first_option])
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            return f"{where} is not a requirement pip would pin"
        specifiers = list(requirement.specifier)
        if requirement.url or len(specifiers) != 1:
            return f"{where} does not pin one version with =="
        (specifier,) = specifiers
        if specifier.operator != "==" or "*" in specifier.version:
            return f"{where} does not pin one version with =="
    return None


def _valid_wheel_record(item: object) -> WheelInfo | None:
    if not isinstance(item, dict) or set(item) != {"name", "version", "filename", "sha256", "size"}:
        return None
    name, version, filename, sha256, size = (
        item["name"],
        item["version"],
        item["filename"],
        item["sha256"],
        item["size"],
    )
    if not all(isinstance(value, str) for value in (name, version, filename, sha256)):
        return None
    if not isinstance(size, int) or size < 0 or not _HEX64.fullmatch(sha256):
        return None
    if "/" in filename or filename.startswith(".") or not filename.endswith(".whl"):
        return None
    return WheelInfo(name=name, version=version, filename=filename, sha256=sha256, size=size)


class DependencyCache:
    """A cache folder (created on first write), and whether this run must resolve again.

    Args:
        root: the cache folder (``dependency_cache_dir(home)``).
        refresh: resolve ``requirements.txt`` again even when a recorded resolution exists
            (the new resolution replaces the record); cached wheels and images are still
            used where their digests match.
    """

    def __init__(self, root: Path, *, refresh: bool = False) -> None:
        self.root = Path(root)
        self.refresh = refresh

    @classmethod
    def for_home(cls, home: Path) -> DependencyCache:
        """The cache of an AICert home folder, refreshing when ``refresh_requested()``."""
        return cls(dependency_cache_dir(home), refresh=refresh_requested())

    @classmethod
    def from_environment(cls) -> DependencyCache | None:
        """The cache named by ``$AICERT_DEPENDENCY_CACHE`` (what the local provider gives its
        agent), or None when it is not set."""
        configured = os.environ.get(CACHE_ENV, "").strip()
        if not configured:
            return None
        return cls(Path(configured), refresh=refresh_requested())

    # -- files, written atomically ----------------------------------------------------------

    def _temporary(self, name: str) -> Path:
        folder = self.root / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{uuid.uuid4().hex}-{name}"

    def _write_json(self, path: Path, value: dict[str, object]) -> None:
        temporary = self._temporary(path.name)
        temporary.write_text(json.dumps(value, indent=1, sort_keys=True), encoding="utf-8")
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temporary, path)

    def _read_json(self, path: Path) -> dict[str, object] | None:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(value, dict) or value.get("format") != RECORD_FORMAT:
            return None
        return value

    # -- wheels -----------------------------------------------------------------------------

    def wheel_path(self, wheel: WheelInfo) -> Path:
        """Where ``wheel`` is kept: ``wheels/<sha256>/<file name>``."""
        return self.root / "wheels" / wheel.sha256 / wheel.filename

    def add_wheel(self, path: Path, wheel: WheelInfo) -> None:
        """Keep the file at ``path``, measured as ``wheel``, in the cache.

        Linked when the cache is on the same file system (no copy), else copied; placed by an
        atomic rename, so a concurrent reader sees the old entry or the new one, never a part.
        """
        temporary = self._temporary(wheel.filename)
        _link_or_copy(path, temporary)
        final = self.wheel_path(wheel)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temporary, final)

    def take_wheel(self, wheel: WheelInfo, destination: Path) -> bool:
        """Put the cached ``wheel`` at ``destination`` if its bytes there hash to its digest.

        The bytes are hashed where the caller will use them (``destination``), so what is
        measured is what is used. A cached file that does not match (changed on disk,
        truncated) is removed from the cache and from ``destination``: False, fetch it again.
        False too when the cache has no such wheel.
        """
        source = self.wheel_path(wheel)
        try:
            _link_or_copy(source, destination)
        except FileNotFoundError:
            return False
        if sha256_file(destination) == (wheel.sha256, wheel.size):
            return True
        destination.unlink()
        self.discard_wheel(wheel)
        return False

    def discard_wheel(self, wheel: WheelInfo) -> None:
        """Remove a cached wheel (its bytes do not match its digest)."""
        with contextlib.suppress(FileNotFoundError):
            self.wheel_path(wheel).unlink()

    # -- resolutions ------------------------------------------------------------------------

    def _resolution_path(self, key: str) -> Path:
        if not _HEX64.fullmatch(key):
            raise ValueError(f"resolution key: not a SHA-256 hex digest: {key!r}")
        return self.root / "resolutions" / f"{key}.json"

    def read_resolution(self, key: str) -> list[WheelInfo] | None:
        """The wheels a previous run resolved for ``key``, or None (none recorded, or a
        record that does not read as one)."""
        record = self._read_json(self._resolution_path(key))
        if record is None or not isinstance(record.get("wheels"), list):
            return None
        items = record["wheels"]
        assert isinstance(items, list)
        wheels = [_valid_wheel_record(item) for item in items]
        valid = [wheel for wheel in wheels if wheel is not None]
        if not valid or len(valid) != len(wheels):
            return None
        if len({wheel.filename for wheel in valid}) != len(valid):  # one file, two digests
            return None
        return valid

    def write_resolution(self, key: str, wheels: list[WheelInfo], inputs: dict[str, str]) -> None:
        """Record that ``key`` (made from ``inputs``, kept for people reading the record)
        resolved to ``wheels``."""
        self._write_json(
            self._resolution_path(key),
            {
                "format": RECORD_FORMAT,
                "inputs": dict(inputs),
                "wheels": [asdict(wheel) for wheel in wheels],
            },
        )

    # -- training images --------------------------------------------------------------------

    def _image_path(self, inputs_digest: str) -> Path:
        if not _HEX64.fullmatch(inputs_digest):
            raise ValueError(f"image inputs digest: not a SHA-256 hex digest: {inputs_digest!r}")
        return self.root / "images" / f"{inputs_digest}.json"

    def read_image(self, inputs_digest: str) -> str | None:
        """The ID of the image recorded as built from ``inputs_digest``, or None."""
        record = self._read_json(self._image_path(inputs_digest))
        image_id = None if record is None else record.get("image_id")
        if not isinstance(image_id, str) or not _IMAGE_ID.fullmatch(image_id):
            return None
        return image_id

    def write_image(self, inputs_digest: str, image_id: str) -> None:
        """Record that the image ``image_id`` was built from ``inputs_digest``."""
        self._write_json(
            self._image_path(inputs_digest), {"format": RECORD_FORMAT, "image_id": image_id}
        )


def _link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link ``source`` at ``destination`` (same file system), else copy it.

    A link shares the bytes: a later change to either name changes both, which is why every
    reader of the cache hashes what it took.
    """
    try:
        os.link(source, destination)
    except FileNotFoundError:
        raise
    except OSError:  # another file system, or links not allowed there
        shutil.copyfile(source, destination)
