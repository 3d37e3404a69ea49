"""The AK binding extension: the platform CA certifies the AK's TPM name, not only its key.

``attestation.ak.public`` (TPMT_PUBLIC) is what the verifier reads the AK's attributes from.
The certificate names only the key, so its attribute bits could be edited; the platform CA
therefore adds the AK's TPM name (which hashes the whole TPMT_PUBLIC, as MakeCredential bound
it) and the SHA-256 of the EK certificate it verified, and the verifier compares both. The
free-text ``platform.description`` is bound by nothing and shown by nothing; Azure's EK
certificate is bound by nothing and neither checked nor shown.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from aicert.chain import AK_BINDING_OID, AkBinding
from aicert.errors import AkMismatchError
from aicert.tpm_structures import parse_tpmt_public
from tests.tasks.platforms.azure.guest import azure_like_ca
from tests.verification.reference_values.eventlogs import REFERENCE_ID, read_log, replayed_pcrs

from .factory import (
    CertificateFactory,
    MadeCertificate,
    TpmRig,
    ak_binding_for,
    b64,
    flip_bit_b64,
    issue_ak_certificate,
    tampered,
    unb64,
)
from .test_cli import AICERT

pytestmark = [pytest.mark.swtpm]

OID = AK_BINDING_OID.dotted_string
NO_DA = 0x00000400  # TPMA_OBJECT.noDA: not one of the bits the restricted-signing check reads


def leaf_of(made: MadeCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(
        made.certificate.attestation.ak.certificate_chain[0].encode()
    )


def with_leaf(made: MadeCertificate, leaf_pem: str) -> MadeCertificate:
    def mutate(document: dict[str, Any]) -> None:
        document["attestation"]["ak"]["certificate_chain"][0] = leaf_pem

    return tampered(made, mutate)


def rig_ak_key(rig: TpmRig) -> Any:
    return parse_tpmt_public(rig.ak.public_bytes).to_cryptography_key()


def test_the_platform_ca_binds_the_ak_name_and_the_ek_certificate(
    base: MadeCertificate, rig: TpmRig
) -> None:
    binding = AkBinding.of(leaf_of(base))
    assert binding is not None
    extension = leaf_of(base).extensions.get_extension_for_oid(AK_BINDING_OID)
    assert not extension.critical
    assert OID.startswith("2.25.")
    assert binding.ak_name == parse_tpmt_public(rig.ak.public_bytes).name()
    ek_der = x509.load_pem_x509_certificate(rig.ek_certificate_pem.encode()).public_bytes(
        Encoding.DER
    )
    assert binding.ek_certificate_sha256 == hashlib.sha256(ek_der).digest()
    usage = leaf_of(base).extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    report = base.verify()
    (detail,) = [c.detail for c in report.checks if c.name == "ak-public-key"]
    assert f"AK binding extension {OID}" in detail
    assert "the EK certificate is the one the platform CA verified" in detail


def test_an_edited_attribute_bit_of_ak_public_is_refused(base: MadeCertificate) -> None:
    """Same key, so the certificate still matches it; same restricted-signing bits, so that
    check passes; the quote still verifies with the key. Only the name differs."""
    public = unb64(base.as_dict()["attestation"]["ak"]["public"])
    attributes = int.from_bytes(public[4:8], "big")
    edited = flip_bit_b64(b64(public), 6, 2)  # byte 6 bit 2: 0x00000400 of objectAttributes
    assert int.from_bytes(unb64(edited)[4:8], "big") == attributes ^ NO_DA
    forged = tampered(base, lambda d: d["attestation"]["ak"].update(public=edited))
    with pytest.raises(AkMismatchError, match=rf"TPM name of attestation.ak.public .*{OID}"):
        forged.verify()


def test_an_ak_certificate_without_the_extension_is_refused(
    base: MadeCertificate, rig: TpmRig
) -> None:
    """A certificate from the trusted platform CA, for the right key, without the binding."""
    leaf = issue_ak_certificate(rig.ca_dir, rig_ak_key(rig))
    with pytest.raises(AkMismatchError, match=rf"lacks the AK binding extension {OID}"):
        with_leaf(base, leaf).verify()


def test_an_ak_certificate_naming_another_ak_is_refused(
    base: MadeCertificate, rig: TpmRig, other_rig: TpmRig
) -> None:
    binding = ak_binding_for(other_rig.ak.public_bytes, rig.ek_certificate_pem)
    leaf = issue_ak_certificate(rig.ca_dir, rig_ak_key(rig), binding=binding)
    with pytest.raises(AkMismatchError, match=r"is not the one the AK binding extension"):
        with_leaf(base, leaf).verify()


@pytest.mark.parametrize(
    "value",
    [b"", b"\x04\x02ab", b"\x30\x03\x04\x01a", b"\x30\x04\x04\x02\x00\x0b\x04\x00"],
)
def test_a_malformed_extension_is_refused(base: MadeCertificate, rig: TpmRig, value: bytes) -> None:
    extension = x509.UnrecognizedExtension(AK_BINDING_OID, value)
    leaf = issue_ak_certificate(rig.ca_dir, rig_ak_key(rig), binding=extension)
    with pytest.raises(AkMismatchError, match=rf"AK binding extension {OID}: AK binding: "):
        with_leaf(base, leaf).verify()


def test_binding_round_trips_and_refuses_weak_names() -> None:
    name = b"\x00\x0b" + bytes(32)
    binding = AkBinding(ak_name=name, ek_certificate_sha256=bytes(32))
    assert AkBinding.from_der(binding.to_der()) == binding
    with pytest.raises(ValueError, match="not SHA-2"):
        AkBinding(ak_name=b"\x00\x04" + bytes(20), ek_certificate_sha256=bytes(32))
    with pytest.raises(ValueError, match=r"not one DER SEQUENCE"):
        AkBinding.from_der(binding.to_der() + b"\x00")


# -- the EK certificate ------------------------------------------------------------------------


def test_another_ek_certificate_is_refused(base: MadeCertificate, other_rig: TpmRig) -> None:
    forged = tampered(
        base, lambda d: d["attestation"]["ek"].update(certificate=other_rig.ek_certificate_pem)
    )
    with pytest.raises(
        AkMismatchError, match=r"attestation.ek.certificate .* is not the EK certificate"
    ):
        forged.verify()


def test_a_stripped_ek_certificate_is_refused(base: MadeCertificate) -> None:
    """The binding names the EK certificate the platform CA verified: without it, the
    certificate would verify with another report, so it does not verify."""
    forged = tampered(base, lambda d: d["attestation"]["ek"].update(certificate=None))
    with pytest.raises(AkMismatchError, match=r"attestation.ek.certificate is missing"):
        forged.verify()


# -- platform.description: bound by nothing, shown by nothing ----------------------------------

CLAIM = "Azure Confidential VM, 8x H100, audited by ACME"


def test_platform_description_is_not_shown_by_the_report_or_the_cli(
    base: MadeCertificate, tmp_path: Path
) -> None:
    forged = tampered(base, lambda d: d["platform"].update(description=CLAIM))
    report = forged.verify()
    assert CLAIM not in json.dumps(report.to_dict())
    proof = forged.certificate.write(tmp_path / "proof.json")
    root = tmp_path / "root.pem"
    root.write_text(base.trust_root_pem)
    env = {"PATH": str(AICERT.parent), "COLUMNS": "250", "NO_COLOR": "1"}
    for args in (
        ["verify", proof, "--trust-root", root, "--allow-dev-platform"],
        ["verify", proof, "--trust-root", root, "--allow-dev-platform", "--json"],
        ["inspect", proof],
    ):
        shown = subprocess.run(
            [str(AICERT), *map(str, args)], capture_output=True, text=True, timeout=60, env=env
        )
        assert shown.returncode == 0, shown.stderr
        assert "Confidential" not in shown.stdout + shown.stderr, args


# -- Azure: Microsoft's AK certificate carries no binding --------------------------------------


@pytest.fixture(scope="module")
def azure_like(factory: CertificateFactory, rig: TpmRig) -> tuple[MadeCertificate, str]:
    """An Azure-double certificate whose AK chain is shaped like Microsoft's (no binding)."""
    ca = azure_like_ca()
    chain = ca.issue(rig_ak_key(rig))
    made = factory.make_certificate(
        platform="azure", boot_event_log=read_log(), reference_values=REFERENCE_ID
    )
    pems = [chain.leaf_pem, chain.intermediate.pem]
    return tampered(made, lambda d: d["attestation"]["ak"].update(certificate_chain=pems)), (
        chain.root.pem
    )


