"""Fixtures of the certification core's end-to-end tests: real swtpm, real dockerd, HTTP API.

Every run goes through ``LocalProvider`` (a swtpm + an agent process on loopback) and the
``AgentClient``, the same code path as a remote VM. The training project is a small git
repository made here, its resources are served by a local HTTP server.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import docker
import pytest

from aicert.guest_runtime.api_models import TrainingStatus
from aicert.model import AppEvent
from aicert.tasks.platforms.agent_client import AgentClient
from aicert.tasks.platforms.base import EnrolledKey, Machine
from aicert.tasks.platforms.base_image import ensure_base_image
from aicert.tasks.platforms.local.provider import LocalProvider

# -- the training project ----------------------------------------------------------------

DATA_CSV = "x,y\n" + "".join(f"{x},{2 * x + 1 + (x % 3) * 0.01}\n" for x in range(20))

# v0: standard library only. Prints the resources it sees (path, size, SHA-256), then one line
# per epoch, and writes a model plus a nested checkpoint into the outputs.
MAIN_V0 = """\
import hashlib, json, os, struct
from pathlib import Path

SRC = Path("/workspace/src")
RESOURCES = Path("/workspace/resources")
OUTPUTS = Path(os.environ.get("OUTPUTS_DIR", "/workspace/outputs"))
EPOCHS = int(os.environ.get("EPOCHS", "20"))


def main():
    for path in sorted(p for p in RESOURCES.rglob("*") if p.is_file()):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        print(f"resource {path.relative_to(RESOURCES)} size={len(data)} sha256={digest}")
    lines = (SRC / "inputs" / "data.csv").read_text().splitlines()[1:]
    xs, ys = zip(*((float(a), float(b)) for a, b in (line.split(",") for line in lines)))
    a = b = 0.0
    for epoch in range(1, EPOCHS + 1):
        for _ in range(50):
            errors = [a * x + b - y for x, y in zip(xs, ys)]
            a -= 0.002 * sum(e * x for e, x in zip(errors, xs)) / len(xs)
            b -= 0.002 * sum(errors) / len(xs)
        loss = sum((a * x + b - y) ** 2 for x, y in zip(xs, ys)) / len(xs)
        print(f"epoch {epoch}/{EPOCHS} loss={loss:.6f}")
    (OUTPUTS / "model.bin").write_bytes(struct.pack("<dd", a, b))
    (OUTPUTS / "checkpoints").mkdir()
    (OUTPUTS / "checkpoints" / "last.json").write_text(json.dumps({"a": a, "b": b}))
    print("training done")


main()
"""

# v1: the same job, plus a dependency from requirements.txt that must import offline.
MAIN_V1 = MAIN_V0.replace(
    "def main():\n",
    'def main():\n    import six\n    print(f"six {six.__version__} from {six.__file__}")\n',
)

# The sandbox probe: prints what the job can reach; exits 0 only if it is locked down.
PROBE = """\
import errno, os, socket, sys
from pathlib import Path

failures = []


def report(name, value, ok):
    print(f"probe {name}={value}")
    if not ok:
        failures.append(name)


report("uid", os.getuid(), os.getuid() != 0)
report("euid", os.geteuid(), os.geteuid() != 0)
with open("/proc/self/status") as status:
    capeff = next(line.split()[1] for line in status if line.startswith("CapEff:"))
report("capeff", capeff, int(capeff, 16) == 0)
for path in ("/dev/tpm0", "/dev/tpmrm0", "/var/run/docker.sock", "/run/docker.sock"):
    report(f"exists:{path}", os.path.exists(path), not os.path.exists(path))
with open("/proc/net/dev") as netdev:
    interfaces = sorted(line.split(":")[0].strip() for line in netdev.readlines()[2:])
report("interfaces", ",".join(interfaces), interfaces == ["lo"])
host, port = os.environ["PROBE_TARGET"].rsplit(":", 1)
try:
    socket.create_connection((host, int(port)), timeout=5).close()
    report("connect", "connected", False)
except OSError as exc:
    report("connect", errno.errorcode.get(exc.errno or 0, repr(exc)), True)
try:
    socket.getaddrinfo("pypi.org", 443)
    report("dns", "resolved", False)
