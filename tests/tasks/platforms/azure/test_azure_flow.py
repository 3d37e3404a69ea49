"""The azure provider against a local ARM, the VM played by the real guest agent on a swtpm
dressed as an Azure vTPM; and the provider's reference-value settings.

Not a run on Azure: ``FakeArm`` answers the provider's ARM calls on 127.0.0.1 (its public IP
address is 127.0.0.1), and the "VM" is ``python -m aicert.guest_runtime.server --platform
azure --tls`` on a swtpm holding an AK at 0x81000003 and an Azure-shaped certificate
(generated, not Microsoft's) in NV 0x01C101D0. What is real: the azure SDK clients and their
HTTP, the provider's provisioning, agent wait (pinning the agent's TLS certificate) and
teardown, the machine record a crash hook reads, and the agent's HTTPS API. The whole
``certify-training`` flow on this platform is in ``test_azure_certify_flow.py``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aicert.tasks.platforms.azure import (
    AICERT_RUN_TAG,
    AzureProvider,
    AzureReferenceValuesError,
    AzureResourceNames,
)
from aicert.tasks.platforms.base import Machine
from tests import REPO_ROOT
from tests.tasks.platforms.azure.fake_arm import (
    RUN_CREATIONS,
    RUN_DELETIONS,
    TEST_IMAGE_ID,
    FakeArm,
    StaticTokenCredential,
    azure_settings_for,
)
from tests.tasks.platforms.azure.guest import (
    REFERENCE_ID,
    AzureLikeCa,
    LocalAgent,
    azure_like_ca,
    derived_reference_values,
    local_azure_agent,
)

pytestmark = pytest.mark.swtpm


@pytest.fixture(scope="module")
def ca() -> AzureLikeCa:
    return azure_like_ca()


@pytest.fixture(scope="module")
def azure_vm(tmp_path_factory: pytest.TempPathFactory, ca: AzureLikeCa) -> Iterator[LocalAgent]:
    workdir = tmp_path_factory.mktemp("azure-vm")
    with local_azure_agent(workdir, ca=ca, tls=True) as agent:
        yield agent


def test_provision_reach_the_agent_and_tear_down(
    azure_vm: LocalAgent, ca: AzureLikeCa, tmp_path: Path
) -> None:
    run_id = "azure-demo-20250101T000000Z-cafe0001"
    names = AzureResourceNames.for_run(run_id)
    with FakeArm() as fake:
        settings = azure_settings_for(fake, agent_port=azure_vm.port)
        provider = AzureProvider(
            settings,
            credential=StaticTokenCredential(),
            home=tmp_path,
            extra_trusted_root_pems=[ca.root.pem],
        )
        machine = provider.provision(run_id)
        try:
            # The agent serves HTTPS; the provider pinned the certificate it presents.
            assert machine.agent_url == azure_vm.url.replace("http://", "https://")
            assert machine.agent_url.startswith("https://")
            assert machine.agent_certificate_pem == azure_vm.certificate_pem
            assert Path(machine.state_dir) == tmp_path / "runs" / run_id
            with machine.client() as client:
                health = client.health()
            assert health.platform == "azure"
            assert health.busy_run_id is None
            assert {r["tags"][AICERT_RUN_TAG] for r in fake.resources()} == {run_id}
            # No reference-value set configured: none is checked, none is named.
            assert provider.boot_reference() is None
            assert provider.reference_values() is None
        finally:
            # As the flow's crash hook does: rebuild the provider from the saved record.
            record = Machine.model_validate_json(machine.model_dump_json())
            AzureProvider.for_machine(record, credential=StaticTokenCredential()).teardown(record)

        assert fake.resources() == []
        timeline = [
            (r.method, r.type_name or r.path.rsplit("/", 1)[-1])
            for r in fake.requests
            if r.response_status < 300 and "/operations/" not in r.path
        ]
    created = [(m, t) for m, t in timeline if m in ("PUT", "PATCH")]
    assert created == list(RUN_CREATIONS)
    deleted = [t for m, t in timeline if m == "DELETE"]
    assert deleted == list(RUN_DELETIONS)
    # The listing by the run's tag happens before the deletions.
    listing = timeline.index(("GET", "resources"))
    assert listing < timeline.index(("DELETE", "virtualMachines"))
    assert names.vm in machine.details["names"].values()


# -- reference values ---------------------------------------------------------------------------


def _reference_file(folder: Path, image_version_id: str = TEST_IMAGE_ID, **options: Any) -> Path:
    return derived_reference_values(folder, image_version_id, **options)


def test_boot_reference_is_the_configured_set_and_names_the_certificate(tmp_path: Path) -> None:
    path = _reference_file(tmp_path)
    with FakeArm() as fake:
        provider = AzureProvider(
            azure_settings_for(fake, reference_values=str(path)),
            credential=StaticTokenCredential(),
            home=tmp_path,
        )
        reference = provider.boot_reference()
    assert reference is not None and reference.platform == "azure"
    assert reference.image.gallery_image_version_id == TEST_IMAGE_ID
    assert provider.reference_values() == REFERENCE_ID


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),
        ("{not json", "invalid"),
        ("other-image", "is for image version"),
        ("confidential", "is for ConfidentialVM VMs"),
        ("qemu", "invalid"),
    ],
)
def test_a_bad_reference_value_set_fails_before_any_resource_exists(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "reference-values.json"
    if content == "{not json":
        path.write_text(content)
    elif content == "other-image":
        _reference_file(tmp_path, TEST_IMAGE_ID.replace("/versions/1.0.0", "/versions/0.9.0"))
    elif content == "confidential":
        _reference_file(tmp_path, security_type="ConfidentialVM")
    elif content == "qemu":
        document = json.loads(_reference_file(tmp_path).read_text())
        path.write_text(json.dumps({**document, "platform": "qemu"}))
    with FakeArm() as fake:
        provider = AzureProvider(
            azure_settings_for(fake, reference_values=str(path)),
            credential=StaticTokenCredential(),
            home=tmp_path,
        )
        with pytest.raises(AzureReferenceValuesError, match="reference_values") as failure:
            provider.provision("azure-demo-20250101T000000Z-cafe0002")
        assert fake.requests == []
    assert expected in str(failure.value)
    assert not (tmp_path / "runs").exists()


# -- the image's agent unit ---------------------------------------------------------------------


def test_the_image_unit_serves_tls_and_hands_the_agent_the_boot_log() -> None:
    """cloud-init's unit runs the agent as the provider expects (HTTPS, key measured first) and
    gives it a readable copy of the root-only securityfs boot log; every flag it passes is one
    the agent knows."""
    recipe = yaml.safe_load((REPO_ROOT / "deployments" / "azure" / "cloud-init.yaml").read_text())
    (unit,) = [
        item["content"]
        for item in recipe["write_files"]
        if item["path"] == "/etc/systemd/system/aicert-agent.service"
    ]
    directives: dict[str, str] = {}
    for line in unit.replace("\\\n", " ").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            directives[key.strip()] = " ".join(value.split())
    copy = shlex.split(directives["ExecStartPre"])
    assert copy[0] == "+/usr/bin/install"  # "+": as root, which alone reads securityfs
    assert copy[-2:] == [
        "/sys/kernel/security/tpm0/binary_bios_measurements",
        "/run/aicert/binary_bios_measurements",
    ]
    assert directives["RuntimeDirectory"] == "aicert"
    command = shlex.split(directives["ExecStart"])
    assert command[1:3] == ["-m", "aicert.guest_runtime.server"]
    assert "--tls" in command
    assert command[command.index("--platform") + 1] == "azure"
    assert command[command.index("--boot-event-log") + 1] == "/run/aicert/binary_bios_measurements"
    assert command[command.index("--port") + 1] == "8700"
    usage = subprocess.run(
        [sys.executable, "-m", "aicert.guest_runtime.server", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    known = set(re.findall(r"--[a-z][a-z-]*", usage))
    assert {flag for flag in command if flag.startswith("--")} <= known
