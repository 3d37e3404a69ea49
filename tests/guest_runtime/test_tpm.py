"""The guest runtime's TPM layer against a real swtpm (started through LocalSwtpm)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import ESYS_TR, TPMA_OBJECT

from aicert.errors import PcrDigestError
from aicert.guest_runtime.tpm import (
    AK_ATTRIBUTES,
    AkAlgorithm,
    AttestationKey,
    Tpm,
    TpmError,
    TpmUnreachableError,
    ak_template,
    der_prefix,
)
from aicert.quote import verify_quote
from aicert.tasks.platforms import swtpm as swtpm_module
from aicert.tasks.platforms.platform_ca import (
    OID_TCG_KP_AIK_CERTIFICATE,
    PlatformCA,
    PlatformCAError,
    VerifiedEkCertificate,
    parse_tpmt_public,
    public_key_of,
)
from aicert.tasks.platforms.swtpm import LocalSwtpm, SwtpmError

pytestmark = pytest.mark.swtpm

TPM_GENERATED_VALUE = b"\xff\x54\x43\x47"
QUOTED_PCRS = list(range(16))


def spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def ek_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ek-ca")


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory: pytest.TempPathFactory, ek_ca_dir: Path) -> Iterator[LocalSwtpm]:
    with LocalSwtpm.create(tmp_path_factory.mktemp("swtpm") / "state", ek_ca_dir) as running:
        yield running


@pytest.fixture(scope="module")
def platform_ca(tmp_path_factory: pytest.TempPathFactory) -> PlatformCA:
    return PlatformCA.load_or_create(tmp_path_factory.mktemp("platform-ca"))


@pytest.fixture
def tpm(swtpm: LocalSwtpm) -> Iterator[Tpm]:
    with Tpm(swtpm.tcti) as opened:
        yield opened


@pytest.fixture(scope="module")
def rsa_ak(swtpm: LocalSwtpm) -> AttestationKey:
    with Tpm(swtpm.tcti) as opened:
        return opened.create_ak()


def verified_ek(tpm: Tpm, swtpm: LocalSwtpm, platform_ca: PlatformCA) -> VerifiedEkCertificate:
    ek_cert = tpm.ek_certificate()
    assert ek_cert is not None
    return platform_ca.verify_ek_certificate(ek_cert, swtpm.ek_ca_certificate_path)


# -- swtpm and EK certificate ---------------------------------------------------------------


def test_ek_certificate_present_and_chains_to_the_ek_ca(
    swtpm: LocalSwtpm, tpm: Tpm, platform_ca: PlatformCA
) -> None:
    ek_cert = tpm.ek_certificate()
    assert ek_cert is not None
    assert ek_cert == swtpm.ek_certificate_path.read_bytes()
    verified = platform_ca.verify_ek_certificate(ek_cert, swtpm.ek_ca_certificate_path)
    # The EK CA (swtpm_localca's signing CA) itself chains to swtpm_localca's root.
    issuer = x509.load_pem_x509_certificate(swtpm.ek_ca_certificate_path.read_bytes())
    root = x509.load_pem_x509_certificate(swtpm.ek_root_ca_certificate_path.read_bytes())
    issuer.verify_directly_issued_by(root)
    # The EK made from the TCG template is the key the certificate certifies.
    assert spki(verified.certificate.public_key()) == spki(
        serialization.load_pem_public_key(tpm.create_ek().public.to_pem())
    )


def test_ek_certificate_from_another_ca_is_refused(
    swtpm: LocalSwtpm, tpm: Tpm, platform_ca: PlatformCA, tmp_path: Path
) -> None:
    ek_cert = tpm.ek_certificate()
    assert ek_cert is not None
    other_ca = tmp_path / "other.pem"
    other_ca.write_text(platform_ca.certificate_pem)
    with pytest.raises(PlatformCAError):
        platform_ca.verify_ek_certificate(ek_cert, other_ca)
    with pytest.raises(PlatformCAError):
        platform_ca.verify_ek_certificate(ek_cert[:-1] + b"\x00", swtpm.ek_ca_certificate_path)


def test_second_swtpm_shares_the_ek_ca(
    tmp_path: Path, ek_ca_dir: Path, swtpm: LocalSwtpm, platform_ca: PlatformCA
) -> None:
    second = LocalSwtpm.create(tmp_path / "second", ek_ca_dir)
    assert second.ek_ca_certificate_path == swtpm.ek_ca_certificate_path
    platform_ca.verify_ek_certificate(
        second.ek_certificate_path.read_bytes(), second.ek_ca_certificate_path
    )
    with pytest.raises(SwtpmError) as raised:
        LocalSwtpm.create(tmp_path / "second", ek_ca_dir)
    assert raised.value.step == "setup"


def test_concurrent_creations_share_one_new_ek_ca(tmp_path: Path, platform_ca: PlatformCA) -> None:
    fresh_ca_dir = tmp_path / "fresh-ca"
    with ThreadPoolExecutor(max_workers=3) as pool:
        created = list(
            pool.map(lambda n: LocalSwtpm.create(tmp_path / f"s{n}", fresh_ca_dir), range(3))
        )
    for swtpm in created:
        platform_ca.verify_ek_certificate(
            swtpm.ek_certificate_path.read_bytes(), swtpm.ek_ca_certificate_path
        )
    serials = {
        x509.load_der_x509_certificate(s.ek_certificate_path.read_bytes()).serial_number
        for s in created
    }
    assert len(serials) == 3


def test_der_prefix_strips_padding_and_refuses_garbage() -> None:
    certificate = bytes.fromhex("3003020101")
    assert der_prefix(certificate + b"\x00" * 11) == certificate
    with pytest.raises(TpmError):
        der_prefix(certificate + b"\x00\x01")
    with pytest.raises(TpmError):
        der_prefix(b"\x30\x82\x10\x00" + b"\x00" * 8)


# -- AK and activation ----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(AkAlgorithm))
def test_activation_issues_an_ak_certificate_for_the_ak(
    swtpm: LocalSwtpm, tpm: Tpm, platform_ca: PlatformCA, algorithm: AkAlgorithm
) -> None:
    ak = tpm.create_ak(algorithm)
    ek = verified_ek(tpm, swtpm, platform_ca)
    challenge = platform_ca.begin_activation(ek, tpm.create_ek().public_bytes, ak.public_bytes)
    secret = tpm.activate_credential(ak, challenge.credential_blob, challenge.encrypted_secret)
    pem = platform_ca.complete_activation(challenge, secret)

    certificate = x509.load_pem_x509_certificate(pem.encode())
    ak_key = public_key_of(parse_tpmt_public(ak.public_bytes, "AK"), "AK")
    assert spki(certificate.public_key()) == spki(ak_key)
    certificate.verify_directly_issued_by(platform_ca.certificate)
    assert certificate.issuer == platform_ca.certificate.subject
    key_usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical and key_usage.value.digital_signature
    assert not key_usage.value.key_cert_sign
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [OID_TCG_KP_AIK_CERTIFICATE]
    common_name = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert common_name == f"AICert AK {ak.name[2:].hex()[:16]}"
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert 86400 < lifetime.total_seconds() <= 86400 + 600


def test_activation_with_a_wrong_secret_fails(
    swtpm: LocalSwtpm, tpm: Tpm, platform_ca: PlatformCA, rsa_ak: AttestationKey
) -> None:
    ek = verified_ek(tpm, swtpm, platform_ca)
    challenge = platform_ca.begin_activation(ek, tpm.create_ek().public_bytes, rsa_ak.public_bytes)
    secret = tpm.activate_credential(rsa_ak, challenge.credential_blob, challenge.encrypted_secret)
    wrong = bytes([secret[0] ^ 1]) + secret[1:]
    with pytest.raises(PlatformCAError):
        platform_ca.complete_activation(challenge, wrong)
    # A secret from another challenge for the same AK does not answer this one.
    other = platform_ca.begin_activation(ek, tpm.create_ek().public_bytes, rsa_ak.public_bytes)
    with pytest.raises(PlatformCAError):
        platform_ca.complete_activation(other, secret)


def test_credential_for_another_ak_does_not_activate(
    swtpm: LocalSwtpm, tpm: Tpm, platform_ca: PlatformCA, rsa_ak: AttestationKey
) -> None:
    ek = verified_ek(tpm, swtpm, platform_ca)
    other_ak = tpm.create_ak(AkAlgorithm.ECC_P256_ECDSA_SHA256)
    challenge = platform_ca.begin_activation(
        ek, tpm.create_ek().public_bytes, other_ak.public_bytes
    )
    with pytest.raises(TpmError):
        tpm.activate_credential(rsa_ak, challenge.credential_blob, challenge.encrypted_secret)


def test_non_restricted_ak_is_refused(swtpm: LocalSwtpm, tpm: Tpm, platform_ca: PlatformCA) -> None:
    template = ak_template()
    template.objectAttributes = AK_ATTRIBUTES & ~TPMA_OBJECT.RESTRICTED
    unrestricted = tpm.create_ek_child(template)
    ek = verified_ek(tpm, swtpm, platform_ca)
    with pytest.raises(PlatformCAError, match="restricted"):
        platform_ca.begin_activation(ek, tpm.create_ek().public_bytes, unrestricted.public_bytes)


def test_ek_public_not_matching_the_certificate_is_refused(
    swtpm: LocalSwtpm, tpm: Tpm, platform_ca: PlatformCA, rsa_ak: AttestationKey
) -> None:
    ek = verified_ek(tpm, swtpm, platform_ca)
    ek_public = bytearray(tpm.create_ek().public_bytes)
    ek_public[-1] ^= 0xFF  # last byte of the RSA modulus
    with pytest.raises(PlatformCAError, match="does not match"):
        platform_ca.begin_activation(ek, bytes(ek_public), rsa_ak.public_bytes)


def test_platform_ca_is_created_once_with_a_private_key_file(tmp_path: Path) -> None:
    first = PlatformCA.load_or_create(tmp_path)
    second = PlatformCA.load_or_create(tmp_path)
    assert first.certificate == second.certificate
    assert isinstance(first.certificate.public_key(), ec.EllipticCurvePublicKey)
    key_files = [p for p in tmp_path.iterdir() if p.name.endswith(".key.pem")]
    assert len(key_files) == 1
    assert key_files[0].stat().st_mode & 0o777 == 0o600
    common_name = first.certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert common_name[0].value == "AICert Local Platform CA"


# -- PCRs and quotes ------------------------------------------------------------------------


def test_pcr_extend_then_read(tpm: Tpm) -> None:
    digest = hashlib.sha256(b"aicert test event").digest()
    assert tpm.pcr_read([13]) == {13: b"\x00" * 32}
    tpm.pcr_extend(13, digest)
    assert tpm.pcr_read([13])[13] == hashlib.sha256(b"\x00" * 32 + digest).digest()
    with pytest.raises(TpmError):
        tpm.pcr_extend(13, digest[:20])


def test_pcr_read_returns_all_24_pcrs(tpm: Tpm) -> None:
    values = tpm.pcr_read(range(24))
    assert list(values) == list(range(24))
    assert all(len(value) == 32 for value in values.values())


@pytest.mark.parametrize("algorithm", list(AkAlgorithm))
def test_quote_parses_and_verifies(tpm: Tpm, algorithm: AkAlgorithm) -> None:
    ak = tpm.create_ak(algorithm)
    tpm.pcr_extend(14, hashlib.sha256(b"input").digest())
    nonce = os.urandom(32)
    quote = tpm.quote(ak, QUOTED_PCRS, nonce)
    assert quote.attest[:4] == TPM_GENERATED_VALUE
    assert list(quote.pcrs) == QUOTED_PCRS
    assert quote.pcrs == tpm.pcr_read(QUOTED_PCRS)
    verify_quote(quote.attest, quote.signature, ak.public_bytes, nonce, quote.pcrs)
    tampered = dict(quote.pcrs)
    tampered[14] = hashlib.sha256(b"other input").digest()
    with pytest.raises(PcrDigestError):
        verify_quote(quote.attest, quote.signature, ak.public_bytes, nonce, tampered)


def test_ak_reloads_in_a_later_session(swtpm: LocalSwtpm, rsa_ak: AttestationKey) -> None:
    with Tpm(swtpm.tcti) as later:
        ak = later.load_ak(rsa_ak.private_bytes, rsa_ak.public_bytes)
        assert ak.name == rsa_ak.name
        nonce = os.urandom(16)
        quote = later.quote(ak, [0, 14, 15], nonce)
    verify_quote(quote.attest, quote.signature, rsa_ak.public_bytes, nonce, quote.pcrs)


def test_persistent_ak_quotes_and_stays_persistent(swtpm: LocalSwtpm) -> None:
    persistent_handle = 0x81000003  # where Azure provisions its AK
    with Tpm(swtpm.tcti) as tpm:
        created = tpm.create_ak()
        loaded = tpm.load_ak(created.private_bytes, created.public_bytes)
        transient = tpm._ak_handle(loaded)  # provisioning a persistent AK is Azure's job
        tpm.esapi.evict_control(ESYS_TR.OWNER, transient, persistent_handle)
    with Tpm(swtpm.tcti) as tpm:
        ak = tpm.persistent_ak(persistent_handle)
        assert ak.public_bytes == created.public_bytes
        nonce = os.urandom(32)
        quote = tpm.quote(ak, QUOTED_PCRS, nonce)
    verify_quote(quote.attest, quote.signature, ak.public_bytes, nonce, quote.pcrs)
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.transient_handles() == []
        again = tpm.persistent_ak(persistent_handle)
        tpm.quote(again, [0], b"still there")
        with pytest.raises(TpmError, match="restricted signing"):
            tpm.persistent_ak(0x81010001)  # swtpm_setup's persisted EK: a decryption key


def test_fifty_quotes_leave_no_transient_handles(swtpm: LocalSwtpm, rsa_ak: AttestationKey) -> None:
    quote_seconds: list[float] = []
    extend_seconds: list[float] = []
    for round_number in range(50):
        # A new connection each round: the path where a leaked handle would pile up.
        with Tpm(swtpm.tcti) as tpm:
            ak = tpm.load_ak(rsa_ak.private_bytes, rsa_ak.public_bytes)
            started = time.perf_counter()
            tpm.pcr_extend(15, hashlib.sha256(round_number.to_bytes(4, "big")).digest())
            extend_seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
            tpm.quote(ak, QUOTED_PCRS, os.urandom(32))
            quote_seconds.append(time.perf_counter() - started)
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.transient_handles() == []
        assert tpm.loaded_session_handles() == []
    print(
        f"\nswtpm latency over 50 rounds: quote (16 PCRs + PCR read) median "
        f"{statistics.median(quote_seconds) * 1000:.1f} ms, max {max(quote_seconds) * 1000:.1f}"
        f" ms; pcr_extend median {statistics.median(extend_seconds) * 1000:.2f} ms"
    )


def test_one_connection_survives_many_operations(swtpm: LocalSwtpm, rsa_ak: AttestationKey) -> None:
    with Tpm(swtpm.tcti) as tpm:
        for _ in range(50):
            tpm.quote(rsa_ak, [14, 15], os.urandom(8))
        assert len(tpm.transient_handles()) == 2  # the EK and the AK, until close
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.transient_handles() == []


# -- failures -------------------------------------------------------------------------------


def test_killed_swtpm_gives_tpm_error_quickly(tmp_path: Path, ek_ca_dir: Path) -> None:
    swtpm = LocalSwtpm.create(tmp_path / "state", ek_ca_dir)
    with swtpm:
        tpm = Tpm(swtpm.tcti)
        try:
            ak = tpm.create_ak()
            tpm.quote(ak, [0], b"before")
            os.kill(swtpm.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(TpmUnreachableError, match="unreachable"):
                tpm.quote(ak, [0], b"after")
            with pytest.raises(TpmUnreachableError):
                tpm.pcr_read([0])
            assert time.monotonic() - started < 5
        finally:
            tpm.close()
    assert not swtpm.running


def test_unreachable_tpm_at_open(tmp_path: Path, ek_ca_dir: Path) -> None:
    swtpm = LocalSwtpm.create(tmp_path / "state", ek_ca_dir)
    with swtpm:
        tcti = swtpm.tcti
    started = time.monotonic()
    with pytest.raises(TpmUnreachableError):
        Tpm(tcti)
    assert time.monotonic() - started < 5


def test_start_retries_when_the_port_is_taken(
    tmp_path: Path, ek_ca_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Force the race "another process binds the port between our probe and swtpm's bind".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        real_pick = swtpm_module._pick_port_pair
        picks = iter([taken])
        monkeypatch.setattr(
            swtpm_module, "_pick_port_pair", lambda: next(picks, None) or real_pick()
        )
        swtpm = LocalSwtpm.create(tmp_path / "state", ek_ca_dir)
        with swtpm, Tpm(swtpm.tcti) as tpm:
            assert swtpm.port != taken
            assert tpm.ek_certificate() == swtpm.ek_certificate_path.read_bytes()


def test_stop_leaves_no_process(tmp_path: Path, ek_ca_dir: Path) -> None:
    swtpm = LocalSwtpm.create(tmp_path / "state", ek_ca_dir)
    swtpm.start()
    pid = swtpm.pid
    assert swtpm.pid_file.read_text().strip() == str(pid)
    swtpm.stop()
    swtpm.stop()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not swtpm.pid_file.exists()
    assert not swtpm.running
    with pytest.raises(SwtpmError):
        _ = swtpm.tcti


def test_forgotten_swtpm_is_terminated_when_python_exits(tmp_path: Path, ek_ca_dir: Path) -> None:
    script = (
        "import sys; from pathlib import Path\n"
        "from aicert.tasks.platforms.swtpm import LocalSwtpm\n"
        "swtpm = LocalSwtpm.create(Path(sys.argv[1]), Path(sys.argv[2]))\n"
        "swtpm.start()\n"
        "print(swtpm.pid)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "state"), str(ek_ca_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pid = int(result.stdout.strip())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()
