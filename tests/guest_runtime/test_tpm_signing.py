"""The AK signs external data through a TPM hash sequence, and an OpenSSF model_signing bundle
that the unmodified ``model_signing`` command accepts, on a real swtpm.

The AK is certified the way the local platform certifies it (``PlatformCA`` after
MakeCredential / ActivateCredential against the swtpm's EK certificate), so the bundle's chain
is the one a certified run would carry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_ALG, TPM2_RC
from tpm2_pytss.types import TPMT_SIG_SCHEME

from aicert.guest_runtime.tpm import AkAlgorithm, AttestationKey, Tpm, TpmError
from aicert.guest_runtime.tpm_signing import SEQUENCE_CHUNK_SIZE, tpm_sign
from aicert.hashing import hash_tree
from aicert.model_signing_format import model_signing_bundle, model_statement
from aicert.tasks.platforms.platform_ca import PlatformCA, parse_tpmt_public, public_key_of
from aicert.tasks.platforms.swtpm import LocalSwtpm
from tests.verification.test_model_signing_format import write_folder

pytestmark = pytest.mark.swtpm

TPM_GENERATED_VALUE = b"\xff\x54\x43\x47"
MODEL_SIGNING = Path(sys.executable).with_name("model_signing")
OUTPUTS = {
    "model/weights.bin": bytes(range(256)) * 40,  # over a few sequence chunks
    "metrics.json": b'{"accuracy": 0.93}\n',
    "tokenizer/vocab.txt": b"a\nb\nc\n",
}


@dataclass(frozen=True)
class CertifiedAk:
    """An ECC AK, its chain (the AK certificate, then the platform CA), the CA's PEM file."""

    ak: AttestationKey
    chain: list[x509.Certificate]
    root_path: Path


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwtpm]:
    state = tmp_path_factory.mktemp("swtpm") / "state"
    with LocalSwtpm.create(state, tmp_path_factory.mktemp("ek-ca")) as running:
        yield running


@pytest.fixture
def tpm(swtpm: LocalSwtpm) -> Iterator[Tpm]:
    with Tpm(swtpm.tcti) as opened:
        yield opened


def certify(
    tpm: Tpm, swtpm: LocalSwtpm, ca: PlatformCA, algorithm: AkAlgorithm
) -> tuple[AttestationKey, x509.Certificate]:
    """A new AK enrolled the way the local platform enrols one, and its certificate."""
    ak = tpm.create_ak(algorithm)
    ek_certificate = tpm.ek_certificate()
    assert ek_certificate is not None
    ek = ca.verify_ek_certificate(ek_certificate, swtpm.ek_ca_certificate_path)
    challenge = ca.begin_activation(ek, tpm.create_ek().public_bytes, ak.public_bytes)
    secret = tpm.activate_credential(ak, challenge.credential_blob, challenge.encrypted_secret)
    pem = ca.complete_activation(challenge, secret)
    return ak, x509.load_pem_x509_certificate(pem.encode())


@pytest.fixture(scope="module")
def certified_ak(swtpm: LocalSwtpm, tmp_path_factory: pytest.TempPathFactory) -> CertifiedAk:
    folder = tmp_path_factory.mktemp("platform-ca")
    ca = PlatformCA.load_or_create(folder)
    with Tpm(swtpm.tcti) as tpm:
        ak, certificate = certify(tpm, swtpm, ca, AkAlgorithm.ECC_P256_ECDSA_SHA256)
    root_path = folder / "platform-root.pem"
    root_path.write_text(ca.certificate_pem)
    return CertifiedAk(ak, [certificate, ca.certificate], root_path)


def ak_public_key(ak: AttestationKey) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    return public_key_of(parse_tpmt_public(ak.public_bytes, "AK"), "AK")


def verify_signature(
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, signature: bytes, data: bytes
) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


def is_ticket_error(rc: int | None) -> bool:
    # Format-1 response code: the parameter number (bits 6 and 8-11) does not matter here.
    return rc is not None and rc & 0x0BF == int(TPM2_RC.TICKET)


