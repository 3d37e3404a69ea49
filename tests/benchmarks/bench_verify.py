"""Benchmark: certificates verified per second by the library on one core, and the wall time
of ``aicert verify``.

Run with the project venv: ``.venv/bin/python tests/benchmarks/bench_verify.py``. Without
arguments it makes a real certificate with the tests' factory (a swtpm and a platform CA in
a temporary folder, about 3 s); ``--certificate proof.json --trust-root ca.pem`` measures an
existing one instead (a local-platform certificate, as ``aicert run`` writes).

Library: the process is pinned to one CPU; ``verify()`` on the parsed certificate, and parse +
``verify()`` from the file's bytes, each looped for ``--seconds``. CLI: ``aicert verify`` in a
subprocess, ``--runs`` times, median wall time (interpreter start and imports included).
Targets: >= 200 certificates/s (parse + verify), CLI < 1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aicert.model import Certificate

TARGET_CERTS_PER_S = 200.0
TARGET_CLI_S = 1.0


def _made_certificate(workdir: Path) -> tuple[bytes, str]:
    """A real certificate from the tests' factory: (JSON bytes, trusted root PEM)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from verification.verify.factory import CertificateFactory, TpmRig

    rig = TpmRig.create(workdir / "tpm", workdir / "ek-ca", workdir / "platform-ca")
    try:
        made = CertificateFactory(rig).make_certificate()
    finally:
        rig.close()
    return made.json_bytes(), made.trust_root_pem


def _rate(operation: Callable[[], object], seconds: float) -> tuple[float, int]:
    for _ in range(20):  # warm-up: imports, caches
        operation()
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        operation()
        count += 1
    return count / (time.perf_counter() - start), count


def _cli_times(certificate: Path, root: Path, runs: int) -> list[float]:
    aicert = Path(sys.executable).parent / "aicert"
    command = [str(aicert), "verify", str(certificate), "--trust-root", str(root)]
    command.append("--allow-dev-platform")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"aicert verify failed ({result.returncode}):\n{result.stderr}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--certificate", type=Path, help="an existing certificate (proof.json)")
    parser.add_argument("--trust-root", type=Path, help="its platform CA (PEM)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per library measurement")
    parser.add_argument("--runs", type=int, default=7, help="CLI runs")
    args = parser.parse_args()
    if (args.certificate is None) != (args.trust_root is None):
        parser.error("--certificate and --trust-root go together")

    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})

    with tempfile.TemporaryDirectory(prefix="aicert-bench-verify-") as temporary:
        workdir = Path(temporary)
        if args.certificate is None:
            data, root_pem = _made_certificate(workdir)
            source = "made by tests/verification/verify/factory.py (real swtpm quote)"
        else:
            data, root_pem = args.certificate.read_bytes(), args.trust_root.read_text()
            source = str(args.certificate)
        proof = workdir / "proof.json"
        proof.write_bytes(data)
        root = workdir / "root.pem"
        root.write_text(root_pem)

        certificate = Certificate.from_json_bytes(data)
        options = {"trusted_roots": [root_pem], "allow_dev_platform": True}
        report = certificate.verify(**options)
        events = len(certificate.event_log)
        print(f"certificate: {source}")
        print(f"  run {report.run_id}, {events} events, {len(data)} bytes; pinned to CPU {cpu}")

        verify_rate, verify_count = _rate(lambda: certificate.verify(**options), args.seconds)
        full_rate, full_count = _rate(
            lambda: Certificate.from_json_bytes(data).verify(**options), args.seconds
        )
        cli = _cli_times(proof, root, args.runs)

    cli_median = statistics.median(cli)
    print(f"library verify():          {verify_rate:8.1f} certs/s ({verify_count} in loop)")
    print(f"library parse + verify():  {full_rate:8.1f} certs/s ({full_count} in loop)")
    print(
        f"aicert verify (CLI):       median {cli_median:.3f} s over {len(cli)} runs "
        f"(min {min(cli):.3f}, max {max(cli):.3f})"
    )
    library_ok = full_rate >= TARGET_CERTS_PER_S
    cli_ok = cli_median < TARGET_CLI_S
    print(
        f"target library >= {TARGET_CERTS_PER_S:.0f} certs/s (parse + verify): "
        f"{'met' if library_ok else 'MISSED'}"
    )
    print(f"target CLI < {TARGET_CLI_S:.1f} s: {'met' if cli_ok else 'MISSED'}")
    return 0 if library_ok and cli_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
