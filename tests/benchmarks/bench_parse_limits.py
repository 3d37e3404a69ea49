"""Benchmark: what the worst-shaped certificate files cost the verifier, and a large real one.

Run with the project venv: ``.venv/bin/python tests/benchmarks/bench_parse_limits.py``. It
makes a real certificate with the tests' factory (a swtpm and a platform CA in a temporary
folder) and, around it, each shape of ``tests/verification/verify/worst_shapes.py`` at the byte
limit (64 MB): millions of zeros, empty objects, empty strings or short keys, deep arrays, one
huge string, escaped quotes, long base64, huge numbers, a duplicate key, too many events. Plus
a legitimate large certificate: ``--outputs`` output files (default 20,000, the most a run
may leave; about 10 s to make on a swtpm) or an existing one (``--large-certificate
proof.json --trust-root ca.pem``).

Each document is read in a fresh subprocess (``aicert.load`` then, if it parses, ``verify``):
wall time (and the parse's part of it) and peak RSS of that process, which includes the
interpreter and the verifier's imports (shown as "imports"). Peak RSS is the kernel's VmHWM
of the process: ``resource.getrusage``'s maxrss survives ``exec`` on Linux, so a child would
report its parent's peak. The baseline, in another fresh subprocess, is ``json.loads`` of
the same bytes. Targets: every shape refused or verified in under 2 s and 300 MB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

TARGET_SECONDS = 2.0
TARGET_PEAK_MB = 300.0


def _tests_on_path() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _peak_mb() -> float:
    """This process's peak resident set (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def _child(mode: str, path: Path, root: Path | None) -> None:
    """Measure one document in this (fresh) process; print one JSON line."""
    import aicert
    from aicert.errors import VerificationError

    imports_mb = _peak_mb()
    start = time.perf_counter()
    outcome = "accepted"
    parse_s = 0.0
    if mode == "json":
        try:
            json.loads(path.read_bytes())
            outcome = "parsed"
        except (ValueError, RecursionError) as exc:
            outcome = f"{type(exc).__name__}"
    else:
        try:
            certificate = aicert.load(path)
            parse_s = time.perf_counter() - start
            roots = [root] if root is not None else []
            certificate.verify(trusted_roots=roots, allow_dev_platform=True)
            outcome = "verified"
        except VerificationError as exc:
            outcome = f"{type(exc).__name__}: {str(exc)[len(str(path)) + 2 :][:90]}"
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - start,
                "parse_seconds": parse_s,
                "peak_mb": _peak_mb(),
                "imports_mb": imports_mb,
                "outcome": outcome,
            }
        )
    )


def _measure(mode: str, path: Path, root: Path | None) -> dict[str, object]:
    command = [sys.executable, __file__, "--child", mode, str(path)]
    if root is not None:
        command.append(str(root))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        return {"seconds": float("nan"), "peak_mb": float("nan"), "outcome": result.stderr[-200:]}
    measured: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return measured


def _certificates(workdir: Path, outputs: int) -> tuple[bytes, bytes, str]:
    """(a small real certificate, a large one with ``outputs`` output files, root PEM)."""
    _tests_on_path()
    from verification.verify.factory import CertificateFactory, TpmRig

    rig = TpmRig.create(workdir / "tpm", workdir / "ek-ca", workdir / "platform-ca")
    try:
        factory = CertificateFactory(rig)
        small = factory.make_certificate().json_bytes()
        files = {
            f"dataset/train/class-{i % 1000:04d}/image-{i:07d}.jpeg": b"%d" % i
            for i in range(outputs)
        }
        started = time.perf_counter()
        large = factory.make_certificate(outputs=files).json_bytes()
        print(f"made a {outputs}-output certificate in {time.perf_counter() - started:.0f} s")
    finally:
        rig.close()
    return small, large, factory.trust_root_pem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--outputs", type=int, default=20_000, help="outputs of the large one (MAX_OUTPUT_FILES)"
    )
    parser.add_argument("--large-certificate", type=Path, help="an existing large certificate")
    parser.add_argument("--trust-root", type=Path, help="its platform CA (PEM)")
    parser.add_argument("--shapes", nargs="*", help="only these shapes (names, quoted)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path, *root = args.child
        _child(mode, Path(path), Path(root[0]) if root else None)
        return 0
    if (args.large_certificate is None) != (args.trust_root is None):
        parser.error("--large-certificate and --trust-root go together")

    _tests_on_path()
    from verification.verify.worst_shapes import SHAPES

    from aicert.model import MAX_CERTIFICATE_BYTES

    with tempfile.TemporaryDirectory(prefix="aicert-bench-parse-") as temporary:
        workdir = Path(temporary)
        if args.large_certificate is None:
            small, large, root_pem = _certificates(workdir, args.outputs)
        else:
            small, _, _ = _certificates(workdir, 0)
            large, root_pem = args.large_certificate.read_bytes(), args.trust_root.read_text()
        root = workdir / "root.pem"
        root.write_text(root_pem)
        # Built one at a time: this process holds one 64 MB document, not all of them.
        documents: dict[str, Callable[[], bytes]] = {"legitimate large": lambda: large}
        for name, shape in SHAPES.items():
            if not args.shapes or name in args.shapes:
                documents[name] = partial(shape.build, small, MAX_CERTIFICATE_BYTES)

        print(
            f"{'shape':18} {'MB':>6} {'json.loads':>10} {'aicert':>8} {'(parse)':>8} "
            f"{'ratio':>6} {'peak MB':>8} {'(imports)':>9}  outcome"
        )
        missed = []
        for name, build in documents.items():
            path = workdir / "document.json"
            document = build()
            path.write_bytes(document)
            size = len(document)
            del document
            baseline = _measure("json", path, None)
            measured = _measure("verify", path, root)
            seconds = float(measured["seconds"])  # type: ignore[arg-type]
            peak = float(measured["peak_mb"])  # type: ignore[arg-type]
            ratio = seconds / max(float(baseline["seconds"]), 1e-6)  # type: ignore[arg-type]
            print(
                f"{name:18} {size / 1e6:6.1f} {baseline['seconds']:9.3f}s {seconds:7.3f}s "
                f"{measured.get('parse_seconds', 0):7.3f}s {ratio:6.2f} {peak:8.0f} "
                f"{measured.get('imports_mb', 0):9.0f}  {measured['outcome']}"
            )
            if not (seconds < TARGET_SECONDS and peak < TARGET_PEAK_MB):
                missed.append(name)
    print(
        f"target: each under {TARGET_SECONDS:.0f} s and {TARGET_PEAK_MB:.0f} MB peak RSS: "
        + ("met" if not missed else f"MISSED by {', '.join(missed)}")
    )
    return 0 if not missed else 1


if __name__ == "__main__":
    raise SystemExit(main())
