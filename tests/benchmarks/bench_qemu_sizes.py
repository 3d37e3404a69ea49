"""qemu at real sizes: a multi-GiB resource certified in a VM whose memory stays 2 GiB.

Usage: ``python tests/benchmarks/bench_qemu_sizes.py [--resource-gib 4] [--home DIR]
[--platforms qemu,local] [--boot-timeout 600] [--work DIR]``

Writes a resource of ``--resource-gib`` GiB of random bytes, pins its SHA-256 in a copy of
the minimal example's config (``file://`` URL), and certifies it through ``certify-training``
on a temporary Prefect server, on each platform asked for. The guest image is the one in
``--home`` (default ``$AICERT_QEMU_TEST_HOME`` or ``/tmp/aicert-qemu-tests``; built and
observed there first if the tree changed), booted with its default memory: the staged inputs
are unpacked on the run's scratch disk, not in the guest's RAM.

Prints, measured in the same run: the host's plain copy+hash of the resource (the floor), each
flow step's duration, the qemu run's scratch disk size, and the agent's peak RSS (VmHWM, from
the agent's ``/health``, polled while the run goes) against the resource's size. Not part of
the test suite: under tcg, unpacking and hashing 4 GiB inside the guest takes minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script: its folder is on sys.path, with the qemu benchmark's helpers.
from bench_qemu import REPO_ROOT, task_durations

MiB = 1024 * 1024
GiB = 1024 * MiB


def write_resource(path: Path, size: int) -> str:
    """``size`` bytes of random data at ``path`` (64 MiB of randomness, each block salted so
    no two are alike); returns its SHA-256."""
    block = os.urandom(64 * MiB)
    digest = hashlib.sha256()
    with path.open("wb") as output:
        for index in range(0, size, len(block)):
            chunk = index.to_bytes(8, "little") + block[8 : min(len(block), size - index)]
            digest.update(chunk)
            output.write(chunk)
    return digest.hexdigest()


def copy_and_hash(source: Path, destination: Path) -> float:
    """The floor: a plain 1 MiB read/hash/write loop over ``source``; returns seconds."""
    started = time.perf_counter()
    digest = hashlib.sha256()
    with source.open("rb") as reader, destination.open("wb") as writer:
        while chunk := reader.read(MiB):
            digest.update(chunk)
            writer.write(chunk)
    digest.hexdigest()
    seconds = time.perf_counter() - started
    destination.unlink()
    return seconds


def write_config(directory: Path, resource: Path, sha256: str) -> Path:
    """The minimal example's config (source: this repository) with the resource pinned."""
    import yaml

    config = yaml.safe_load((REPO_ROOT / "examples" / "minimal" / "aicert.yaml").read_text())
    config["source"]["gitRepo"] = str(REPO_ROOT)
    config["resources"] = [
        {"url": resource.as_uri(), "destinationPath": "data/big.bin", "sha256": sha256}
    ]
    config["limits"]["timeoutSeconds"] = 3600
    path = directory / "aicert.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass(frozen=True)
class RunResult:
    """One certified run: wall time, flow steps, the agent's peak RSS, the scratch disk."""

    seconds: float
    steps: dict[str, float]
    agent_peak_rss_bytes: int
    scratch_bytes: int | None


@dataclass
class AgentPeak:
    """Polls the health of the agent of the flow's active run (read from its record) and
    keeps the highest ``peak_rss_bytes`` it reports."""

    home: Path
    peak_bytes: int = 0
    scratch_bytes: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def _poll_once(self) -> None:
        from aicert.flows.lifecycle import active_dir, read_record

        for path in active_dir(self.home).glob("*.json"):
            record = read_record(path)
            machine = record.machine if record is not None else None
            if machine is None or not machine.agent_url:
                continue
            if machine.agent_url.startswith("https://") and not machine.agent_certificate_pem:
                continue
            scratch = machine.details.get("scratch_bytes")
            if scratch is not None:
                self.scratch_bytes = int(scratch)
            try:
                with machine.client(timeout_s=5.0) as client:
                    reported = client.health(timeout_s=5.0).peak_rss_bytes
            except Exception:  # booting, busy or gone: the next poll asks again
                continue
            self.peak_bytes = max(self.peak_bytes, reported or 0)

    def run(self) -> None:
        """Poll every 2 s until :meth:`stop`."""
        while not self._stop.wait(2.0):
            self._poll_once()

    def stop(self) -> None:
        """End :meth:`run` after one last poll."""
        self._stop.set()


