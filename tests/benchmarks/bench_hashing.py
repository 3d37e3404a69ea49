"""Benchmark: aicert.hashing vs a single-thread hashlib loop vs model_signing's sharded SHA-256.

Run with the project venv: ``.venv/bin/python tests/benchmarks/bench_hashing.py``.
Data (8 x 256 MiB files in a folder, one 2 GiB file) lives in a temporary folder under /tmp and
is deleted afterwards. Every method hashes the same, page-cached data in the same run; rounds
alternate between methods and the best round of each is reported.
Targets: folder >= 1.8x single-thread hashlib, single file >= 0.95x.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

from aicert.hashing import hash_tree, sha256_file


def _import_model_signing_hashing() -> types.ModuleType:
    """model_signing's hashing API.

    model-signing 1.1.1 imports pyOpenSSL at package import (for certificate signing, unused
    here) without declaring it as a dependency; when pyOpenSSL is absent, an empty stand-in lets
    the hashing part load. Nothing of it is called by hashing.
    """
    try:
        import OpenSSL  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("OpenSSL")
        stand_in.crypto = types.ModuleType("OpenSSL.crypto")  # type: ignore[attr-defined]
        sys.modules["OpenSSL"] = stand_in
        sys.modules["OpenSSL.crypto"] = stand_in.crypto  # type: ignore[attr-defined]
    from model_signing import hashing

    return hashing


ms_hashing = _import_model_signing_hashing()

MiB = 1024 * 1024
BLOCK = os.urandom(16 * MiB)


def write_file(path: Path, size: int) -> None:
    with open(path, "wb") as out:
        written = 0
        while written < size:
            piece = BLOCK[: min(len(BLOCK), size - written)]
            out.write(piece)
            written += len(piece)


def hashlib_single_thread(paths: list[Path]) -> None:
    """The reference: one thread, one file after the other, 8 MiB reads into one buffer."""
    buffer = bytearray(8 * MiB)
    view = memoryview(buffer)
    for path in sorted(paths):
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as stream:
            while count := stream.readinto(view):
                digest.update(view[:count])
        digest.hexdigest()


def model_signing_sharded(target: Path, shard_size: int) -> None:
    config = ms_hashing.Config().use_shard_serialization(
        hashing_algorithm="sha256", shard_size=shard_size
    )
    config.set_ignored_paths(paths=[], ignore_git_paths=False)
    config.hash(target)


def best_time(action: Callable[[], object], rounds: int, results: list[float]) -> None:
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        results.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--file-mib", type=int, default=256, help="size of each folder file")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--single-mib", type=int, default=2048)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="aicert-bench-hash-", dir="/tmp"))
    try:
        folder = workdir / "model"
        folder.mkdir()
        folder_files = [folder / f"shard-{index:02d}.bin" for index in range(args.files)]
        for path in folder_files:
            write_file(path, args.file_mib * MiB)
        single_dir = workdir / "single"
        single_dir.mkdir()
        single = single_dir / "model.safetensors"
        write_file(single, args.single_mib * MiB)
        folder_bytes = args.files * args.file_mib * MiB
        single_bytes = args.single_mib * MiB
        print(f"cores: {len(os.sched_getaffinity(0))}, data in {workdir}")
        print(f"folder: {args.files} x {args.file_mib} MiB; single file: {args.single_mib} MiB")

        # Warm the page cache, and check that all methods agree on the digests.
        ours = {d.path: d.sha256 for d in hash_tree(folder)}
        assert len(ours) == args.files
        hash_tree(single_dir)

        shard_sizes = [256 * MiB, 512 * MiB, 1_000_000_000]
        cases: dict[str, dict[str, tuple[Callable[[], object], int]]] = {
            "folder": {
                "hashlib 1 thread": (lambda: hashlib_single_thread(folder_files), folder_bytes),
                "aicert hash_tree": (lambda: hash_tree(folder), folder_bytes),
                **{
                    f"model_signing shard {size // MiB} MiB": (
                        lambda size=size: model_signing_sharded(folder, size),
                        folder_bytes,
                    )
                    for size in shard_sizes
                },
            },
            "single file": {
                "hashlib 1 thread": (lambda: hashlib_single_thread([single]), single_bytes),
                "aicert hash_tree": (lambda: hash_tree(single_dir), single_bytes),
                "aicert sha256_file": (lambda: sha256_file(single), single_bytes),
                **{
                    f"model_signing shard {size // MiB} MiB": (
                        lambda size=size: model_signing_sharded(single, size),
                        single_bytes,
                    )
                    for size in shard_sizes
                },
            },
        }
        timings: dict[tuple[str, str], list[float]] = {
            (case, method): [] for case, methods in cases.items() for method in methods
        }
        for _ in range(args.rounds):  # alternate methods round by round: noise hits all alike
            for case, methods in cases.items():
                for method, (action, _size) in methods.items():
                    best_time(action, 1, timings[(case, method)])

        for case, methods in cases.items():
            print(f"\n== {case} ==")
            baseline = min(timings[(case, "hashlib 1 thread")])
            for method, (_action, size) in methods.items():
                runs = timings[(case, method)]
                best = min(runs)
                spread = ", ".join(f"{size / t / 1e9:.2f}" for t in runs)
                print(
                    f"{method:32s} best {size / best / 1e9:5.2f} GB/s "
                    f"({baseline / best:4.2f}x hashlib 1 thread)  rounds GB/s: {spread}"
                )
        folder_ratio = min(timings[("folder", "hashlib 1 thread")]) / min(
            timings[("folder", "aicert hash_tree")]
        )
        single_ratio = min(timings[("single file", "hashlib 1 thread")]) / min(
            timings[("single file", "aicert hash_tree")]
        )
        print(
            f"\ntargets: folder {folder_ratio:.2f}x (>= 1.8x: "
            f"{'met' if folder_ratio >= 1.8 else 'NOT met'}), single file {single_ratio:.2f}x "
            f"(>= 0.95x: {'met' if single_ratio >= 0.95 else 'NOT met'})"
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
