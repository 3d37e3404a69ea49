"""Certifications per minute through the deployed stack, and event-to-start latency.

Usage: ``python tests/benchmarks/bench_deployments.py [--limits 1 2 4] [--runs 4] [--probes 3]
[--with-promotion]``

For each worker limit it brings the stack up with ``deployments/stack.sh up --limit N``
(SQLite, a fresh PREFECT_HOME under a temporary AICERT_HOME shared by all limits, so the CAs
are made once by a warm-up run), then:

- throughput: emits ``--runs`` ``aicert.source.updated`` events for the minimal example
  (examples/minimal/aicert.yaml) at once and times from the first emission to the last
  certification's completion: certifications per minute = runs / that time. The
  verify-and-promote automation is paused during the batch unless ``--with-promotion``
  (promotions then share the worker);
- latency (on an idle stack, ``--probes`` events one after another): from the event's
  emission to the flow run's creation by the automation, to its Pending state (the worker took
  it) and to its Running state (the flow's process started). The worker polls every
  ``$AICERT_WORKER_POLL_SECONDS`` (stack default 2 s), which bounds the middle step.

It prints one table. Nothing is left running: the stack is taken down after each limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.objects import FlowRun
from prefect.events import Event
from prefect.events.clients import PrefectEventsClient
from prefect.settings import PREFECT_API_URL, temporary_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
STACK = REPO_ROOT / "deployments" / "stack.sh"
EXAMPLE = REPO_ROOT / "examples" / "minimal" / "aicert.yaml"
RUN_TIMEOUT_S = 600
T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stack(env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        ["bash", str(STACK), *args], env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(f"stack.sh {' '.join(args)}:\n{done.stdout}\n{done.stderr}")


@contextmanager
def stack(home: Path, limit: int) -> Iterator[str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(AICERT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # Each limit gets a fresh Prefect database; the CAs under AICERT_HOME are kept.
    subprocess.run(["rm", "-rf", str(home / "prefect")], check=True)
    _stack(env, "up", "--port", str(port), "--limit", str(limit))
    try:
        yield f"http://127.0.0.1:{port}/api"
    finally:
        _stack(env, "down")


def emit(api_url: str, count: int = 1) -> list[Event]:
    events = [
        Event(
            event="aicert.source.updated",
            resource={"prefect.resource.id": "aicert.source.flowers-example"},
            payload={"config_path": str(EXAMPLE), "batch": i},
        )
        for i in range(count)
    ]

    async def send() -> None:
        async with PrefectEventsClient(api_url=api_url) as client:
            for event in events:
                await client.emit(event)

    asyncio.run(send())
    return events


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done in {timeout_s} s")
        time.sleep(0.25)


def certify_runs(client: SyncPrefectClient) -> list[FlowRun]:
    return client.read_flow_runs(
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["certify-training"]))
    )


def wait_finished(client: SyncPrefectClient, expected: int) -> list[FlowRun]:
    def finished() -> list[FlowRun] | None:
        runs = certify_runs(client)
        done = [r for r in runs if r.state is not None and r.state.is_final()]
        return runs if len(runs) >= expected and len(done) == len(runs) else None

    runs = wait_for(finished, RUN_TIMEOUT_S, f"{expected} certifications")
    failed = [r.name for r in runs if not r.state.is_completed()]  # type: ignore[union-attr]
    if failed:
        raise RuntimeError(f"certifications did not complete: {failed}")
    return runs


def state_times(client: SyncPrefectClient, run: FlowRun) -> dict[str, datetime]:
    return {str(state.type.value): state.timestamp for state in client.read_flow_run_states(run.id)}


@dataclass
class Result:
    limit: int
    runs: int
    batch_s: float
    per_minute: float
    created_s: float
    pending_s: float
    running_s: float


def set_promotion(client: SyncPrefectClient, enabled: bool) -> None:
    deployment = client.read_deployment_by_name("verify-and-promote/verify-and-promote")
    for automation in client.read_resource_related_automations(
        f"prefect.deployment.{deployment.id}"
    ):
        if enabled:
            client.resume_automation(automation.id)
        else:
            client.pause_automation(automation.id)


def measure(home: Path, limit: int, runs: int, probes: int, with_promotion: bool) -> Result:
    with stack(home, limit) as api_url, temporary_settings({PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            set_promotion(client, with_promotion)
            # Latency on an idle stack, one event at a time.
            latencies: list[tuple[float, float, float]] = []
            for probe in range(probes):
                (event,) = emit(api_url)
                finished = wait_finished(client, probe + 1)
                run = max(finished, key=lambda r: r.created or event.occurred)
                times = state_times(client, run)
                sent = event.occurred
                latencies.append(
                    (
                        (run.created - sent).total_seconds(),  # type: ignore[operator]
                        (times["PENDING"] - sent).total_seconds(),
                        (times["RUNNING"] - sent).total_seconds(),
                    )
                )
            # Throughput: a batch at once.
            before = probes
            started = time.monotonic()
            emit(api_url, runs)
            wait_finished(client, before + runs)
            batch_s = time.monotonic() - started
            set_promotion(client, True)
    return Result(
        limit=limit,
        runs=runs,
        batch_s=batch_s,
        per_minute=runs * 60 / batch_s,
        created_s=statistics.median(x[0] for x in latencies),
        pending_s=statistics.median(x[1] for x in latencies),
        running_s=statistics.median(x[2] for x in latencies),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=4, help="certifications per batch")
    parser.add_argument("--probes", type=int, default=3, help="latency probes per limit")
    parser.add_argument("--with-promotion", action="store_true")
    args = parser.parse_args()

    results: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="aicert-bench-deploy-") as tmp:
        home = Path(tmp) / "aicert-home"
        for limit in args.limits:
            print(f"limit {limit}: measuring...", file=sys.stderr, flush=True)
            results.append(measure(home, limit, args.runs, args.probes, args.with_promotion))

    print(f"example project {EXAMPLE.relative_to(REPO_ROOT)}, {os.cpu_count()} CPUs, "
          f"worker poll {os.environ.get('AICERT_WORKER_POLL_SECONDS', '2')} s, "
          f"promotions {'on' if args.with_promotion else 'paused'} during the batch")  # fmt: skip
    print(f"{'limit':>5} {'runs':>4} {'batch s':>8} {'cert/min':>8} "
          f"{'->created s':>11} {'->pending s':>11} {'->running s':>11}")  # fmt: skip
    for r in results:
        print(f"{r.limit:>5} {r.runs:>4} {r.batch_s:>8.1f} {r.per_minute:>8.2f} "
              f"{r.created_s:>11.2f} {r.pending_s:>11.2f} {r.running_s:>11.2f}")  # fmt: skip
    print("latency: medians from the event's emission, on an idle stack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
