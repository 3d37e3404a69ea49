"""What a remote machine adds to a run, on the local platform's real parts (swtpm, dockerd):

- the TLS channel: the agent measures its key into PCR 14 before serving; the orchestrator
  pins the certificate it sees, certifies the AK and checks a platform quote before it
  sends the run; a TLS-terminating machine-in-the-middle is caught by that check;
- staged inputs: the orchestrator fetches image, source, resources and wheels into a tar the
  agent reads (as the qemu VM reads its inputs disk) and the agent re-derives everything it
  measures: a staged tree that is not the commit's tree is refused;
- the outputs archive: outputs and logs fetched through the API, also after a failed run.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import select
import socket
import ssl
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import aicert
from aicert.appevents import ChannelKeyEvent, interpret, replay
from aicert.flows.assemble import assemble_certificate
from aicert.guest_runtime.api_models import Evidence
from aicert.guest_runtime.channel import (
    ChannelFiles,
    fetch_server_certificate,
    new_channel_identity,
)
from aicert.guest_runtime.config import parse_config
from aicert.guest_runtime.staged_inputs import git_tree_id
from aicert.tasks.platforms.agent_client import AgentCallError, AgentClient, AgentUnreachableError
from aicert.tasks.platforms.attestation import (
    ChannelBindingError,
    MachineAttestationError,
    attest_machine,
)
from aicert.tasks.platforms.base import EnrolledKey, Machine
from aicert.tasks.platforms.local.provider import LocalProvider
from aicert.tasks.platforms.staging import write_staged_inputs
from tests.guest_runtime.agent.conftest import (
    ConfigFactory,
    ResourceFiles,
    TrainingRepo,
    sha256_hex,
)

pytestmark = [pytest.mark.docker, pytest.mark.swtpm, pytest.mark.slow]


@dataclass
class RemoteLike:
    provider: LocalProvider
    machine: Machine  # with the pinned channel certificate
    client: AgentClient
    enrolled: EnrolledKey


@pytest.fixture(scope="module")
def remote_provider(aicert_home: Path, base_image: str) -> LocalProvider:
    return LocalProvider(aicert_home, channel_tls=True, staged_inputs=True)


@contextmanager
def remote_like(
    provider: LocalProvider, label: str, config: dict[str, Any] | None = None
) -> Iterator[RemoteLike]:
    """Stage ``config``'s inputs (if given), start the TLS agent, pin and enroll."""
    run_id = f"t-{re.sub(r'[^a-z0-9]+', '-', label.lower())[:30]}-{secrets.token_hex(4)}"
    if config is not None:
        provider.stage_inputs(run_id, parse_config(config, source="test"))
    machine = provider.provision(run_id)
    try:
        assert machine.agent_url.startswith("https://")
        certificate = _wait_for_certificate(machine.agent_url)
        machine = machine.model_copy(update={"agent_certificate_pem": certificate})
        client = machine.client(timeout_s=300.0)
        try:
            client.wait_until_ready(timeout_s=60.0)
            enrolled = provider.enroll_attestation_key(machine, client)
            yield RemoteLike(provider, machine, client, enrolled)
        finally:
            client.close()
    finally:
        provider.teardown(machine)


def _wait_for_certificate(url: str, timeout_s: float = 60.0) -> str:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fetch_server_certificate(url, timeout_s=2.0)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- the channel ------------------------------------------------------------------------------


def test_plain_http_to_a_tls_agent_and_unpinned_https_are_refused(
    remote_provider: LocalProvider,
) -> None:
    with remote_like(remote_provider, "pinning") as remote:
        with pytest.raises(ValueError, match="pinned channel certificate"):
            AgentClient(remote.machine.agent_url)
        other = new_channel_identity().certificate_pem.decode()
        with AgentClient(remote.machine.agent_url, server_certificate_pem=other) as wrong:
            with pytest.raises(AgentUnreachableError):
                wrong.health()
        plain = remote.machine.agent_url.replace("https://", "http://")
        with AgentClient(plain, timeout_s=5.0) as cleartext:
            with pytest.raises(AgentCallError):
                cleartext.health()


