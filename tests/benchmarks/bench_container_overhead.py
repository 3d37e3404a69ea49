"""Benchmark: a CPU-bound job under run_training_container vs plain ``docker run --rm``.

Run as root with the project venv:
``.venv/bin/python tests/benchmarks/bench_container_overhead.py [--rounds N]``.
Both run the same base image and the same ~5 s Python loop; rounds alternate between the two.
Reported: wall time of the whole call (create, start, run, remove) and the loop's own time as
measured inside the container. Target: sandboxed / plain <= 1.02.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from aicert.guest_runtime.container import SandboxSpec, run_training_container
from aicert.tasks.platforms.base_image import ensure_base_image

LOOP = (
    "import time\n"
    "started = time.perf_counter()\n"
    "total = 0\n"
    "for i in range({iterations}):\n"
    "    total += i * i % 7\n"
    "print(f'LOOP {{time.perf_counter() - started:.4f}}')\n"
)


def loop_seconds(lines: list[str]) -> float:
    return next(float(line.split()[1]) for line in lines if line.startswith("LOOP "))


def run_sandboxed(image: str, script: str, workdir: Path) -> tuple[float, float]:
    folders = {role: workdir / f"{role}-{uuid.uuid4().hex[:8]}" for role in ("src", "res", "out")}
    for folder in folders.values():
        folder.mkdir()
    (folders["src"] / "job.py").write_text(script, encoding="utf-8")
    lines: list[str] = []
    started = time.perf_counter()
    result = run_training_container(
        SandboxSpec(
            image=image,
            command=("python3", "job.py"),
            source_dir=folders["src"],
            resources_dir=folders["res"],
            outputs_dir=folders["out"],
            timeout_s=300,
        ),
        lines.append,
    )
    wall = time.perf_counter() - started
    assert result.exit_code == 0, lines
    return wall, loop_seconds(lines)


def run_plain(image: str, script: str) -> tuple[float, float]:
    started = time.perf_counter()
    completed = subprocess.run(
        ["docker", "run", "--rm", image, "python3", "-c", script],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    return wall, loop_seconds(completed.stdout.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=0, help="0: calibrate to ~5 s")
    args = parser.parse_args()

    image = ensure_base_image()
    iterations = args.iterations
    if not iterations:
        probe = 5_000_000
        _wall, seconds = run_plain(image, LOOP.format(iterations=probe))
        iterations = int(probe * 5.0 / seconds)
    script = LOOP.format(iterations=iterations)
    print(f"image {image[:19]}, {iterations} iterations")

    workdir = Path(tempfile.mkdtemp(prefix="aicert-bench-container-", dir="/tmp"))
    try:
        run_plain(image, script)  # warm-up: image layers and Python files in the page cache
        sandboxed: list[tuple[float, float]] = []
        plain: list[tuple[float, float]] = []
        for round_index in range(args.rounds):
            # Alternate which goes first so that drifting load hits both alike.
            order = ("sandboxed", "plain") if round_index % 2 == 0 else ("plain", "sandboxed")
            for kind in order:
                if kind == "sandboxed":
                    sandboxed.append(run_sandboxed(image, script, workdir))
                else:
                    plain.append(run_plain(image, script))
            print(
                f"round {round_index + 1}: sandboxed wall {sandboxed[-1][0]:.3f} s "
                f"(loop {sandboxed[-1][1]:.3f} s), plain wall {plain[-1][0]:.3f} s "
                f"(loop {plain[-1][1]:.3f} s)"
            )
        for label, index in (("wall", 0), ("loop", 1)):
            for statistic_name, statistic in (("median", statistics.median), ("best", min)):
                ours = statistic(run[index] for run in sandboxed)
                theirs = statistic(run[index] for run in plain)
                print(
                    f"{statistic_name} {label}: sandboxed {ours:.3f} s, plain {theirs:.3f} s, "
                    f"ratio {ours / theirs:.3f} (target <= 1.02: "
                    f"{'met' if ours / theirs <= 1.02 else 'NOT met'})"
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
