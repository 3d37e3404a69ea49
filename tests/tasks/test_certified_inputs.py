"""The orchestrator's side of a certified input: the parent certificate verified with the
run's trust policy and the resource pinned to its certified output, before the run starts.

Parents are real certificates (a swtpm quote, an AK certified by a platform CA), made by the
verifier tests' factory.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aicert.guest_runtime.config import RunConfig, load_config, resolve_certificate_paths
from aicert.lineage import certificate_sha256
from aicert.tasks.certified_inputs import CertifiedInputError, resolve_certified_inputs
from tests.verification.verify.factory import (
    DEFAULT_OUTPUTS,
    CertificateFactory,
    MadeCertificate,
    TpmRig,
    sha256_hex,
)

CONFIG = """\
kind: python
source:
  type: git
  gitRepo: https://example.invalid/finetune.git
  tag: v1.0
resources:
  - url: https://models.example.org/pretrain/weights.bin
    destinationPath: base/weights.bin
{pin}    certifiedBy:
      certificate: runs/pretrain.proof.json
      output: {output}
"""


@pytest.fixture(scope="module")
def rigs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TpmRig, TpmRig]]:
    work = tmp_path_factory.mktemp("certified-inputs")
    trusted = TpmRig.create(work / "tpm-a", work / "ek-ca", work / "platform-ca")
    untrusted = TpmRig.create(work / "tpm-b", work / "ek-ca", work / "other-ca")
    try:
        yield trusted, untrusted
    finally:
        trusted.close()
        untrusted.close()


@pytest.fixture(scope="module")
def parent(rigs: tuple[TpmRig, TpmRig]) -> MadeCertificate:
    return CertificateFactory(rigs[0]).make_certificate()


def child_config(
    tmp_path: Path, parent: MadeCertificate, *, output: str = "model/weights.bin", pin: str = ""
) -> RunConfig:
    parent.certificate.write(tmp_path / "runs" / "pretrain.proof.json")
    path = tmp_path / "aicert.yaml"
    pin_line = f"    sha256: {pin}\n" if pin else ""
    path.write_text(CONFIG.format(output=output, pin=pin_line))
    return resolve_certificate_paths(load_config(path), tmp_path)


def resolve(config: RunConfig, parent: MadeCertificate) -> RunConfig:
    return resolve_certified_inputs(
        config, trusted_roots=[parent.trust_root_pem], allow_dev_platform=True
    )


def test_parent_verified_and_resource_pinned(tmp_path: Path, parent: MadeCertificate) -> None:
    resolved = resolve(child_config(tmp_path, parent), parent)
    resource = resolved.resources[0]
    assert resource.sha256 == sha256_hex(DEFAULT_OUTPUTS["model/weights.bin"])
    link = resource.certified_by
    assert link is not None and link.resolved
    assert link.certificate_sha256 == certificate_sha256(parent.certificate)
    assert link.run_id == parent.certificate.run.id
    # the resolved link is what the agent receives and measures
    assert resolved.measured_form()["resources"][0]["certifiedBy"]["runId"] == link.run_id


def test_parent_from_an_untrusted_root_stops_the_run(
    tmp_path: Path, parent: MadeCertificate, rigs: tuple[TpmRig, TpmRig]
) -> None:
    foreign = CertificateFactory(rigs[1]).make_certificate()
    config = child_config(tmp_path, foreign)
    with pytest.raises(CertifiedInputError, match="CertificateChainError") as caught:
        resolve(config, parent)  # the run trusts the first platform CA only
    assert "resources[base/weights.bin]" in str(caught.value)


def test_local_parent_refused_without_the_dev_platform_policy(
    tmp_path: Path, parent: MadeCertificate
) -> None:
    config = child_config(tmp_path, parent)
    with pytest.raises(CertifiedInputError, match="PlatformError"):
        resolve_certified_inputs(
            config, trusted_roots=[parent.trust_root_pem], allow_dev_platform=False
        )


def test_output_the_parent_does_not_certify_stops_the_run(
    tmp_path: Path, parent: MadeCertificate
) -> None:
    config = child_config(tmp_path, parent, output="model/other.bin")
    with pytest.raises(CertifiedInputError, match=r"certifies no output model/other\.bin"):
        resolve(config, parent)


def test_pin_that_differs_from_the_certified_output_stops_the_run(
    tmp_path: Path, parent: MadeCertificate
) -> None:
    config = child_config(tmp_path, parent, pin="ab" * 32)
    with pytest.raises(CertifiedInputError, match="the config pins sha256"):
        resolve(config, parent)


def test_edited_parent_stops_the_run(tmp_path: Path, parent: MadeCertificate) -> None:
    config = child_config(tmp_path, parent)
    path = tmp_path / "runs" / "pretrain.proof.json"
    path.write_text(path.read_text().replace('"exit_code": 0', '"exit_code": 1', 1))
    with pytest.raises(CertifiedInputError, match="does not verify"):
        resolve(config, parent)


def test_missing_parent_file_stops_the_run(tmp_path: Path, parent: MadeCertificate) -> None:
    config = child_config(tmp_path, parent)
    (tmp_path / "runs" / "pretrain.proof.json").unlink()
    with pytest.raises(CertifiedInputError, match="cannot read it"):
        resolve(config, parent)


def test_parent_fetched_over_http(tmp_path: Path, parent: MadeCertificate) -> None:
    served = tmp_path / "served"
    parent.certificate.write(served / "pretrain.proof.json")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/pretrain.proof.json"
        config = child_config(tmp_path, parent)
        resource = config.resources[0]
        assert resource.certified_by is not None
        link = resource.certified_by.model_copy(update={"certificate": url})
        config = config.model_copy(
            update={"resources": [resource.model_copy(update={"certified_by": link})]}
        )
        resolved = resolve(config, parent).resources[0].certified_by
        assert resolved is not None and resolved.run_id == parent.certificate.run.id
        missing = link.model_copy(update={"certificate": url.replace("pretrain", "absent")})
        absent = config.model_copy(
            update={"resources": [resource.model_copy(update={"certified_by": missing})]}
        )
        with pytest.raises(CertifiedInputError, match="cannot read it"):
            resolve(absent, parent)
    finally:
        server.shutdown()
        server.server_close()
