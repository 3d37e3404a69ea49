"""Large outputs out of a machine that keeps them: a real agent (swtpm, dockerd) whose job
writes a 300 MB weights file, downloaded through the agent's API as qemu, Azure and gcp
runs are.

- the download is streamed: the client's peak RSS grows by a bounded amount, measured in a
  subprocess through ``/proc/self/status`` (VmHWM), whatever the file's size;
- each output is hashed on arrival and held to the digest the agent certified: one byte
  flipped in transit (by a relay between client and agent) is refused naming the file, as
  are a file the certificate does not list, one it lists that does not arrive, and a size
  that differs;
- progress lines reach the caller.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aicert.tasks.platforms.agent_client import AgentClient
from aicert.tasks.platforms.received_outputs import (
    CertifiedFile,
    OutputMismatchError,
    certified_outputs,
)
from tests import REPO_ROOT
from tests.guest_runtime.agent.conftest import ConfigFactory, Provisioner, TrainingRepo

pytestmark = [pytest.mark.docker, pytest.mark.swtpm, pytest.mark.slow]

WEIGHTS_MB = 300
# What the download may add to the client's peak RSS: chunks and buffers, not the file.
MAX_RSS_GROWTH_BYTES = 64 * 1024 * 1024
# Where the relay flips a byte: well inside the weights file (the archive sends it first).
TAMPER_OFFSET = 100 * 1024 * 1024

# Writes outputs/weights.bin (WEIGHTS_MB of random bytes, 1 MiB at a time) and a small file.
BIG_OUTPUTS = """\
import os
from pathlib import Path

outputs = Path("/workspace/outputs")
with (outputs / "weights.bin").open("wb") as weights:
    for _ in range(int(os.environ["WEIGHTS_MB"])):
        weights.write(os.urandom(1024 * 1024))
(outputs / "zz-config.json").write_text('{"layers": 2}')
print("wrote the weights", flush=True)
"""


@dataclass(frozen=True)
class BigRun:
    agent_url: str
    run_id: str
    certified: dict[str, CertifiedFile]


@pytest.fixture(scope="module")
def big_tag(training_repo: TrainingRepo) -> str:
    """Tag ``big`` of the session's training repository: a job that writes big outputs, on
    a branch of its own (the main branch, which other tests run, stays as it was)."""
    repo = training_repo.path
    git = ["git", "-c", "user.name=AICert Tests", "-c", "user.email=tests@aicert.invalid"]
    tags = subprocess.run([*git, "tag"], cwd=repo, capture_output=True, text=True, check=True)
    if "big" not in tags.stdout.split():
        for step in (
            ["checkout", "-q", "-b", "big-outputs", "v0"],
            ["add", "src/big.py"],
            ["commit", "-q", "-m", "big outputs"],
            ["tag", "-a", "big", "-m", "big"],
            ["checkout", "-q", "main"],
        ):
            if step[0] == "add":
                (repo / "src" / "big.py").write_text(BIG_OUTPUTS)
            subprocess.run([*git, *step], cwd=repo, check=True)
    return "big"


@pytest.fixture(scope="module")
def big_run(provision: Provisioner, make_config: ConfigFactory, big_tag: str) -> Iterator[BigRun]:
    config = make_config(tag=big_tag, entry="src/big.py", env={"WEIGHTS_MB": str(WEIGHTS_MB)})
    with provision("large outputs") as agent:
        agent.prepare(config)
        status, _ = agent.train()
        assert status.state == "succeeded", status
        events = agent.client.measure_outputs(agent.run_id)
        yield BigRun(agent.machine.agent_url, agent.run_id, certified_outputs(events))


# The download in a process of its own: its VmHWM is the client's alone.
_MEASURED_DOWNLOAD = """\
import json, sys
from pathlib import Path
from aicert.tasks.platforms.agent_client import AgentClient
from aicert.tasks.platforms.received_outputs import CertifiedFile


def high_water_mark():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


url, run_id, destination, certified = sys.argv[1:]
certified = {path: CertifiedFile(**file) for path, file in json.loads(certified).items()}
progress = []
with AgentClient(url) as client:
    client.health()
    before = high_water_mark()
    names = client.download_archive(
        run_id, Path(destination), certified=certified, progress=progress.append
    )
    after = high_water_mark()
