"""The training container sandbox, on the real Docker engine."""

from __future__ import annotations

import inspect
import json
import textwrap
import time
from pathlib import Path

import pytest

from aicert.guest_runtime.container import (
    ContainerError,
    ContainerResult,
    _LineSplitter,
    run_training_container,
)
from aicert.guest_runtime.wheelhouse import resolve_wheelhouse
from aicert.tasks.platforms.base_image import DEFAULT_MIRROR, ensure_base_image, find_debian_mirror

from .conftest import containers_with_run_label, sandbox


def run_python(
    image: str,
    workspace: dict[str, Path],
    script: str,
    *,
    name: str,
    timeout_s: float = 60,
    log_path: Path | None = None,
) -> tuple[ContainerResult, list[str]]:
    (workspace["src"] / "job.py").write_text(textwrap.dedent(script), encoding="utf-8")
    lines: list[str] = []
    result = run_training_container(
        sandbox(
            image,
            workspace,
            ["python3", "job.py"],
            cpu_limit=1.0,
            memory_limit="512m",
            timeout_s=timeout_s,
            name=name,
            log_path=log_path,
        ),
        lines.append,
    )
    return result, lines


def test_job_writes_outputs_and_logs_stream_in_order(
    base_image: str, workspace: dict[str, Path], run_name: str, tmp_path: Path
) -> None:
    (workspace["resources"] / "data.txt").write_text("resource data", encoding="utf-8")
    log_path = tmp_path / "logs" / "train.log"
    result, lines = run_python(
        base_image,
        workspace,
        """
        import sys, time
        data = open("/workspace/resources/data.txt").read()
        with open("/workspace/outputs/model.bin", "w") as f:
            f.write("weights from " + data)
        for i in range(5):
            print(f"step {i}")
            print(f"warn {i}", file=sys.stderr)
            time.sleep(0.05)
        sys.stdout.write("no trailing newline")
        """,
        name=run_name,
        log_path=log_path,
    )
    assert result.exit_code == 0
    assert not result.timed_out
    assert result.image_id.startswith("sha256:")
    assert (workspace["outputs"] / "model.bin").read_text() == "weights from resource data"
    # stdout and stderr are separate pipes: lines written microseconds apart on the two may
    # arrive in either order, lines 50 ms apart arrive in order.
    assert len(lines) == 11
    for i in range(5):
        assert sorted(lines[2 * i : 2 * i + 2]) == [f"step {i}", f"warn {i}"]
    assert lines[-1] == "no trailing newline"
    assert log_path.read_text(encoding="utf-8").splitlines() == lines
    assert result.started_at <= result.finished_at
    assert 250 <= result.duration_ms < 30_000


def test_non_zero_exit_is_a_result_not_an_exception(
    base_image: str, workspace: dict[str, Path], run_name: str
) -> None:
    result, lines = run_python(
        base_image, workspace, "import sys\nprint('failing')\nsys.exit(7)\n", name=run_name
    )
    assert result.exit_code == 7
    assert not result.timed_out
    assert lines == ["failing"]


SANDBOX_PROBE = """
import json, os, socket

def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return f"refused: {exc}"

def write(path):
    def action():
        with open(path, "w") as f:
            f.write("x")
    return action

def status_fields(*names):
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {name: fields[name].strip() for name in names}

report = {
    "uid": os.getuid(),
    "gid": os.getgid(),
    "connect": attempt(lambda: socket.create_connection(("1.1.1.1", 53), timeout=3).close()),
    "dns": attempt(lambda: socket.getaddrinfo("pypi.org", 443)),
    "interfaces": [name for _, name in socket.if_nameindex()],
    "tpm": [p for p in ("/dev/tpm0", "/dev/tpmrm0") if os.path.exists(p)],
    "docker_socket": [
        p for p in ("/var/run/docker.sock", "/run/docker.sock") if os.path.exists(p)
    ],
    "write_src": attempt(write("/workspace/src/new.py")),
    "write_resources": attempt(write("/workspace/resources/new.bin")),
    "write_root_fs": attempt(write("/etc/evil")),
    "write_tmp": attempt(write("/tmp/scratch")),
    "write_outputs": attempt(write("/workspace/outputs/ok")),
    **status_fields("CapEff", "NoNewPrivs"),
}
print(json.dumps(report))
"""


def test_sandbox_has_no_network_tpm_docker_socket_root_or_writable_inputs(
    base_image: str, workspace: dict[str, Path], run_name: str
) -> None:
    (workspace["resources"] / "data.bin").write_bytes(b"data")
    result, lines = run_python(base_image, workspace, SANDBOX_PROBE, name=run_name)
    assert result.exit_code == 0, lines
    report = json.loads(lines[-1])
    assert report["uid"] == 1000
    assert report["gid"] == 1000
    assert report["connect"].startswith("refused"), report["connect"]
    assert report["dns"].startswith("refused"), report["dns"]
    assert report["interfaces"] == ["lo"]
    assert report["tpm"] == []
    assert report["docker_socket"] == []
    assert "Read-only file system" in report["write_src"]
    assert "Read-only file system" in report["write_resources"]
    assert "Read-only file system" in report["write_root_fs"]
    assert report["write_tmp"] == "ok"
    assert report["write_outputs"] == "ok"
    assert int(report["CapEff"], 16) == 0
    assert report["NoNewPrivs"] == "1"
    assert not (workspace["src"] / "new.py").exists()


