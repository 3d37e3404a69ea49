"""Inputs staged by the orchestrator for a machine that cannot fetch them (the qemu VM has no
network): the format, and the guest's side, which trusts none of it.

The orchestrator writes one tar (``aicert.tasks.platforms.staging``) and the VM sees it as a
read-only raw disk (``/dev/vda``): no file system driver, the agent reads the device as a
tar stream, once, front to back, in chunks (never the whole of it in memory), and unpacks
it onto the guest's scratch disk (refused up front when the disk has less room left than
the tar's size), in this order:

- ``manifest.json``: format and what follows (informational: nothing in it is measured);
- ``image.tar``: ``docker save`` of the configured base image, streamed into the guest's
  engine (``docker load`` checks every layer against the image configuration, so the image
  ID the agent measures is the content it runs);
- ``source/commit``: the raw git commit object of the checkout, and ``source/tree/...``:
  the checked-out files. The agent recomputes the git tree of those files and requires it
  to be the commit's tree, so the commit SHA-1 it measures names exactly these files (and
  it hashes them with SHA-256 as on every platform);
- ``resources/<destinationPath>``: the downloaded resources (hashed by the agent, pinned
  digests checked by the agent);
- ``wheels/*.whl``: the wheels of ``requirements.txt`` (each hashed by the agent).

What the agent measures is what it computed from these bytes; the orchestrator's claims
(URLs, refs) are recorded as the configuration says, the same as when the agent downloads.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aicert.guest_runtime.archive import extract_member

STAGED_INPUTS_FORMAT = "aicert-staged-inputs/v1"
MANIFEST = "manifest.json"
IMAGE_ARCHIVE = "image.tar"
SOURCE_COMMIT = "source/commit"
SOURCE_TREE = "source/tree"
RESOURCES = "resources"
WHEELS = "wheels"
READ_CHUNK = 1024 * 1024
# Git tree entry modes (what `git ls-tree` shows); submodules (160000) are refused.
GIT_MODE_FILE = 0o100644
GIT_MODE_EXECUTABLE = 0o100755
GIT_MODE_SYMLINK = 0o120000
GIT_MODE_TREE = 0o040000


class StagedInputsError(RuntimeError):
    """The staged inputs are unreadable or do not prove what they claim."""


@dataclass
class UnpackedInputs:
    """Where the agent unpacked a staged tar (the image went straight into the engine)."""

    root: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    loaded_images: list[str] = field(default_factory=list)

    @property
    def source_tree(self) -> Path:
        return self.root / SOURCE_TREE

    @property
    def source_commit(self) -> Path:
        return self.root / SOURCE_COMMIT

    def resource(self, destination: str) -> Path:
        return self.root / RESOURCES / destination

    @property
    def wheels(self) -> Path:
        return self.root / WHEELS


def _chunks(reader: IO[bytes]) -> Iterator[bytes]:
    while chunk := reader.read(READ_CHUNK):
        yield chunk


class _CountingReader(io.RawIOBase):
    """The device, reporting each read's size: progress in bytes actually read, also while
    one multi-GB member is being extracted."""

    def __init__(self, raw: io.BufferedReader, on_bytes: Callable[[int], None]) -> None:
        self._raw = raw
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._raw.readinto(buffer)
        if count:
            self._on_bytes(count)
        return count


def unpack_staged_inputs(
    device: Path,
    destination: Path,
    load_image: Callable[[Iterator[bytes]], list[str]],
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> UnpackedInputs:
    """Read the staged tar from ``device`` once, front to back: the image archive goes to
    ``load_image`` (chunks of ``docker save`` output; returns the loaded image names), the
    rest is extracted under ``destination`` with tarfile's ``data`` filter (no absolute
    paths, no links out, no devices). ``on_bytes`` gets the size of each read from the
    device (the progress of the whole tar, the device's size in all).

    Raises:
        StagedInputsError: the tar is unreadable or not staged inputs, or the file system of
            ``destination`` has less room left than the tar's size (the qemu guest's scratch
            disk is too small), checked before anything is read.
    """
    unpacked = UnpackedInputs(root=destination)
    destination.mkdir(parents=True, exist_ok=True)
    _check_room(device, destination)
    try:
        # Read and copied READ_CHUNK at a time (tarfile's defaults are 10 and 16 KiB).
        with (
            device.open("rb") as raw,
            tarfile.open(
                fileobj=_CountingReader(raw, on_bytes) if on_bytes is not None else raw,
                mode="r|",
                bufsize=READ_CHUNK,
                copybufsize=READ_CHUNK,
            ) as archive,
        ):
            for member in archive:
                if member.name == MANIFEST:
                    reader = archive.extractfile(member)
                    assert reader is not None
                    unpacked.manifest = json.loads(reader.read(1024 * 1024))
                    if unpacked.manifest.get("format") != STAGED_INPUTS_FORMAT:
                        raise StagedInputsError(
                            f"{device}: not {STAGED_INPUTS_FORMAT} "
                            f"(format {unpacked.manifest.get('format')!r})"
                        )
                elif member.name == IMAGE_ARCHIVE:
                    reader = archive.extractfile(member)
                    if reader is None:
                        raise StagedInputsError(f"{device}: {IMAGE_ARCHIVE} is not a file")
                    unpacked.loaded_images = load_image(_chunks(reader))
                else:
                    extract_member(archive, member, destination)
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise StagedInputsError(f"staged inputs {device}: {exc}") from exc
    if not unpacked.manifest:
        raise StagedInputsError(f"staged inputs {device}: no {MANIFEST}")
    return unpacked


def _check_room(device: Path, destination: Path) -> None:
    """Refuse inputs that cannot fit where they are unpacked: failing now names the cause,
    failing half-way would be a full disk in the middle of an image load."""
    try:
        with device.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)  # st_size is 0 for a block device
    except OSError as exc:
        raise StagedInputsError(f"staged inputs {device}: {exc}") from exc
    free = shutil.disk_usage(destination).free
    if free < size:
        raise StagedInputsError(
            f"scratch disk: {destination} has {free / 1e9:.2f} GB free, the staged inputs "
            f"{device} need {size / 1e9:.2f} GB (on qemu, give the run a larger scratch disk: "
            "scratch_gib)"
        )


def git_tree_id(root: Path) -> str:
    """The git tree object ID of the files under ``root`` (as ``git write-tree`` would give
    for a checkout of them): blobs for files and symlinks, modes 100644/100755/120000."""
    from dulwich.objects import Blob, Tree

    tree = Tree()
    with os.scandir(root) as entries:
        for entry in entries:
            path = Path(entry.path)
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                blob = Blob.from_string(os.fsencode(os.readlink(path)))
                tree.add(os.fsencode(entry.name), GIT_MODE_SYMLINK, blob.id)
            elif stat.S_ISDIR(info.st_mode):
                if not any(path.iterdir()):
                    continue  # git has no empty trees; an empty folder is not in the commit
                tree.add(os.fsencode(entry.name), GIT_MODE_TREE, git_tree_id(path).encode())
            elif stat.S_ISREG(info.st_mode):
                blob = Blob.from_string(path.read_bytes())
                mode = GIT_MODE_EXECUTABLE if info.st_mode & stat.S_IXUSR else GIT_MODE_FILE
                tree.add(os.fsencode(entry.name), mode, blob.id)
            else:
                raise StagedInputsError(f"source: {path} is not a file, folder or symlink")
    return tree.id.decode()


def verified_commit(commit_object: bytes, tree_root: Path) -> str:
    """The SHA-1 of the raw commit object ``commit_object``, once the files under
    ``tree_root`` are shown to be exactly that commit's tree."""
    from dulwich.objects import Commit

    try:
        commit = Commit.from_raw_string(Commit.type_num, commit_object)
    except Exception as exc:  # dulwich raises several types for malformed objects
        raise StagedInputsError(f"source: the staged commit object is malformed: {exc}") from exc
    actual = git_tree_id(tree_root)
    if actual != commit.tree.decode():
        raise StagedInputsError(
            f"source: the staged files (git tree {actual}) are not the tree of commit "
            f"{commit.id.decode()} ({commit.tree.decode()})"
        )
    return commit.id.decode()
