"""The guest reads the staged-inputs disk in chunks: unpacking a tar with a 256 MiB image
archive and a 256 MiB resource grows the reader's peak RSS by a bounded amount (measured in
a subprocess through ``/proc/self/status`` VmHWM), and every byte still arrives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from aicert.guest_runtime.staged_inputs import (
    IMAGE_ARCHIVE,
    MANIFEST,
    READ_CHUNK,
    STAGED_INPUTS_FORMAT,
    unpack_staged_inputs,
)
from tests import REPO_ROOT

MiB = 1024 * 1024
MEMBER_BYTES = 256 * MiB
MAX_RSS_GROWTH_BYTES = 48 * MiB

_UNPACK = """\
import json, sys
from pathlib import Path
from aicert.guest_runtime.staged_inputs import unpack_staged_inputs


def high_water_mark():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


loaded = []


def load_image(chunks):
    loaded.append(sum(len(chunk) for chunk in chunks))
    return ["staged:latest"]


device, destination = sys.argv[1:]
before = high_water_mark()
unpacked = unpack_staged_inputs(Path(device), Path(destination), load_image)
after = high_water_mark()
print(json.dumps({"before": before, "after": after, "image_bytes": loaded[0]}))
"""


def _staged_tar(work: Path) -> Path:
    manifest = work / MANIFEST
    manifest.write_text(json.dumps({"format": STAGED_INPUTS_FORMAT}))
    image, resource = work / "image.tar", work / "big.bin"
    for path in (image, resource):
        with path.open("wb") as handle:
            handle.write(b"\x01" * MiB)  # data, then a hole: what matters is the reading
            handle.truncate(MEMBER_BYTES)
    device = work / "inputs.tar"
    with tarfile.open(device, "w", format=tarfile.PAX_FORMAT) as archive:
        archive.add(manifest, MANIFEST)
        archive.add(image, IMAGE_ARCHIVE)
        archive.add(resource, "resources/data/big.bin")
    for path in (manifest, image, resource):
        path.unlink()
    return device


def test_unpacking_large_staged_inputs_takes_bounded_memory(tmp_path: Path) -> None:
    device = _staged_tar(tmp_path)
    completed = subprocess.run(
        [sys.executable, "-c", _UNPACK, str(device), str(tmp_path / "unpacked")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.splitlines()[-1])
    assert result["image_bytes"] == MEMBER_BYTES
    resource = tmp_path / "unpacked" / "resources" / "data" / "big.bin"
    assert os.path.getsize(resource) == MEMBER_BYTES
    growth = result["after"] - result["before"]
    assert growth < MAX_RSS_GROWTH_BYTES, f"peak RSS grew by {growth / MiB:.0f} MiB"


def test_progress_counts_the_bytes_read_also_inside_a_large_member(tmp_path: Path) -> None:
    """The 256 MiB resource is reported as it is extracted, not in one step before it."""
    device = _staged_tar(tmp_path)
    reads: list[int] = []
    unpack_staged_inputs(
        device,
        tmp_path / "unpacked",
        lambda chunks: [str(sum(map(len, chunks)))],
        on_bytes=reads.append,
    )
    assert sum(reads) == device.stat().st_size
    assert max(reads) <= READ_CHUNK
    assert len(reads) >= 2 * MEMBER_BYTES // READ_CHUNK
