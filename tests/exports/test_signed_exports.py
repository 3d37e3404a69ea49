"""``aicert export --format model-signing|slsa`` of certificates whose statements the TPM signed,
checked by the ecosystem's own tools: the unmodified ``model_signing verify certificate``
command, and securesystemslib's DSSE envelope verification given the AK certificate.

The certificates are made on a swtpm with a platform-CA-certified AK (``factory.TpmRig``), the
statements signed as the agent signs them; the model folder holds the run's output files. The
same round trip on a certificate of a real agent run (Docker) is in
tests/guest_runtime/agent/test_agent_e2e.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf import json_format
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement as InTotoStatement
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError as SslibVerificationError
from securesystemslib.signer import SSlibKey

from aicert.guest_runtime.tpm import AkAlgorithm
from aicert.model import Certificate
from aicert.signed_statements import ak_keyid
from tests.exports.test_cli import run_export, trust_options
from tests.guest_runtime.test_tpm_signing import run_model_signing
from tests.verification.test_model_signing_format import write_folder
from tests.verification.verify.factory import CertificateFactory, MadeCertificate, TpmRig
from tests.verification.verify.seeds import PLATFORMS, load_seed

pytestmark = [pytest.mark.swtpm]


@dataclass(frozen=True)
class CertificateFiles:
    """A certificate, its platform CA root, and the run's output files, on disk."""

    made: MadeCertificate
    proof: Path
    root: Path
    outputs: Path


def _files(made: MadeCertificate, folder: Path) -> CertificateFiles:
    folder.mkdir()
    proof, root = folder / "proof.json", folder / "platform-ca.pem"
    proof.write_bytes(made.json_bytes())
    root.write_text(made.trust_root_pem)
    outputs = write_folder(folder / "outputs", dict(made.params.outputs))
    return CertificateFiles(made, proof, root, outputs)


@pytest.fixture(scope="module")
def ecc_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CertificateFiles]:
    folder = tmp_path_factory.mktemp("ecc-export")
    rig = TpmRig.create(
        folder / "tpm",
        folder / "ek-ca",
        folder / "ca",
        ak_algorithm=AkAlgorithm.ECC_P256_ECDSA_SHA256,
    )
    try:
        made = CertificateFactory(rig).make_certificate(signed_statements=True)
        yield _files(made, folder / "run")
    finally:
        rig.close()


@pytest.fixture(scope="module")
def rsa_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CertificateFiles]:
    folder = tmp_path_factory.mktemp("rsa-export")
    rig = TpmRig.create(folder / "tpm", folder / "ek-ca", folder / "ca")
    try:
        made = CertificateFactory(rig).make_certificate(signed_statements=True)
        yield _files(made, folder / "run")
    finally:
        rig.close()


def export(files: CertificateFiles, export_format: str, output: Path) -> None:
    result = run_export(
        files.proof,
        "--format",
        export_format,
        "-o",
        output,
        "--trust-root",
        files.root,
        "--allow-dev-platform",
    )
    assert result.exit_code == 0, result.output


def model_copy(files: CertificateFiles, tmp_path: Path) -> Path:
    return Path(shutil.copytree(files.outputs, tmp_path / "model"))


def sslib_key(certificate: Certificate) -> SSlibKey:
    """The AK as securesystemslib sees it: the public key of the AK certificate (leaf)."""
    leaf = certificate.attestation.ak.certificate_chain[0]
    public_key = x509.load_pem_x509_certificate(leaf.encode()).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    # The AK's RSA scheme is RSASSA-PKCS1-v1_5 (securesystemslib's default is PSS).
    scheme = "rsa-pkcs1v15-sha256" if isinstance(public_key, rsa.RSAPublicKey) else None
    return SSlibKey.from_crypto(public_key, keyid=ak_keyid(public_key), scheme=scheme)


# -- model_signing ---------------------------------------------------------------------------