# -- the signing primitive ------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(AkAlgorithm))
def test_signature_over_four_bytes_or_more_verifies(tpm: Tpm, algorithm: AkAlgorithm) -> None:
    ak = tpm.create_ak(algorithm)
    key = ak_public_key(ak)
    chunk = SEQUENCE_CHUNK_SIZE
    for length in (4, 33, chunk - 1, chunk, chunk + 1, 3 * chunk + 7):
        data = hashlib.sha256(str(length).encode()).digest() * (length // 32 + 1)
        data = data[:length]
        signature = tpm_sign(tpm, ak, data)
        verify_signature(key, signature, data)
        with pytest.raises(InvalidSignature):
            verify_signature(key, signature, data + b"x")
    assert len(tpm.transient_handles()) == 2  # the EK and the AK: every sequence consumed


@pytest.mark.parametrize("algorithm", list(AkAlgorithm))
def test_the_tpm_refuses_data_that_looks_tpm_generated(tpm: Tpm, algorithm: AkAlgorithm) -> None:
    ak = tpm.create_ak(algorithm)
    forged_attest = TPM_GENERATED_VALUE + b"\x80\x18" + bytes(100)  # a TPMS_ATTEST header
    # Under 4 bytes the TPM cannot tell that the data does not begin with the magic.
    for data in (forged_attest, forged_attest * 20, TPM_GENERATED_VALUE, b"", b"abc"):
        with pytest.raises(TpmError) as raised:
            tpm_sign(tpm, ak, data)
        assert raised.value.operation == "sign"
        assert is_ticket_error(raised.value.rc), hex(raised.value.rc or 0)
    assert len(tpm.transient_handles()) == 2
    # One byte earlier, the same bytes are ordinary data.
    verify_signature(
        ak_public_key(ak), tpm_sign(tpm, ak, b"\0" + forged_attest), b"\0" + forged_attest
    )


def test_the_ak_signs_no_digest_the_tpm_did_not_compute(tpm: Tpm) -> None:
    ak = tpm.create_ak(AkAlgorithm.ECC_P256_ECDSA_SHA256)
    digest = hashlib.sha256(TPM_GENERATED_VALUE + b"forged").digest()
    with pytest.raises(TSS2_Exception) as raised:
        tpm.esapi.sign(tpm._ak_handle(ak), digest, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
    assert is_ticket_error(int(raised.value.rc))


# -- model_signing accepts the AK's bundle ----------------------------------------------------


def run_model_signing(outputs: Path, root_path: Path) -> subprocess.CompletedProcess[str]:
    """``model_signing verify certificate`` as a user runs it."""
    command = [
        str(MODEL_SIGNING),
        "verify",
        "certificate",
        str(outputs),
        "--signature",
        str(outputs / "model.sig"),
        "--certificate_chain",
        str(root_path),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def sign_outputs(
    outputs: Path, tpm: Tpm, ak: AttestationKey, chain: list[x509.Certificate]
) -> None:
    """What the agent will do after measuring the outputs: sign them with the AK."""
    statement = model_statement(outputs.name, hash_tree(outputs))
    signature = tpm_sign(tpm, ak, statement.pae)
    (outputs / "model.sig").write_bytes(model_signing_bundle(statement.payload, signature, chain))


@pytest.fixture(scope="module")
def signed_outputs(
    swtpm: LocalSwtpm, certified_ak: CertifiedAk, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    outputs = write_folder(tmp_path_factory.mktemp("run") / "outputs", OUTPUTS)
    with Tpm(swtpm.tcti) as tpm:
        sign_outputs(outputs, tpm, certified_ak.ak, certified_ak.chain)
    return outputs


def test_model_signing_accepts_the_ak_signed_outputs(
    signed_outputs: Path, certified_ak: CertifiedAk
) -> None:
    result = run_model_signing(signed_outputs, certified_ak.root_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification succeeded" in result.stdout
    bundle = json.loads((signed_outputs / "model.sig").read_text())
    chain = bundle["verificationMaterial"]["x509CertificateChain"]["certificates"]
    assert len(chain) == 2  # the AK certificate, then the platform CA


def change_a_file(outputs: Path, tpm: Tpm, certified: CertifiedAk) -> None:
    (outputs / "metrics.json").write_bytes(b'{"accuracy": 0.99}\n')


def add_a_file(outputs: Path, tpm: Tpm, certified: CertifiedAk) -> None:
    (outputs / "model" / "backdoor.bin").write_bytes(b"extra weights")


def edit_the_statement(outputs: Path, tpm: Tpm, certified: CertifiedAk) -> None:
    change_a_file(outputs, tpm, certified)
    bundle = json.loads((outputs / "model.sig").read_text())
    edited = model_statement(outputs.name, hash_tree(outputs, exclude=["model.sig"]))
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(edited.payload).decode()
    (outputs / "model.sig").write_text(json.dumps(bundle))


def sign_with_a_software_key(outputs: Path, tpm: Tpm, certified: CertifiedAk) -> None:
    statement = model_statement(outputs.name, hash_tree(outputs, exclude=["model.sig"]))
    key = ec.generate_private_key(ec.SECP256R1())
    signature = key.sign(statement.pae, ec.ECDSA(hashes.SHA256()))
    bundle = model_signing_bundle(statement.payload, signature, certified.chain)
    (outputs / "model.sig").write_bytes(bundle)


def sign_with_another_ak(outputs: Path, tpm: Tpm, certified: CertifiedAk) -> None:
    other = tpm.create_ak(AkAlgorithm.ECC_P256_ECDSA_SHA256)  # same TPM, not certified
    (outputs / "model.sig").unlink()
    sign_outputs(outputs, tpm, other, certified.chain)


# cryptography's InvalidSignature carries no message: this is how the tool reports it.
BAD_SIGNATURE = "Verification failed with error: "


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (change_a_file, "Hash mismatch for 'metrics.json'"),
        (add_a_file, "Extra files found in model 'outputs': model/backdoor.bin"),
        (edit_the_statement, BAD_SIGNATURE),
        (sign_with_a_software_key, BAD_SIGNATURE),
        (sign_with_another_ak, BAD_SIGNATURE),
    ],
)
def test_model_signing_refuses_tampered_outputs(
    tamper: Callable[[Path, Tpm, CertifiedAk], None],
    reason: str,
    signed_outputs: Path,
    certified_ak: CertifiedAk,
    tpm: Tpm,
    tmp_path: Path,
) -> None:
    outputs = shutil.copytree(signed_outputs, tmp_path / "outputs")
    tamper(outputs, tpm, certified_ak)
    result = run_model_signing(outputs, certified_ak.root_path)
    assert result.returncode == 1, result.stdout
    last_line = result.stderr.splitlines()[-1]
    if reason == BAD_SIGNATURE:
        assert last_line == BAD_SIGNATURE
    else:
        assert last_line.startswith("Verification failed") and reason in last_line
