"""The provider's enrolment completes the VM's AK chain, or stops the run naming the issuer.

The "VM" is the real guest agent on a swtpm dressed as an Azure vTPM whose AK certificate is
issued by the "Azure Cloud Virtual TPM CA - 11" -> "CA 2025" -> root hierarchy; its image ships
only the root, as an image built before that hierarchy appeared would. The intermediates are
on a local http server at the certificates' AIA URLs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from aicert.tasks.platforms.azure import AiaResponseError, AkChainIncompleteError, AzureProvider
from aicert.tasks.platforms.base import Machine
from tests.tasks.platforms.azure.fake_arm import FakeArm, StaticTokenCredential, azure_settings_for
from tests.tasks.platforms.azure.guest import LocalAgent, local_azure_agent
from tests.tasks.platforms.azure.hierarchies import CA11, CA2025, AiaCa, AiaServer, aia_server

pytestmark = pytest.mark.swtpm


@pytest.fixture(scope="module")
def server() -> Iterator[AiaServer]:
    with aia_server() as running:
        yield running


@pytest.fixture(scope="module")
def ca(server: AiaServer) -> AiaCa:
    return AiaCa(server)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, ca: AiaCa) -> Iterator[LocalAgent]:
    with local_azure_agent(tmp_path_factory.mktemp("aia-vm"), ca=ca) as served:
        yield served


def _enrol(agent: LocalAgent, ca: AiaCa, home: Path) -> list[str]:
    with FakeArm() as fake:  # enrolment makes no ARM call; the settings need an endpoint
        provider = AzureProvider(
            azure_settings_for(fake),
            credential=StaticTokenCredential(),
            home=home,
            extra_trusted_root_pems=[ca.root.pem],
        )
    machine = Machine(provider="azure", run_id="r", agent_url=agent.url, state_dir=str(home))
    with agent.client() as client:
        return provider.enroll_attestation_key(machine, client).ak_certificate_chain


def test_enrolment_fetches_the_intermediates_through_aia(
    agent: LocalAgent, ca: AiaCa, server: AiaServer, tmp_path: Path
) -> None:
    chain = _enrol(agent, ca, tmp_path)
    subjects = [x509.load_pem_x509_certificate(pem.encode()).subject for pem in chain]
    assert [name.rfc4514_string() for name in subjects[1:3]] == [f"CN={CA11}", f"CN={CA2025}"]
    assert subjects[3] == ca.root.certificate.subject and len(chain) == 4


def test_enrolment_stops_when_the_issuer_cannot_be_fetched(
    agent: LocalAgent, ca: AiaCa, server: AiaServer, tmp_path: Path
) -> None:
    routes = dict(server.routes)
    server.routes.clear()  # the CA's AIA URLs now answer 404
    try:
        with pytest.raises(AiaResponseError, match=rf"AK chain incomplete: no issuer CN={CA11}"):
            _enrol(agent, ca, tmp_path)
    finally:
        server.routes.update(routes)
    assert issubclass(AiaResponseError, AkChainIncompleteError)