def certify(config: Path, provider: str, home: Path, out: Path, boot_timeout_s: float) -> RunResult:
    """One certified run on ``provider`` (qemu: with a boot timeout of ``boot_timeout_s``,
    the guest's default memory and CPUs); its wall time, steps and the agent's peak."""
    from aicert.flows.blocks import QemuPlatform
    from aicert.flows.flows import certify_training

    block = None
    if provider == "qemu":
        block = QemuPlatform(home=str(home), boot_timeout_seconds=boot_timeout_s)

    watch = AgentPeak(home)
    poller = threading.Thread(target=watch.run, daemon=True)
    poller.start()
    started = time.perf_counter()
    try:
        state = certify_training(
            config_path=str(config),
            provider=provider,
            platform_block=block,
            output_bom=str(out / f"proof-{provider}.json"),
            outputs_dir=str(out / f"outputs-{provider}"),
            return_state=True,
        )
    finally:
        watch.stop()
        poller.join()
    seconds = time.perf_counter() - started
    if not state.is_completed():
        raise SystemExit(f"{provider}: the flow ended {state.type}: {state.message}")
    return RunResult(
        seconds=seconds,
        steps=task_durations(state.state_details.flow_run_id),
        agent_peak_rss_bytes=watch.peak_bytes,
        scratch_bytes=watch.scratch_bytes,
    )


def _prepare_qemu(home: Path) -> None:
    from aicert.tasks.platforms.qemu.build import build_guest_image
    from aicert.tasks.platforms.qemu.observe import observe_reference_values

    image = build_guest_image(home, progress=print)
    if not image.reference.observed:
        observe_reference_values(image.directory, home, progress=print)


def _report(resource_bytes: int, floor_s: float, results: dict[str, RunResult]) -> None:
    print(f"\nresource: {resource_bytes / GiB:.1f} GiB")
    print(f"host copy+hash floor: {floor_s:.1f} s ({resource_bytes / floor_s / 1e6:.0f} MB/s)")
    for provider, result in results.items():
        print(f"\n{provider}: whole flow {result.seconds:.1f} s")
        for step, seconds in sorted(result.steps.items(), key=lambda item: -item[1]):
            print(f"  {step:<28}{seconds:>8.1f} s")
        peak = result.agent_peak_rss_bytes
        print(
            f"  agent peak RSS (VmHWM): {peak / MiB:.0f} MiB "
            f"({peak / resource_bytes:.3f} of the resource's size)"
        )
        if result.scratch_bytes:
            print(f"  scratch disk: {result.scratch_bytes / GiB:.1f} GiB (sparse)")
        inputs = result.steps.get("measure-inputs", 0.0)
        if inputs:
            print(
                f"  measure-inputs vs host floor: {inputs / floor_s:.1f}x "
                f"({resource_bytes / inputs / 1e6:.0f} MB/s in the agent)"
            )
    summary = {name: dataclasses.asdict(result) for name, result in results.items()}
    print(json.dumps({"resource_bytes": resource_bytes, "floor_s": floor_s, **summary}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resource-gib", type=float, default=4.0)
    default_home = os.environ.get("AICERT_QEMU_TEST_HOME") or str(
        Path(tempfile.gettempdir()) / "aicert-qemu-tests"
    )
    parser.add_argument("--home", type=Path, default=Path(default_home))
    parser.add_argument("--platforms", default="qemu", help="comma-separated: qemu,local")
    parser.add_argument("--work", type=Path, default=None, help="folder for the resource")
    parser.add_argument(
        "--boot-timeout",
        type=float,
        default=600.0,
        help="seconds the qemu VM may take to boot (tcg on a busy host is slow)",
    )
    args = parser.parse_args()
    home = args.home.resolve()
    os.environ["AICERT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from aicert.tasks.platforms.base_image import ensure_base_image

    ensure_base_image()
    platforms = [name.strip() for name in args.platforms.split(",") if name.strip()]
    if "qemu" in platforms:
        _prepare_qemu(home)
    with tempfile.TemporaryDirectory(dir=args.work, prefix="bench-qemu-sizes-") as work_dir:
        work = Path(work_dir)
        size = int(args.resource_gib * GiB)
        resource = work / "big.bin"
        print(f"writing a {args.resource_gib} GiB resource to {resource}")
        sha256 = write_resource(resource, size)
        floor_s = copy_and_hash(resource, work / "floor-copy.bin")
        config = write_config(work, resource, sha256)
        results: dict[str, RunResult] = {}
        with prefect_test_harness(server_startup_timeout=90):
            for provider in platforms:
                print(f"certifying on {provider}...")
                results[provider] = certify(config, provider, home, work, args.boot_timeout)
    _report(size, floor_s, results)


if __name__ == "__main__":
    main()
