"""Benchmark: the dependency step of a run, first and second time with the same requirements.

Usage::

    .venv/bin/python tests/benchmarks/bench_dependencies.py [--requirements FILE] [--runs 2]
        [--no-pip-cache]

Default requirements: ``examples/digits/requirements.txt`` (scikit-learn and its
dependencies, every one pinned: 5 wheels, about 68 MB). In a fresh ``AICERT_HOME`` (so a fresh
dependency cache), a training project holding that ``requirements.txt`` is run ``--runs``
times on the local platform (real swtpm, the agent in its own process, real Docker), each on
a fresh machine, up to the end of the image step; the step (``build_image``: wheels resolved
or taken from the cache, measured into PCR 14, the training image built or reused) is timed
from the orchestrator's side.

The first run has no record in the fresh cache: it resolves with pip against the configured
index and builds the image (pip's own HTTP cache and Docker's layer cache on this machine may
make it faster than on a fresh machine; ``--no-pip-cache`` sets ``PIP_NO_CACHE_DIR`` for every
run, so that run 1 downloads every wheel). Every later run should take the recorded wheels
from the cache and reuse the image: target <= 2 s, with exactly the same measured package
events and image ID. Prints each run's time, the ratio to the first, and whether the events
matched.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aicert.guest_runtime.run_state import training_image_tag
from aicert.model import AppEvent
from aicert.tasks.platforms.agent_client import AgentClient
from aicert.tasks.platforms.base_image import ensure_base_image
from aicert.tasks.platforms.local.provider import LocalProvider

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REQUIREMENTS = REPO_ROOT / "examples" / "digits" / "requirements.txt"
TARGET_S = 2.0


def make_project(root: Path, requirements: Path) -> Path:
    """A git repository with ``requirements.txt`` and a job that does nothing."""
    root.mkdir()
    (root / "requirements.txt").write_bytes(requirements.read_bytes())
    (root / "main.py").write_text("print('nothing to train')\n", encoding="utf-8")
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@aicert.invalid"]
    subprocess.run([*git, "init", "--quiet", "--initial-branch=main"], cwd=root, check=True)
    subprocess.run([*git, "add", "--all"], cwd=root, check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "deps"], cwd=root, check=True)
    return root


def dependency_step(
    provider: LocalProvider, project: Path, index: int
) -> tuple[float, list[tuple[str, dict[str, object]]]]:
    """One run up to its image step on a fresh machine: the step's seconds, and its events
    less the run's own name for the training image."""
    run_id = f"bench-deps-{index}-{secrets.token_hex(3)}"
    config = {
        "kind": "python",
        "pythonVersion": "3.11",
        "source": {"type": "git", "gitRepo": str(project), "branch": "main"},
        "pythonEntryPoint": "main.py",
    }
    machine = provider.provision(run_id)
    client = AgentClient(machine.agent_url, timeout_s=900.0)
    try:
        client.wait_until_ready(timeout_s=60.0)
        provider.enroll_attestation_key(machine, client)
        client.start_run(run_id, secrets.token_bytes(32), config)
        client.measure_inputs(run_id)
        started = time.perf_counter()
        events = client.build_image(run_id)
        seconds = time.perf_counter() - started
    finally:
        client.close()
        provider.teardown(machine)
    return seconds, [_comparable(event, run_id) for event in events]


def _comparable(event: AppEvent, run_id: str) -> tuple[str, dict[str, object]]:
    data = dict(event.data)
    if data.get("name") == training_image_tag(run_id):
        data.pop("name")
    return event.type, data


def measure_dependency_reuse(
    requirements: Path, runs: int = 2, work_dir: Path | None = None
) -> bool:
    """Run the dependency step ``runs`` times with ``requirements`` in a fresh cache and print
    the numbers; whether every later run met the target with run 1's measured events.
    (``bench_ingest.py --requirements`` can call this.)"""
    ensure_base_image()
    with tempfile.TemporaryDirectory(prefix="aicert-bench-deps-", dir=work_dir) as tmp:
        root = Path(tmp)
        project = make_project(root / "project", requirements)
        provider = LocalProvider(root / "aicert-home")
        print(f"requirements: {requirements}", flush=True)
        times: list[float] = []
        first_events: list[tuple[str, dict[str, object]]] = []
        same = True
        for index in range(runs):
            seconds, events = dependency_step(provider, project, index)
            packages = [data for kind, data in events if kind == "aicert.input.package"]
            size = sum(int(str(data["size"])) for data in packages)
            times.append(seconds)
            if index == 0:
                first_events = events
            else:
                same = same and events == first_events
            print(
                f"run {index + 1}: dependency step {seconds:.2f} s ({len(packages)} wheels, "
                f"{size / 1e6:.1f} MB; {seconds / times[0]:.3f} x run 1)",
                flush=True,
            )
    later = max(times[1:])
    print(f"later runs: slowest {later:.2f} s (target <= {TARGET_S:.1f} s)")
    print(f"measured events of every run equal to run 1's: {same}")
    return later <= TARGET_S and same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requirements", type=Path, default=DEFAULT_REQUIREMENTS)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--no-pip-cache", action="store_true")
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs: at least 2 (the first run is the baseline)")
    if args.no_pip_cache:
        # For every run (the agents inherit it): pip's settings are part of the record's key.
        os.environ["PIP_NO_CACHE_DIR"] = "1"
    return 0 if measure_dependency_reuse(args.requirements, args.runs, args.work_dir) else 1


if __name__ == "__main__":
    sys.exit(main())