def test_timeout_kills_the_job(base_image: str, workspace: dict[str, Path], run_name: str) -> None:
    (workspace["src"] / "placeholder").write_text("", encoding="utf-8")
    lines: list[str] = []
    started = time.monotonic()
    result = run_training_container(
        sandbox(
            base_image,
            workspace,
            ["sh", "-c", "echo started; sleep 60"],
            timeout_s=2,
            name=run_name,
        ),
        lines.append,
    )
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert result.exit_code != 0
    assert lines == ["started"]
    assert elapsed < 20
    assert containers_with_run_label(run_name) == []


def test_missing_image_is_a_container_error(workspace: dict[str, Path], run_name: str) -> None:
    with pytest.raises(ContainerError, match="not found"):
        run_training_container(
            sandbox(
                "aicert/does-not-exist:never",
                workspace,
                ["true"],
                timeout_s=10,
                name=run_name,
            ),
            print,
        )


def test_exception_in_start_still_removes_container(
    base_image: str, workspace: dict[str, Path], run_name: str
) -> None:
    # A command that does not exist fails at start (OCI runtime error): the created container
    # must still be removed.
    with pytest.raises(ContainerError, match="start"):
        run_training_container(
            sandbox(
                base_image,
                workspace,
                ["/no/such/binary"],
                timeout_s=10,
                name=run_name,
            ),
            print,
        )


def test_outputs_folder_symlink_refused(
    base_image: str, workspace: dict[str, Path], run_name: str, tmp_path: Path
) -> None:
    link = tmp_path / "outputs-link"
    link.symlink_to(workspace["outputs"], target_is_directory=True)
    with pytest.raises(ContainerError, match="symlink"):
        run_training_container(
            sandbox(
                base_image,
                workspace,
                ["true"],
                outputs_dir=link,
                timeout_s=10,
                name=run_name,
            ),
            print,
        )


def test_line_splitter_handles_split_chunks_crlf_and_carriage_returns() -> None:
    lines: list[bytes] = []
    splitter = _LineSplitter(lines.append)
    for chunk in (b"ab", b"c\nde", b"f\r", b"\n", b"10%\r20%\r", b"caf\xc3", b"\xa9\n", b"end"):
        splitter.feed(chunk)
    splitter.close()
    assert lines == [b"abc", b"def", b"10%", b"20%", b"caf\xc3\xa9", b"end"]


LIMITS_PROBE = """
import json, os

def read(*paths):
    for path in paths:
        if os.path.exists(path):
            return open(path).read().strip()
    return None

print(json.dumps({
    "memory": read("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"),
    "cpu_quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu.max"),
    "pids": read("/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids.max"),
}))
"""


def test_resource_limits_applied(
    base_image: str, workspace: dict[str, Path], run_name: str
) -> None:
    (workspace["src"] / "job.py").write_text(LIMITS_PROBE, encoding="utf-8")
    lines: list[str] = []
    result = run_training_container(
        sandbox(
            base_image,
            workspace,
            ["python3", "job.py"],
            cpu_limit=0.5,
            memory_limit="256m",
            timeout_s=60,
            name=run_name,
            pids_limit=321,
        ),
        lines.append,
    )
    assert result.exit_code == 0, lines
    limits = json.loads(lines[-1])
    assert limits["memory"] == str(256 * 1024 * 1024)
    # cgroup v1 gives the quota alone (period 100000 us), v2 "quota period".
    assert limits["cpu_quota"].split()[0] == "50000"
    assert limits["pids"] == "321"


def test_base_image_is_reused_not_rebuilt(base_image: str) -> None:
    started = time.monotonic()
    assert ensure_base_image() == base_image
    assert time.monotonic() - started < 10


def test_base_image_python_matches_wheelhouse_target(
    base_image: str, workspace: dict[str, Path], run_name: str
) -> None:
    lines: list[str] = []
    result = run_training_container(
        sandbox(
            base_image,
            workspace,
            ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            timeout_s=60,
            name=run_name,
        ),
        lines.append,
    )
    assert result.exit_code == 0
    assert lines == [inspect.signature(resolve_wheelhouse).parameters["python_version"].default]


def test_debian_mirror_found_in_deb822_and_one_line_sources(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\n"
        "# a comment\n"
        "URIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "\n"
        "Types: deb deb-src\n"
        "URIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main\n",
        encoding="utf-8",
    )
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://list.example/debian bookworm main\n",
        encoding="utf-8",
    )
    assert find_debian_mirror((deb822, one_line)) == "http://mirror.example/debian"
    assert find_debian_mirror((tmp_path / "missing.sources", one_line)) == (
        "http://list.example/debian"
    )
    assert find_debian_mirror((tmp_path / "missing.sources",)) == DEFAULT_MIRROR


def test_unreachable_docker_engine_is_a_container_error(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(ContainerError, match="not reachable"):
        run_training_container(
            sandbox(
                "aicert/python-base:bookworm",
                workspace,
                ["true"],
                timeout_s=10,
            ),
            print,
        )