def test_platform_quote_binds_the_pinned_channel_key(remote_provider: LocalProvider) -> None:
    with remote_like(remote_provider, "binding") as remote:
        attestation = attest_machine(remote.machine, remote.client, remote.enrolled, None)
        pinned = ChannelKeyEvent.for_certificate(remote.machine.agent_certificate_pem.encode())
        assert attestation.channel_key_sha256 == pinned.public_key_sha256
        assert attestation.boot_chain is None  # the local platform measures no boot
        # Once a run started, PCR 14 moves on: the same check now refuses the machine.
        remote.client.start_run(remote.machine.run_id, secrets.token_bytes(32), _quote_config())
        with pytest.raises(ChannelBindingError, match="does not hold the channel key"):
            attest_machine(remote.machine, remote.client, remote.enrolled, None)


def test_machine_without_channel_key_is_refused_when_one_is_pinned(
    aicert_home: Path, base_image: str
) -> None:
    # A plain-HTTP agent measured no channel key: claiming one for it must fail.
    provider = LocalProvider(aicert_home)
    machine = provider.provision(f"t-nochannel-{secrets.token_hex(4)}")
    try:
        with machine.client(timeout_s=60.0) as client:
            client.wait_until_ready(timeout_s=60.0)
            enrolled = provider.enroll_attestation_key(machine, client)
            assert attest_machine(machine, client, enrolled).channel_key_sha256 is None
            claimed = machine.model_copy(
                update={"agent_certificate_pem": new_channel_identity().certificate_pem.decode()}
            )
            with pytest.raises(ChannelBindingError):
                attest_machine(claimed, client, enrolled)
    finally:
        provider.teardown(machine)


class TlsRelay:
    """A machine-in-the-middle: terminates TLS with its own key, relays to the agent."""

    def __init__(self, upstream_url: str) -> None:
        host, port = upstream_url.removeprefix("https://").split(":")
        self.upstream = (host, int(port))
        identity = new_channel_identity("not-the-agent")
        self.certificate_pem = identity.certificate_pem.decode()
        self._files = ChannelFiles(identity)
        self._server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_context.load_cert_chain(self._files.certificate, self._files.key)
        self._client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._client_context.check_hostname = False
        self._client_context.verify_mode = ssl.CERT_NONE
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(connection,), daemon=True).start()

    def _relay(self, connection: socket.socket) -> None:
        try:
            downstream = self._server_context.wrap_socket(connection, server_side=True)
            upstream = self._client_context.wrap_socket(socket.create_connection(self.upstream))
        except OSError:
            connection.close()
            return

        # One thread per connection, both directions by select(): an SSL socket must not be
        # read and written from two threads at once.
        ends = [downstream, upstream]
        try:
            while True:
                readable, _, _ = select.select(ends, [], [], 30.0)
                if not readable:
                    return
                for source in readable:
                    sink = upstream if source is downstream else downstream
                    data = source.recv(65536)
                    if not data:
                        return
                    sink.sendall(data)
                    while source.pending():  # decrypted bytes select() cannot see
                        sink.sendall(source.recv(source.pending()))
        except OSError:
            return
        finally:
            for end in ends:
                with contextlib.suppress(OSError):
                    end.close()

    def close(self) -> None:
        self._listener.close()
        self._files.__exit__()


def test_a_tls_machine_in_the_middle_is_caught_before_the_run(
    remote_provider: LocalProvider,
) -> None:
    with remote_like(remote_provider, "mitm") as remote:
        relay = TlsRelay(remote.machine.agent_url)
        try:
            # The orchestrator reaches the relay and pins what it presents (trust on first
            # use); everything works through it, the AK is even genuine...
            pinned = fetch_server_certificate(relay.url)
            intercepted = remote.machine.model_copy(
                update={"agent_url": relay.url, "agent_certificate_pem": pinned}
            )
            with intercepted.client(timeout_s=30.0) as client:
                assert client.health().platform == "local"
                # ... but PCR 14 names the agent's key, not the relay's: refused.
                with pytest.raises(ChannelBindingError):
                    attest_machine(intercepted, client, remote.enrolled)
        finally:
            relay.close()


# -- staged inputs ----------------------------------------------------------------------------


