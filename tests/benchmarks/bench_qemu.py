"""What measured boot costs: the example certified on ``qemu`` vs on ``local``, step by step.

Usage: ``python tests/benchmarks/bench_qemu.py [--config PATH] [--home DIR]``

Both runs go through ``certify-training`` in this process against one temporary Prefect
server (``prefect_test_harness``), with the same config. The qemu run boots the guest image
built in ``--home`` (default ``$AICERT_QEMU_TEST_HOME`` or ``/tmp/aicert-qemu-tests``, the
test suite's cache; built there first if missing) under software emulation on these
machines. It prints each task's duration for both platforms (read back from the server) and
the ratios, so the cost of booting, staging and loading the image into the guest's engine
shows against the local platform's baseline.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = (
    "load-config",
    "stage-inputs",
    "provision",
    "wait-for-agent",
    "establish-ak",
    "attest-machine",
    "start-run",
    "measure-inputs",
    "build-image",
    "run-training",
    "measure-outputs",
    "quote",
    "collect-outputs",
    "teardown",
    "assemble-certificate",
    "verify-certificate",
    "store-certificate",
)


def task_durations(flow_run_id: Any) -> dict[str, float]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    durations: dict[str, float] = {}
    for run in runs:
        if run.start_time is None or run.end_time is None:
            continue
        # Task run names carry the run id or project after the step's name.
        step = next((name for name in STEPS if run.name.startswith(name)), run.name)
        seconds = (run.end_time - run.start_time).total_seconds()
        durations[step] = durations.get(step, 0.0) + seconds
    return durations


def _certify(config: Path, provider: str, out: Path) -> tuple[float, dict[str, float]]:
    from aicert.flows.flows import certify_training

    started = time.perf_counter()
    state = certify_training(
        config_path=str(config),
        provider=provider,
        output_bom=str(out / f"proof-{provider}.json"),
        return_state=True,
    )
    seconds = time.perf_counter() - started
    if not state.is_completed():
        raise SystemExit(f"{provider}: the flow ended {state.type}: {state.message}")
    return seconds, task_durations(state.state_details.flow_run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=REPO_ROOT / "examples" / "minimal" / "aicert.yaml"
    )
    default_home = os.environ.get("AICERT_QEMU_TEST_HOME") or str(
        Path(tempfile.gettempdir()) / "aicert-qemu-tests"
    )
    parser.add_argument("--home", type=Path, default=Path(default_home))
    args = parser.parse_args()

    os.environ["AICERT_HOME"] = str(args.home.resolve())
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from aicert.tasks.platforms.base_image import ensure_base_image
    from aicert.tasks.platforms.qemu.build import build_guest_image
    from aicert.tasks.platforms.qemu.observe import observe_reference_values

    ensure_base_image()
    image = build_guest_image(args.home.resolve(), progress=print)
    if not image.reference.observed:
        observe_reference_values(image.directory, args.home.resolve(), progress=print)

    with tempfile.TemporaryDirectory() as out_dir, prefect_test_harness(server_startup_timeout=90):
        out = Path(out_dir)
        _certify(args.config, "local", out)  # warm-up: CAs, Prefect's first-run costs
        local_s, local_steps = _certify(args.config, "local", out)
        qemu_s, qemu_steps = _certify(args.config, "qemu", out)

    print(f"\n{'step':<28}{'local s':>10}{'qemu s':>10}{'ratio':>8}")
    for step in sorted(set(local_steps) | set(qemu_steps), key=lambda s: -qemu_steps.get(s, 0)):
        local = local_steps.get(step, 0.0)
        qemu = qemu_steps.get(step, 0.0)
        ratio = f"{qemu / local:.1f}x" if local > 0.05 else "-"
        print(f"{step:<28}{local:>10.1f}{qemu:>10.1f}{ratio:>8}")
    print(f"{'whole flow':<28}{local_s:>10.1f}{qemu_s:>10.1f}{qemu_s / local_s:>7.1f}x")


if __name__ == "__main__":
    main()
