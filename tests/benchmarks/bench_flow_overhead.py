"""What certifying costs: the example through ``certify-training`` vs plain ``docker run``.

Usage: ``python tests/benchmarks/bench_flow_overhead.py [--repeat N] [--config PATH]``

It measures, with the same image and the same command as the job (same mounts, user,
limits, no network):

- ``docker run``: the training alone (the baseline);
- the flow against a running ``prefect server start`` (started here on a free loopback port,
  SQLite in a temporary PREFECT_HOME, analytics off), in a fresh Python process, timing
  the flow call itself and the whole process;
- the flow in ephemeral mode (no PREFECT_API_URL: Prefect starts a temporary server).

It prints medians, the overhead of the flow over the baseline, and where the flow's time
goes (task durations read back from the server). The target: at most 3 s of overhead beyond
the run itself against a running server, hashing excluded (the example's files are a few KB,
so hashing is negligible here). A warm-up run first creates the CAs under AICERT_HOME.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE = "aicert/python-base:bookworm"

FLOW_SCRIPT = """\
import json, sys, time
started = time.perf_counter()
from aicert.flows.flows import certify_training
imported = time.perf_counter()
state = certify_training(config_path=sys.argv[1], output_bom=sys.argv[2], return_state=True)
finished = time.perf_counter()
print("BENCH " + json.dumps({
    "import_s": imported - started,
    "flow_s": finished - imported,
    "completed": state.is_completed(),
    "message": str(state.message),
    "flow_run_id": str(state.state_details.flow_run_id),
}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def prefect_server(prefect_home: Path) -> Iterator[str]:
    """A ``prefect server start`` on a free loopback port; yields its API URL."""
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = (prefect_home / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start: see {log.name}")
            time.sleep(0.3)
        yield api_url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


def run_flow(config: Path, bom: Path, env: dict[str, str]) -> dict[str, Any]:
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", FLOW_SCRIPT, str(config), str(bom)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - started
    lines = [line for line in completed.stdout.splitlines() if line.startswith("BENCH ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"flow process failed:\n{completed.stdout[-3000:]}{completed.stderr}")
    measured = json.loads(lines[-1].removeprefix("BENCH "))
    if not measured["completed"]:
        raise RuntimeError(f"flow did not complete: {measured['message']}")
    measured["process_s"] = wall
    return measured


def docker_baseline(config: dict[str, Any], source: Path, work: Path) -> float:
    """The job's command in the job's sandbox, with plain ``docker run``."""
    outputs, resources = work / "outputs", work / "resources"
    shutil.rmtree(work, ignore_errors=True)
    outputs.mkdir(parents=True)
    resources.mkdir()
    outputs.chmod(0o777)
    limits = config.get("limits", {})
    command = [
        "docker", "run", "--rm", "--network", "none", "--user", "1000:1000",
        "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=1g",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--mount", f"type=bind,src={source},dst=/workspace/src,readonly",
        "--mount", f"type=bind,src={resources},dst=/workspace/resources,readonly",
        "--mount", f"type=bind,src={outputs},dst=/workspace/outputs",
        "-w", "/workspace/src", "-e", "HOME=/tmp", "-e", "PYTHONUNBUFFERED=1",
    ]  # fmt: skip
    if "cpus" in limits:
        command += ["--cpus", str(limits["cpus"])]
    if "memory" in limits:
        command += ["--memory", str(limits["memory"]), "--memory-swap", str(limits["memory"])]
    for key, value in (config.get("env") or {}).items():
        command += ["-e", f"{key}={value}"]
    command += [IMAGE, "python3", f"/workspace/src/{config['pythonEntryPoint']}"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - started


def checkout_source(config: dict[str, Any], config_path: Path, into: Path) -> Path:
    """The committed source the flow would clone (HEAD of the local repository)."""
    repo = (config_path.parent / config["source"]["gitRepo"]).resolve()
    subdirectory = config["source"].get("subdirectory") or ""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "HEAD", *([subdirectory] if subdirectory else [])],
        cwd=repo, check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / subdirectory


def task_durations(api_url: str, flow_run_id: str) -> list[tuple[str, float]]:
    response = httpx.post(
        f"{api_url}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"},
        timeout=30,
    )
    response.raise_for_status()
    return [(run["name"], float(run["total_run_time"])) for run in response.json()]


def task_timeline(api_url: str, flow_run_id: str) -> list[tuple[str, float, float]]:
    """Each task run of the flow run as (name, start, end) in seconds after the flow run's
    start, in the order they started: the gaps between them are the flow's own time."""
    flow_run = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=30)
    flow_run.raise_for_status()
    origin = datetime.fromisoformat(flow_run.json()["start_time"])
    response = httpx.post(
        f"{api_url}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"},
        timeout=30,
    )
    response.raise_for_status()
    timeline = []
    for run in response.json():
        if run["start_time"] is None or run["end_time"] is None:
            continue
        start = (datetime.fromisoformat(run["start_time"]) - origin).total_seconds()
        end = (datetime.fromisoformat(run["end_time"]) - origin).total_seconds()
        timeline.append((run["name"], start, end))
    return sorted(timeline, key=lambda item: item[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--config", type=Path, default=REPO_ROOT / "examples" / "minimal" / "aicert.yaml"
    )
    args = parser.parse_args()
    config_path = args.config.resolve()
    config = yaml.safe_load(config_path.read_text())

    with tempfile.TemporaryDirectory(prefix="aicert-bench-") as tmp:
        root = Path(tmp)
        source = checkout_source(config, config_path, root / "source")
        base_env = {**os.environ, "AICERT_HOME": str(root / "aicert-home")}
        base_env.pop("PREFECT_API_URL", None)
        docker_runs = [docker_baseline(config, source, root / "docker") for _ in range(args.repeat)]

        with prefect_server(root) as api_url:
            served_env = {**base_env, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(root)}
            run_flow(config_path, root / "warm-up.json", served_env)  # creates the CAs
            served = [
                run_flow(config_path, root / f"served-{i}.json", served_env)
                for i in range(args.repeat)
            ]
            for measured in served:
                measured["tasks"] = task_durations(api_url, measured["flow_run_id"])
            breakdown = served[-1]["tasks"]

        ephemeral_env = {**base_env, "PREFECT_HOME": str(root / "ephemeral-home")}
        ephemeral = [
            run_flow(config_path, root / f"ephemeral-{i}.json", ephemeral_env)
            for i in range(args.repeat)
        ]

    def median(values: list[float]) -> float:
        return statistics.median(values)

    baseline = median(docker_runs)
    served_flow = median([m["flow_s"] for m in served])
    served_process = median([m["process_s"] for m in served])
    ephemeral_flow = median([m["flow_s"] for m in ephemeral])
    ephemeral_process = median([m["process_s"] for m in ephemeral])
    print(f"config: {config_path}  repeats: {args.repeat} (medians)")
    print(f"docker run (baseline)                     {baseline:6.2f} s")
    print(f"flow, running server: flow call           {served_flow:6.2f} s  "
          f"overhead {served_flow - baseline:+.2f} s")  # fmt: skip
    print(f"flow, running server: whole process       {served_process:6.2f} s  "
          f"overhead {served_process - baseline:+.2f} s "
          f"(import {median([m['import_s'] for m in served]):.2f} s)")  # fmt: skip
    print(f"flow, ephemeral server: flow call         {ephemeral_flow:6.2f} s  "
          f"overhead {ephemeral_flow - baseline:+.2f} s")  # fmt: skip
    print(f"flow, ephemeral server: whole process     {ephemeral_process:6.2f} s  "
          f"overhead {ephemeral_process - baseline:+.2f} s")  # fmt: skip
    # "Hashing" is what the measure-inputs / measure-outputs steps do (clone + hash inputs,
    # hash outputs); it grows with the data, not with the orchestration.
    hashing = [
        sum(seconds for name, seconds in m["tasks"] if name.startswith("measure-")) for m in served
    ]
    without_hashing = median([m["flow_s"] - h for m, h in zip(served, hashing, strict=True)])
    print(f"flow, running server, excluding hashing   {without_hashing:6.2f} s  "
          f"overhead {without_hashing - baseline:+.2f} s "
          f"(measure-inputs + measure-outputs: {median(hashing):.2f} s)")  # fmt: skip
    print("task durations of the last running-server flow run:")
    for name, seconds in breakdown:
        print(f"  {name:<60} {seconds:6.2f} s")
    target = 3.0
    for label, overhead in (
        ("running-server overhead", served_flow - baseline),
        ("running-server overhead excluding hashing", without_hashing - baseline),
    ):
        verdict = "meets" if overhead <= target else "MISSES"
        print(f"{label} {overhead:.2f} s {verdict} the {target:.0f} s target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