print(json.dumps({"before": before, "after": after, "names": names, "progress": progress}))
"""


def test_a_large_output_arrives_checked_with_bounded_memory(
    big_run: BigRun, tmp_path: Path
) -> None:
    certified = {path: vars(file) for path, file in big_run.certified.items()}
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURED_DOWNLOAD,
            big_run.agent_url,
            big_run.run_id,
            str(tmp_path / "downloaded"),
            json.dumps(certified),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.splitlines()[-1])
    weights = tmp_path / "downloaded" / "outputs" / "weights.bin"
    assert weights.stat().st_size == WEIGHTS_MB * 1024 * 1024
    assert big_run.certified["weights.bin"].size == WEIGHTS_MB * 1024 * 1024
    assert {"outputs/weights.bin", "outputs/zz-config.json"} <= set(result["names"])
    growth = result["after"] - result["before"]
    print(f"client peak RSS growth for {WEIGHTS_MB} MB of outputs: {growth / 1e6:.1f} MB")
    assert growth < MAX_RSS_GROWTH_BYTES, growth
    assert "each checked against its certified digest" in result["progress"][-1]


class FlippingRelay:
    """A TCP relay in front of the agent that flips one byte of what the agent sends, at
    ``offset`` bytes into each response stream (plain HTTP: the local agent)."""

    def __init__(self, upstream_url: str, offset: int) -> None:
        host, port = upstream_url.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.offset = offset
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(
                target=self._pipe, args=(connection, upstream, None), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(upstream, connection, self.offset), daemon=True
            ).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, flip_at: int | None) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while data := source.recv(1024 * 1024):
                if flip_at is not None and sent <= flip_at < sent + len(data):
                    changed = bytearray(data)
                    changed[flip_at - sent] ^= 0x01
                    data = bytes(changed)
                sent += len(data)
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


def test_a_byte_flipped_in_transit_is_refused_naming_the_file(
    big_run: BigRun, tmp_path: Path
) -> None:
    relay = FlippingRelay(big_run.agent_url, TAMPER_OFFSET)
    try:
        with AgentClient(relay.url) as client:
            with pytest.raises(
                OutputMismatchError, match=r"^outputs/weights\.bin: arrived with"
            ) as caught:
                client.download_archive(
                    big_run.run_id, tmp_path / "tampered", certified=big_run.certified
                )
    finally:
        relay.close()
    assert caught.value.path == "weights.bin"
    assert big_run.certified["weights.bin"].sha256 in str(caught.value)
    assert not (tmp_path / "tampered" / "outputs" / "weights.bin").exists()


def _download(big_run: BigRun, destination: Path, certified: dict[str, CertifiedFile]) -> None:
    with AgentClient(big_run.agent_url) as client:
        client.download_archive(big_run.run_id, destination, certified=certified)


def test_an_output_the_certificate_does_not_list_is_refused(
    big_run: BigRun, tmp_path: Path
) -> None:
    certified = {k: v for k, v in big_run.certified.items() if k != "zz-config.json"}
    with pytest.raises(OutputMismatchError, match=r"^outputs/zz-config\.json: arrived but is not"):
        _download(big_run, tmp_path / "extra", certified)


def test_a_certified_output_that_does_not_arrive_is_refused(
    big_run: BigRun, tmp_path: Path
) -> None:
    certified = {**big_run.certified, "lost.bin": CertifiedFile("0" * 64, 1)}
    with pytest.raises(OutputMismatchError, match=r"^outputs/lost\.bin: was certified but did not"):
        _download(big_run, tmp_path / "missing", certified)


def test_a_size_that_differs_is_refused_before_reading(big_run: BigRun, tmp_path: Path) -> None:
    other = CertifiedFile(big_run.certified["weights.bin"].sha256, 1)
    certified = {**big_run.certified, "weights.bin": other}
    with pytest.raises(OutputMismatchError, match=r"^outputs/weights\.bin: arrives with 314572800"):
        _download(big_run, tmp_path / "resized", certified)
    assert not (tmp_path / "resized" / "outputs" / "weights.bin").exists()


def test_without_certified_digests_everything_is_taken(big_run: BigRun, tmp_path: Path) -> None:
    """A failed run's outputs (nothing certified): fetched for the builder, unchecked."""
    with AgentClient(big_run.agent_url) as client:
        names = client.download_archive(big_run.run_id, tmp_path / "kept")
    assert "outputs/weights.bin" in names
    assert (
        os.path.getsize(tmp_path / "kept" / "outputs" / "weights.bin") == WEIGHTS_MB * 1024 * 1024
    )


def test_the_agent_reports_its_peak_memory_below_the_output_size(big_run: BigRun) -> None:
    """The agent hashed and sent 300 MB several times in chunks: its peak RSS (VmHWM, on
    ``/health``) stays below the file's size."""
    with AgentClient(big_run.agent_url) as client:
        peak = client.health().peak_rss_bytes
    assert peak is not None
    print(f"agent peak RSS after {WEIGHTS_MB} MB of outputs: {peak / 1e6:.0f} MB")
    assert 10_000_000 < peak < WEIGHTS_MB * 1024 * 1024