except OSError:
    report("dns", "failed", True)
try:
    (Path("/workspace/src") / "written-by-job").write_text("x")
    report("src_writable", True, False)
except OSError:
    report("src_writable", False, True)
print("probe failures=" + ",".join(failures))
sys.exit(1 if failures else 0)
"""

FAIL = """\
import sys
from pathlib import Path

print("starting a job that fails")
(Path("/workspace/outputs") / "partial.bin").write_bytes(b"half a model")
print("about to exit with code 3")
sys.exit(3)
"""

SYMLINK_OUT = """\
import os
from pathlib import Path

(Path("/workspace/outputs") / "model.bin").write_bytes(b"weights")
os.symlink("/etc/passwd", "/workspace/outputs/passwd-link")
print("linked /etc/passwd into the outputs")
"""

SLEEP = """\
import time

print("sleeping", flush=True)
time.sleep(300)
"""

# One file more than a certificate may list (aicert.model.MAX_OUTPUT_FILES = 20,000).
MANY_OUTPUTS = """\
from pathlib import Path

outputs = Path("/workspace/outputs")
for index in range(20_001):
    (outputs / f"shard-{index:05d}.bin").write_bytes(b"%d" % index)
print("wrote 20001 files", flush=True)
"""

REQUIREMENTS_V1 = "# the only dependency\nsix==1.16.0\n"


@dataclass(frozen=True)
class TrainingRepo:
    """A local git repository: tag ``v0`` (stdlib only) and tag ``v1`` (adds six)."""

    path: Path
    commits: dict[str, str]  # tag -> commit SHA-1


def _git(repo: Path, *args: str) -> str:
    completed = subprocess.run(
        ["git", "-c", "user.name=AICert Tests", "-c", "user.email=tests@aicert.invalid", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    return completed.stdout.strip()


@pytest.fixture(scope="session")
def training_repo(tmp_path_factory: pytest.TempPathFactory) -> TrainingRepo:
    repo = tmp_path_factory.mktemp("training-repo")
    _git(repo, "init", "--quiet", "--initial-branch=main")
    files = {
        "src/main.py": MAIN_V0,
        "src/probe.py": PROBE,
        "src/fail.py": FAIL,
        "src/symlink_out.py": SYMLINK_OUT,
        "src/sleep.py": SLEEP,
        "src/many_outputs.py": MANY_OUTPUTS,
        "inputs/data.csv": DATA_CSV,
        "README.md": "A tiny training project for AICert's tests.\n",
    }
    for name, content in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(content)
    _git(repo, "add", "--all")
    _git(repo, "commit", "--quiet", "-m", "stdlib-only training")
    _git(repo, "tag", "-a", "v0", "-m", "v0")
    (repo / "src/main.py").write_text(MAIN_V1)
    (repo / "requirements.txt").write_text(REQUIREMENTS_V1)
    _git(repo, "add", "--all")
    _git(repo, "commit", "--quiet", "-m", "use six")
    # Annotated tags: the measured commit must be the tagged commit, not the tag object.
    _git(repo, "tag", "-a", "v1", "-m", "v1")
    # A later commit on the branch: a run at a tag must not pick up the branch head.
    (repo / "README.md").write_text("moved on\n")
    _git(repo, "commit", "--quiet", "-am", "after the tags")
    commits = {tag: _git(repo, "rev-parse", f"{tag}^{{commit}}") for tag in ("v0", "v1")}
    return TrainingRepo(path=repo, commits=commits)


# -- resources -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceFiles:
    base_url: str  # http://127.0.0.1:<port>
    served: dict[str, bytes]  # URL path (no leading /) -> content
    local_file: Path  # for a file:// resource
    local_content: bytes


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def resource_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ResourceFiles]:
    root = tmp_path_factory.mktemp("served")
    served = {
        "init-weights.txt": b"0.0 0.0\n" * 100,
        "labels.txt": b"x,y\nlinear\n",
    }
    for name, content in served.items():
        (root / name).write_bytes(content)
    local_content = b"notes read through file://\n"
    local_file = tmp_path_factory.mktemp("local-resource") / "notes.txt"
    local_file.write_bytes(local_content)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ResourceFiles(
            base_url=f"http://127.0.0.1:{server.server_address[1]}",
            served=served,
            local_file=local_file,
            local_content=local_content,
        )
    finally:
        server.shutdown()
        server.server_close()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- configs ---------------------------------------------------------------------------------


ConfigFactory = Callable[..., dict[str, Any]]


@pytest.fixture(scope="session")
def make_config(training_repo: TrainingRepo) -> ConfigFactory:
    """A run config for the test repository: tag ``v0`` and ``src/main.py`` by default."""

    def make(
        *,
        tag: str = "v0",
        entry: str = "src/main.py",
        resources: list[dict[str, Any]] | None = None,
        env: dict[str, str] | None = None,
        timeout_s: int = 120,
        **extra: Any,
    ) -> dict[str, Any]:
        return {
            "kind": "python",
            "pythonVersion": "3.11",
            "name": "agent-e2e",
            "source": {"type": "git", "gitRepo": str(training_repo.path), "tag": tag},
            "pythonEntryPoint": entry,
            "resources": resources or [],
            "env": {"EPOCHS": "12", **(env or {})},
            "limits": {"cpus": 1, "memory": "256m", "timeoutSeconds": timeout_s},
            **extra,
        }

    return make


# -- machines ----------------------------------------------------------------------------------


@dataclass
class AgentUnderTest:
    """A provisioned local machine, its agent's client, and this run's nonce."""

    provider: LocalProvider
    machine: Machine
    client: AgentClient
    nonce: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def run_id(self) -> str:
        return self.machine.run_id

    @property
    def workspace(self) -> Path:
        path = self.provider.outputs_path(self.machine)
        assert path is not None
        return path

    def start(self, config: dict[str, Any]) -> tuple[list[AppEvent], EnrolledKey]:
        """The AK enrollment (the machine's), then start_run (runtime + config into PCR 14)."""
        enrolled = self.provider.enroll_attestation_key(self.machine, self.client)
        events = self.client.start_run(self.run_id, self.nonce, config)
        return events, enrolled

    def prepare(self, config: dict[str, Any]) -> list[AppEvent]:
        """``start``, then the inputs and the training image: the run ready to train.
        Returns the events of the image step (none without requirements)."""
        self.start(config)
        self.client.measure_inputs(self.run_id)
        return self.client.build_image(self.run_id)

    def train(self) -> tuple[TrainingStatus, list[str]]:
        """Start the job and follow its logs until it ends."""
        lines: list[str] = []
        self.client.start_training(self.run_id)
        status = self.client.follow_training(self.run_id, lines.append, poll_wait_s=2.0)
        return status, lines


Provisioner = Callable[[str], AbstractContextManager[AgentUnderTest]]


@pytest.fixture(scope="session")
def base_image() -> str:
    """The offline Python base image (built on first use, about a minute; then reused)."""
    return ensure_base_image()


@pytest.fixture(scope="session")
def aicert_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("aicert-home")


@pytest.fixture(scope="session")
def local_provider(aicert_home: Path, base_image: str) -> LocalProvider:
    # Shared home: one EK CA and one platform CA for the session, a fresh TPM per run.
    return LocalProvider(aicert_home)


@pytest.fixture(scope="session")
def provision(local_provider: LocalProvider) -> Provisioner:
    """``with provision("label") as agent:`` a fresh machine, torn down on exit."""

    @contextmanager
    def provisioned(label: str) -> Iterator[AgentUnderTest]:
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40]
        run_id = f"t-{slug}-{secrets.token_hex(4)}"
        machine = local_provider.provision(run_id)
        client = AgentClient(machine.agent_url, timeout_s=300.0)
        try:
            client.wait_until_ready(timeout_s=60.0)
            yield AgentUnderTest(local_provider, machine, client)
        finally:
            client.close()
            local_provider.teardown(machine)

    return provisioned


@pytest.fixture
def agent(request: pytest.FixtureRequest, provision: Provisioner) -> Iterator[AgentUnderTest]:
    """A machine of its own for one test (one run per agent)."""
    with provision(request.node.name) as provisioned:
        yield provisioned


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    client.ping()
    yield client
    client.close()