def test_model_signing_accepts_the_exported_bundle(
    ecc_files: CertificateFiles, tmp_path: Path
) -> None:
    model = model_copy(ecc_files, tmp_path)
    export(ecc_files, "model-signing", model / "model.sig")
    result = run_model_signing(model, ecc_files.root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "succeeded" in (result.stdout + result.stderr).lower()


def test_model_signing_refuses_a_changed_output_file(
    ecc_files: CertificateFiles, tmp_path: Path
) -> None:
    model = model_copy(ecc_files, tmp_path)
    export(ecc_files, "model-signing", model / "model.sig")
    (model / "metrics.json").write_bytes(b'{"accuracy": 0.99}\n')
    result = run_model_signing(model, ecc_files.root)
    assert result.returncode != 0
    assert "metrics.json" in result.stdout + result.stderr


def test_an_rsa_ak_has_no_model_signing_bundle(rsa_files: CertificateFiles, tmp_path: Path) -> None:
    output = tmp_path / "model.sig"
    result = run_export(
        rsa_files.proof,
        "-f",
        "model-signing",
        "-o",
        output,
        "--trust-root",
        rsa_files.root,
        "--allow-dev-platform",
    )
    assert result.exit_code == 2, result.output
    assert "no TPM-signed model-signing statement" in result.output
    assert not output.exists()


# -- SLSA provenance, DSSE -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ecc_files", "rsa_files"])
def test_the_slsa_envelope_verifies_with_securesystemslib(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    files: CertificateFiles = request.getfixturevalue(which)
    output = tmp_path / "provenance.intoto.json"
    export(files, "slsa", output)
    envelope = Envelope.from_dict(json.loads(output.read_bytes()))
    key = sslib_key(files.made.certificate)
    assert set(envelope.verify([key], 1)) == {key.keyid}
    statement = json_format.Parse(envelope.payload, statement_pb2.Statement())
    InTotoStatement.copy_from_pb(statement).validate()
    assert statement.predicate_type == "https://slsa.dev/provenance/v1"
    subjects = {s.name: s.digest["sha256"] for s in statement.subject}
    assert subjects == {o.path: o.digest["sha256"] for o in files.made.certificate.outputs}


def test_an_edited_slsa_envelope_does_not_verify(
    ecc_files: CertificateFiles, tmp_path: Path
) -> None:
    output = tmp_path / "provenance.intoto.json"
    export(ecc_files, "slsa", output)
    envelope = Envelope.from_dict(json.loads(output.read_bytes()))
    envelope.payload = envelope.payload.replace(b"tamper-test", b"tamper-tesT")
    with pytest.raises(SslibVerificationError):
        envelope.verify([sslib_key(ecc_files.made.certificate)], 1)


def test_the_unsigned_statement_is_the_signed_one_plus_reference_values(
    ecc_files: CertificateFiles, tmp_path: Path
) -> None:
    signed, unsigned = tmp_path / "signed.json", tmp_path / "statement.json"
    export(ecc_files, "slsa", signed)
    export(ecc_files, "slsa-statement", unsigned)
    payload = Envelope.from_dict(json.loads(signed.read_bytes())).payload
    # A local certificate names no reference values: the two statements are the same bytes.
    assert unsigned.read_bytes() == payload


@pytest.mark.parametrize("export_format", ["model-signing", "slsa"])
def test_a_certificate_without_signed_statements_has_no_signed_export(
    export_format: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    folder = tmp_path_factory.mktemp("unsigned-export")
    rig = TpmRig.create(folder / "tpm", folder / "ek-ca", folder / "ca")
    try:
        files = _files(CertificateFactory(rig).make_certificate(), folder / "run")
    finally:
        rig.close()
    output = tmp_path / "export"
    result = run_export(
        files.proof,
        "-f",
        export_format,
        "-o",
        output,
        "--trust-root",
        files.root,
        "--allow-dev-platform",
    )
    assert result.exit_code == 2, result.output
    assert "carries no TPM-signed" in result.output.replace("\n", "")
    assert not output.exists()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_a_seed_slsa_envelope_verifies(
    platform: Literal["local", "qemu", "azure"], tmp_path: Path
) -> None:
    # The stored seeds, made by the Prefect flow: local and qemu (ECC AK, ECDSA), the Azure double
    # (Microsoft-style RSA AK, RSASSA PKCS#1 v1.5).
    seed = load_seed(platform)
    output = tmp_path / "provenance.intoto.json"
    proof = seed.folder / "proof.json"
    result = run_export(proof, "-f", "slsa", "-o", output, *trust_options(seed))
    assert result.exit_code == 0, result.output
    envelope = Envelope.from_dict(json.loads(output.read_bytes()))
    envelope.verify([sslib_key(seed.certificate)], 1)
    subjects = {s["name"]: s["digest"]["sha256"] for s in json.loads(envelope.payload)["subject"]}
    assert subjects == seed.outputs


def test_the_azure_seed_has_no_model_signing_bundle(tmp_path: Path) -> None:
    seed = load_seed("azure")
    output = tmp_path / "model.sig"
    result = run_export(
        seed.folder / "proof.json", "-f", "model-signing", "-o", output, *trust_options(seed)
    )
    assert result.exit_code == 2, result.output
    assert "no TPM-signed model-signing statement" in result.output.replace("\n", "")
    assert not output.exists()


def test_a_bundle_is_written_only_after_verification(
    ecc_files: CertificateFiles, tmp_path: Path
) -> None:
    output = tmp_path / "model.sig"
    # Without --allow-dev-platform the local certificate does not verify: nothing written.
    result = run_export(
        ecc_files.proof, "-f", "model-signing", "-o", output, "--trust-root", ecc_files.root
    )
    assert result.exit_code == 1, result.output
    assert "PlatformError" in result.output
    assert not output.exists()
