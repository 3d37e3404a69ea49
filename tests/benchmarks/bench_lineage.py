"""Benchmark: verifying a chain of linked certificates, time per link.

Run with the project venv: ``.venv/bin/python tests/benchmarks/bench_lineage.py [--links 10]``.
It makes real certificates with the tests' factory (one swtpm and a platform CA in a
temporary folder): a first run, then ``--links - 1`` runs each taking the previous one's
``model/weights.bin`` as a certified input, so the last certificate has a lineage of
``--links`` certificates. It then times, ``--repeat`` times (median):

- baseline: ``verify()`` of the ``--links`` certificates one by one, without lineage;
- chain: ``verify(parents=[the others], require_lineage=True)`` of the last one, which
  verifies every parent and checks every link;

and prints the chain's time per link and its ratio to the baseline (the cost of following
the links: certificate digests, matching, output checks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aicert.model import Certificate


def _chain(workdir: Path, links: int) -> tuple[list[Certificate], str]:
    """``links`` real certificates, each (after the first) linked to the one before."""
    from tests.verification.verify.factory import CertificateFactory, TpmRig
    from tests.verification.verify.test_lineage import linked_to

    rig = TpmRig.create(workdir / "tpm", workdir / "ek-ca", workdir / "platform-ca")
    try:
        factory = CertificateFactory(rig)
        chain = [factory.make_certificate().certificate]
        while len(chain) < links:
            made = factory.make_certificate(events=linked_to(chain[-1]))  # type: ignore[arg-type]
            chain.append(made.certificate)
        return chain, factory.trust_root_pem
    finally:
        rig.close()


def _median_s(operation: Callable[[], object], repeat: int) -> float:
    operation()  # warm-up: imports, caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        operation()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--links", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        chain, root = _chain(Path(tmp), args.links)
    policy = {"trusted_roots": [root], "allow_dev_platform": True}

    def one_by_one() -> None:
        for certificate in chain:
            certificate.verify(**policy)

    def linked() -> None:
        report = chain[-1].verify(**policy, parents=chain[:-1], require_lineage=True)
        assert report.lineage and report.lineage[0].verified

    baseline = _median_s(one_by_one, args.repeat)
    followed = _median_s(linked, args.repeat)
    print(f"chain of {args.links} linked certificates, median of {args.repeat} runs")
    print(f"  baseline, each verified alone: {baseline * 1000:8.1f} ms")
    print(f"  child verified with its lineage: {followed * 1000:8.1f} ms")
    print(f"  per link: {followed / args.links * 1000:.2f} ms")
    print(f"  ratio chain / baseline: {followed / baseline:.2f}")


if __name__ == "__main__":
    main()