def _quote_config() -> dict[str, Any]:
    return {
        "name": "channel",
        "source": {"gitRepo": "https://invalid.invalid/x.git"},
        "command": ["true"],
    }


@dataclass
class StagedRun:
    remote: RemoteLike
    config: dict[str, Any]
    evidence: Evidence
    downloaded: Path
    downloaded_names: list[str]


@pytest.fixture(scope="module")
def staged_run(
    remote_provider: LocalProvider,
    make_config: ConfigFactory,
    resource_files: ResourceFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StagedRun]:
    weights = resource_files.served["init-weights.txt"]
    config = make_config(
        tag="v1",  # requirements.txt: six, staged as a wheel
        resources=[
            {
                "url": f"{resource_files.base_url}/init-weights.txt",
                "destinationPath": "weights/init.txt",
                "sha256": sha256_hex(weights),
            }
        ],
    )
    with remote_like(remote_provider, "staged", config) as remote:
        client, run_id = remote.client, remote.machine.run_id
        attest_machine(remote.machine, client, remote.enrolled)
        client.start_run(run_id, secrets.token_bytes(32), config)
        client.measure_inputs(run_id)
        client.build_image(run_id)
        client.start_training(run_id)
        status = client.follow_training(run_id, lambda _: None, poll_wait_s=2.0)
        assert status.state == "succeeded", status
        client.measure_outputs(run_id)
        evidence = client.quote(run_id)
        downloaded = tmp_path_factory.mktemp("downloaded")
        names = client.download_archive(run_id, downloaded)
        yield StagedRun(remote, config, evidence, downloaded, names)


def test_staged_run_measures_what_the_agent_derived(
    staged_run: StagedRun, training_repo: TrainingRepo, resource_files: ResourceFiles
) -> None:
    measured = interpret(staged_run.evidence.event_log)
    assert replay(staged_run.evidence.event_log) == {
        14: bytes.fromhex(staged_run.evidence.pcrs["14"]),
        15: bytes.fromhex(staged_run.evidence.pcrs["15"]),
    }
    # The channel key is the first PCR 14 event, then the run.
    assert staged_run.evidence.event_log[0].type == ChannelKeyEvent.TYPE
    pinned = staged_run.remote.machine.agent_certificate_pem
    assert measured.channel_key == ChannelKeyEvent.for_certificate(pinned.encode())
    assert measured.source is not None
    assert measured.source.commit == training_repo.commits["v1"]
    assert measured.source.url == str(training_repo.path)  # as configured, not the disk
    assert [r.sha256 for r in measured.resources] == [
        sha256_hex(resource_files.served["init-weights.txt"])
    ]
    assert [p.name for p in measured.packages] == ["six"]
    assert [i.role for i in measured.images] == ["base", "training"]


def test_staged_run_certificate_verifies_with_the_downloaded_model(
    staged_run: StagedRun, aicert_home: Path
) -> None:
    certificate = assemble_certificate(
        evidence=staged_run.evidence,
        enrolled=staged_run.remote.enrolled,
        project="agent-e2e",
        provider="local",
    )
    root = staged_run.remote.enrolled.trusted_root_pem
    assert root is not None
    report = certificate.verify(
        trusted_roots=[root.encode()],
        allow_dev_platform=True,
        model=staged_run.downloaded / "outputs",
    )
    assert "model" in {check.name for check in report.checks}
    assert report.outputs
    assert "logs/training.log" in staged_run.downloaded_names
    assert any(name.startswith("outputs/") for name in staged_run.downloaded_names)
    loaded = aicert.Certificate.from_json_bytes(certificate.to_json_bytes(), source="memory")
    assert loaded.verify(trusted_roots=[root.encode()], allow_dev_platform=True).run_id == (
        staged_run.remote.machine.run_id
    )


def _rewrite_tar(path: Path, member_name: str, content: bytes) -> None:
    """``path`` with ``member_name``'s content replaced (everything else byte-identical)."""
    rewritten = path.with_suffix(".new")
    with (
        tarfile.open(path) as source,
        tarfile.open(rewritten, "w", format=tarfile.PAX_FORMAT) as out,
    ):
        for member in source:
            data = source.extractfile(member) if member.isfile() else None
            if member.name == member_name:
                member.size = len(content)
                out.addfile(member, io.BytesIO(content))
            else:
                out.addfile(member, data)
    os.replace(rewritten, path)