def _azure_reference() -> Any:
    from aicert.reference_values import derive_azure_reference_values
    from tests.verification.reference_values.eventlogs import IMAGE_VERSION_ID

    return derive_azure_reference_values(
        read_log(),
        replayed_pcrs(read_log()),
        image_version_id=IMAGE_VERSION_ID,
        reference_id=REFERENCE_ID,
    )


def test_azure_ak_attributes_are_said_to_be_microsofts_and_the_ek_is_not_shown(
    azure_like: tuple[MadeCertificate, str], other_rig: TpmRig
) -> None:
    made, root = azure_like
    assert AkBinding.of(leaf_of(made)) is None
    reference = _azure_reference()
    report = made.verify(trusted_roots=[root], reference_values=[reference])
    (detail,) = [c.detail for c in report.checks if c.name == "ak-public-key"]
    assert "Microsoft's provisioning" in detail
    assert "attestation.ek.certificate is bound by nothing and not checked" in detail
    # Another EK certificate changes nothing the report says: it is not shown as a fact.
    forged = tampered(
        made, lambda d: d["attestation"]["ek"].update(certificate=other_rig.ek_certificate_pem)
    )
    other = forged.verify(trusted_roots=[root], reference_values=[reference])
    assert other.to_dict() | {"verified_at_time": None} == report.to_dict() | {
        "verified_at_time": None
    }
    ek_body = other_rig.ek_certificate_pem.splitlines()[1]
    assert ek_body not in json.dumps(other.to_dict())
    assert base64.b64decode(ek_body)  # the line is certificate content, not a header
