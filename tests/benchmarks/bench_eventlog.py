"""Benchmark: parsing and replaying the real TCG boot event logs of tests/data.

Run with the project venv: ``.venv/bin/python tests/benchmarks/bench_eventlog.py [--repeat 50]``.
For each real log (``tests/data/eventlogs/*.bin`` that parse), it times, median of
``--repeat`` rounds in this process:

- parse + replay: ``parse_event_log(raw).replay()``, what the verifier does with a boot log;
- baseline: the replay's hash extends alone (the same digests, already parsed), the floor
  any replay pays;

and prints both in milliseconds with their ratio (the cost of parsing and checking the
structure). The verifier's bound on a hostile log is tested in test_tcg_eventlog.py (each
parse within a second); speed is measured here, not in the tests.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aicert.errors import EventLogError
from aicert.tcg_eventlog import TcgEventLog, parse_event_log

EVENTLOGS = Path(__file__).resolve().parents[1] / "data" / "eventlogs"


def median_ms(action: Callable[[], object], repeat: int) -> float:
    """The median wall time of ``action`` over ``repeat`` calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def extends_only(log: TcgEventLog) -> None:
    """The replay's hash chain alone: one extend per event and bank."""
    for alg in log.banks:
        values: dict[int, bytes] = {}
        for event in log.events:
            digest = event.digests.get(alg)
            if digest is None:
                continue
            current = values.get(event.pcr, bytes(len(digest)))
            values[event.pcr] = hashlib.new(alg, current + digest).digest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    print(f"{'log':48} {'events':>6} {'parse+replay ms':>16} {'extends ms':>11} {'ratio':>6}")
    for path in sorted(EVENTLOGS.glob("*.bin")):
        raw = path.read_bytes()
        try:
            log = parse_event_log(raw)
        except EventLogError:
            continue  # the malformed real logs: refused, nothing to time
        full = median_ms(lambda raw=raw: parse_event_log(raw).replay(), args.repeat)
        floor = median_ms(lambda log=log: extends_only(log), args.repeat)
        print(f"{path.name:48} {len(log.events):6} {full:16.2f} {floor:11.3f} {full / floor:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