def test_staged_tree_that_is_not_the_commit_is_refused(
    remote_provider: LocalProvider, make_config: ConfigFactory
) -> None:
    config = make_config(tag="v0")
    run_id = f"t-tampered-tree-{secrets.token_hex(4)}"
    remote_provider.stage_inputs(run_id, parse_config(config, source="test"))
    _rewrite_tar(
        remote_provider.inputs_archive(run_id), "source/tree/src/main.py", b"print('not v0')\n"
    )
    machine = remote_provider.provision(run_id)
    try:
        pinned = machine.model_copy(
            update={"agent_certificate_pem": _wait_for_certificate(machine.agent_url)}
        )
        with pinned.client(timeout_s=120.0) as client:
            client.wait_until_ready(timeout_s=60.0)
            remote_provider.enroll_attestation_key(pinned, client)
            client.start_run(run_id, secrets.token_bytes(32), config)
            with pytest.raises(AgentCallError) as caught:
                client.measure_inputs(run_id)
    finally:
        remote_provider.teardown(machine)
    assert caught.value.kind == "SourceError"
    assert "are not the tree of commit" in str(caught.value)


def test_failed_run_outputs_and_logs_can_be_fetched(
    remote_provider: LocalProvider, make_config: ConfigFactory, tmp_path: Path
) -> None:
    config = make_config(tag="v0", entry="src/fail.py")
    with remote_like(remote_provider, "failed-archive", config) as remote:
        client, run_id = remote.client, remote.machine.run_id
        client.start_run(run_id, secrets.token_bytes(32), config)
        with pytest.raises(AgentCallError, match="step not allowed now"):
            client.download_archive(run_id, tmp_path / "too-early")
        client.measure_inputs(run_id)
        client.build_image(run_id)
        client.start_training(run_id)
        status = client.follow_training(run_id, lambda _: None, poll_wait_s=2.0)
        assert status.state == "failed"
        names = client.download_archive(run_id, tmp_path / "kept")
    assert "logs/training.log" in names
    assert (tmp_path / "kept" / "logs" / "training.log").read_text().strip()


def test_git_tree_id_is_gits_own(training_repo: TrainingRepo, tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    subprocess.run(
        ["git", "clone", "--quiet", "--branch", "v1", str(training_repo.path), str(checkout)],
        check=True,
        capture_output=True,
    )
    # An executable file and a symlink: the modes git records for them.
    (checkout / "run.sh").write_text("#!/bin/sh\n")
    (checkout / "run.sh").chmod(0o755)
    (checkout / "link").symlink_to("README.md")
    subprocess.run(["git", "add", "--all"], cwd=checkout, check=True)
    expected = subprocess.run(
        ["git", "write-tree"], cwd=checkout, check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["rm", "-rf", str(checkout / ".git")], check=True)
    (checkout / "empty-folder").mkdir()  # git records no empty folders
    assert git_tree_id(checkout) == expected
    (checkout / "run.sh").chmod(0o644)  # the mode is part of the tree
    assert git_tree_id(checkout) != expected


def test_staging_names_a_missing_image(make_config: ConfigFactory, tmp_path: Path) -> None:
    from aicert.tasks.platforms.staging import StagingError

    config = parse_config(make_config(image="aicert/no-such-image:none"), source="test")
    with pytest.raises(StagingError, match=r"^image: 'aicert/no-such-image:none'"):
        write_staged_inputs(config, tmp_path / "inputs.tar", run_id="t-missing")
    assert not (tmp_path / "inputs.tar").exists()


def test_machine_used_before_is_refused(remote_provider: LocalProvider) -> None:
    with remote_like(remote_provider, "used") as remote:
        remote.client.start_run(remote.machine.run_id, secrets.token_bytes(32), _quote_config())
        plain = remote.machine.model_copy(update={"agent_certificate_pem": None})
        # Without the channel to compare, PCR 14 is simply not fresh.
        with pytest.raises(MachineAttestationError, match="not in its reset state"):
            attest_machine(plain, remote.client, remote.enrolled)
