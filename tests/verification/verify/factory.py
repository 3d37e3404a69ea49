"""Real ``aicert/v1`` certificates for the verifier's tests, made without Docker.

Everything a certificate carries is produced the way a certified run produces it: a swtpm
manufactured by ``LocalSwtpm`` (EK + EK certificate from swtpm_localca), an AK created under
the EK, certified by the project's ``PlatformCA`` after a real MakeCredential /
ActivateCredential, the application events extended into PCR 14/15 of that swtpm, a TPM2_Quote
over PCRs 0-15 with the run's nonce, and ``assemble_certificate`` for the JSON.

Fresh PCRs without a fresh TPM: PCR 14/15 cannot be reset by command, but restarting the
swtpm process is a power cycle (``_TPM_Init`` + ``Startup(CLEAR)``), which resets every PCR
while keeping the TPM's seeds: the EK comes back identical and the AK blobs reload under it.
One swtpm_setup (about 2 s) thus serves every certificate (about 0.1 s each), like one
machine rebooted between runs.

Evidence a TPM will not produce (a quote whose TPMS_ATTEST has a wrong magic or type, a quote
by a key that is not restricted) is forged with a software key that a CA certified: that a
restricted TPM key never signs such data is the whole point of those checks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SU, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_SIG_SCHEME

from aicert.appevents import (
    ConfigEvent,
    ImageEvent,
    OutputFileEvent,
    PackageEvent,
    ResourceEvent,
    ResultEvent,
    RuntimeEvent,
    SourceEvent,
    event_digest,
)
from aicert.chain import AkBinding
from aicert.errors import EventLogError
from aicert.flows.assemble import PLATFORM_DESCRIPTIONS, assemble_certificate
from aicert.guest_runtime.api_models import Evidence
from aicert.guest_runtime.statement_signing import signed_statements_of
from aicert.guest_runtime.tpm import AK_ATTRIBUTES, AkAlgorithm, Tpm, ak_template, pcr_selection
from aicert.guest_runtime.tpm import AttestationKey as TpmAttestationKey
from aicert.model import (
    FORMAT,
    AppEvent,
    Attestation,
    AttestationKey,
    Certificate,
    EndorsementKey,
    OutputRecord,
    Platform,
    Quote,
    RunInfo,
    SignedStatement,
)
from aicert.signed_statements import signed_statements_event
from aicert.tasks.platforms.base import EnrolledKey
from aicert.tasks.platforms.platform_ca import CA_KEY_FILE, PlatformCA
from aicert.tasks.platforms.swtpm import LocalSwtpm
from aicert.tcg_eventlog import EV_NO_ACTION, parse_event_log
from aicert.tpm_structures import TPM_ALG_RSASSA, TPM_ALG_SHA256, parse_tpmt_public

PlatformKind = Literal["local", "qemu", "azure", "gcp"]

QUOTED_PCRS = tuple(range(16))
PROJECT = "tamper-test"
RUNTIME_VERSION = "0.1.0"
NONCE_BYTES = 32

RESOURCE_CONTENT = b"sepal_length,sepal_width,label\n5.1,3.5,setosa\n6.2,2.9,versicolor\n"
RESOURCE_URL = "https://data.example.org/flowers/train.csv"
RESOURCE_DESTINATION = "data/train.csv"
SOURCE_URL = "https://git.example.org/acme/flowers.git"
SOURCE_COMMIT = hashlib.sha1(b"commit").hexdigest()  # a git commit id: SHA-1 is git's choice
SOURCE_TREE_SHA256 = hashlib.sha256(b"the checked-out tree").hexdigest()
BASE_IMAGE_NAME = "aicert/python-base:bookworm"
# Image ids are measured data: any well-formed digest serves.
BASE_IMAGE_ID = "sha256:" + hashlib.sha256(b"base image").hexdigest()
TRAINING_IMAGE_ID = "sha256:" + hashlib.sha256(b"training image").hexdigest()
PACKAGE_CONTENT = b"a wheel"
DEFAULT_OUTPUTS: Mapping[str, bytes] = {
    "metrics.json": b'{"accuracy": 0.93}\n',
    "model/weights.bin": bytes(range(256)) * 64,
}


def run_config(project: str = PROJECT) -> dict[str, Any]:
    """The measured form of a validated config (as ``RunConfig.measured_form`` writes it)."""
    return {
        "kind": "python",
        "name": project,
        "pythonVersion": "3.11",
        "source": {
            "type": "git",
            "gitRepo": SOURCE_URL,
            "tag": "v1.0",
            "branch": None,
            "commit": None,
            "subdirectory": None,
        },
        "pythonEntryPoint": "src/main.py",
        "command": None,
        "resources": [
            {
                "type": "file",
                "url": RESOURCE_URL,
                "destinationPath": RESOURCE_DESTINATION,
                "sha256": None,
            }
        ],
        "image": BASE_IMAGE_NAME,
        "outputs": "/workspace/outputs",
        "limits": {"cpus": 1.0, "memory": "1g", "timeoutSeconds": 600, "pids": 4096},
        "gpus": 0,
        "env": {"EPOCHS": "3"},
    }


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class RunParams:
    """What a run measured; ``events()`` is the application event log the agent would write."""

    run_id: str
    nonce: bytes
    started_at: datetime
    finished_at: datetime
    exit_code: int = 0
    duration_ms: int = 1500
    platform: PlatformKind = "local"
    project: str = PROJECT
    outputs: Mapping[str, bytes] = field(default_factory=lambda: dict(DEFAULT_OUTPUTS))
    # The nonce measured in the runtime event; None: the quote's nonce (the honest case).
    runtime_nonce: bytes | None = None

    @classmethod
    def new(cls, **overrides: Any) -> RunParams:
        finished = datetime.now(UTC)
        defaults: dict[str, Any] = {
            "run_id": f"{PROJECT}-{finished:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}",
            "nonce": secrets.token_bytes(NONCE_BYTES),
            "started_at": finished - timedelta(seconds=2),
            "finished_at": finished,
        }
        defaults.update(overrides)
        return cls(**defaults)

    def events(self) -> list[AppEvent]:
        measured_nonce = self.nonce if self.runtime_nonce is None else self.runtime_nonce
        inputs = [
            RuntimeEvent(
                runtime_version=RUNTIME_VERSION,
                run_id=self.run_id,
                nonce=measured_nonce.hex(),
                platform=self.platform,
                started_at=self.started_at.isoformat(),
            ),
            ConfigEvent(config=run_config(self.project)),
            ImageEvent(role="base", name=BASE_IMAGE_NAME, image_id=BASE_IMAGE_ID),
            SourceEvent(
                type="git",
                url=SOURCE_URL,
                ref="v1.0",
                subdirectory=None,
                commit=SOURCE_COMMIT,
                tree_sha256=SOURCE_TREE_SHA256,
                file_count=3,
                size=4096,
            ),
            ResourceEvent(
                url=RESOURCE_URL,
                destination=RESOURCE_DESTINATION,
                sha256=sha256_hex(RESOURCE_CONTENT),
                size=len(RESOURCE_CONTENT),
            ),
            PackageEvent(
                name="numpy",
                version="2.0.0",
                filename="numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl",
                sha256=sha256_hex(PACKAGE_CONTENT),
                size=len(PACKAGE_CONTENT),
            ),
            ImageEvent(
                role="training", name=f"aicert-train-{self.run_id}", image_id=TRAINING_IMAGE_ID
            ),
        ]
        outputs = [
            OutputFileEvent(path=path, size=len(content), sha256=sha256_hex(content))
            for path, content in sorted(self.outputs.items())
        ]
        result = ResultEvent(
            exit_code=self.exit_code,
            duration_ms=self.duration_ms,
            finished_at=self.finished_at.isoformat(),
        )
        return [event.to_event() for event in [*inputs, *outputs, result]]


@dataclass(frozen=True)
class MadeCertificate:
    """A certificate, the run it certifies, and what a verifier needs to check it."""

    certificate: Certificate
    params: RunParams
    trust_root_pem: str

    def json_bytes(self) -> bytes:
        return self.certificate.to_json_bytes()

    def as_dict(self) -> dict[str, Any]:
        """A fresh JSON tree of the certificate, for tampering."""
        result: dict[str, Any] = json.loads(self.json_bytes())
        return result

    def verify(self, **kwargs: Any) -> Any:
        kwargs.setdefault("trusted_roots", [self.trust_root_pem])
        kwargs.setdefault("allow_dev_platform", True)
        return self.certificate.verify(**kwargs)


def tampered(made: MadeCertificate, mutate: Callable[[dict[str, Any]], None]) -> MadeCertificate:
    """A copy of ``made`` whose JSON went through ``mutate``, parsed the way a verifier reads
    a file (schema included): what an attacker editing the certificate file gets."""
    document = made.as_dict()
    mutate(document)
    certificate = Certificate.from_json_bytes(json.dumps(document).encode())
    return replace(made, certificate=certificate)


def flip_bit_b64(value: str, byte_index: int, bit: int = 0) -> str:
    """The base64 of ``value``'s bytes with one bit flipped (negative index from the end)."""
    data = bytearray(base64.b64decode(value))
    data[byte_index] ^= 1 << bit
    return base64.b64encode(bytes(data)).decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: str) -> bytes:
    return base64.b64decode(value)


# -- the TPM and its attestation key --------------------------------------------------------


class TpmRig:
    """One manufactured swtpm with an AK certified by a platform CA (real activation)."""

    def __init__(
        self,
        swtpm: LocalSwtpm,
        ca: PlatformCA,
        ca_dir: Path,
        ak_algorithm: AkAlgorithm = AkAlgorithm.RSA2048_RSASSA_SHA256,
    ) -> None:
        self.swtpm = swtpm
        self.ca = ca
        self.ca_dir = ca_dir
        self._tpm: Tpm | None = None
        self.swtpm.start()
        self.ak: TpmAttestationKey = self.tpm.create_ak(ak_algorithm)
        ek_der = self.tpm.ek_certificate()
        if ek_der is None:
            raise RuntimeError("the swtpm has no EK certificate")
        self.ek_certificate_pem = (
            x509.load_der_x509_certificate(ek_der).public_bytes(serialization.Encoding.PEM).decode()
        )
        self.chain: list[str] = self.enroll_with(ca)

    @classmethod
    def create(
        cls,
        state_dir: Path,
        ek_ca_dir: Path,
        ca_dir: Path,
        ak_algorithm: AkAlgorithm = AkAlgorithm.RSA2048_RSASSA_SHA256,
    ) -> TpmRig:
        swtpm = LocalSwtpm.create(state_dir, ek_ca_dir)
        return cls(swtpm, PlatformCA.load_or_create(ca_dir), ca_dir, ak_algorithm)

    @property
    def tpm(self) -> Tpm:
        if self._tpm is None:
            self._tpm = Tpm(self.swtpm.tcti)
        return self._tpm

    def enroll_with(self, ca: PlatformCA) -> list[str]:
        """Certify this rig's AK by ``ca``, as the local provider does: EK certificate
        check, MakeCredential to (EK, AK name), ActivateCredential in this TPM, issuance."""
        ek_der = self.tpm.ek_certificate()
        if ek_der is None:
            raise RuntimeError("the swtpm has no EK certificate")
        verified = ca.verify_ek_certificate(ek_der, self.swtpm.ek_ca_certificate_path)
        ek = self.tpm.create_ek()
        challenge = ca.begin_activation(verified, ek.public_bytes, self.ak.public_bytes)
        secret = self.tpm.activate_credential(
            self.ak, challenge.credential_blob, challenge.encrypted_secret
        )
        return [ca.complete_activation(challenge, secret), ca.certificate_pem]

    def power_cycle(self) -> Tpm:
        """Restart the swtpm: every PCR back to its reset value, the AK reloaded."""
        self._shutdown()
        self.swtpm.stop()
        self.swtpm.start()
        self.tpm.load_ak(self.ak.private_bytes, self.ak.public_bytes)
        return self.tpm

    def measure(
        self,
        events: Sequence[AppEvent],
        extend_before: Mapping[int, bytes] | None = None,
        boot_event_log: bytes | None = None,
    ) -> Tpm:
        """Power-cycle, then extend the SHA-256 digests of ``boot_event_log``'s events (as the
        firmware, shim and boot loader of that boot did, PCR 14 included), ``extend_before``,
        and every event's digest, in order."""
        tpm = self.power_cycle()
        if boot_event_log is not None:
            for boot_event in parse_event_log(boot_event_log).events:
                if boot_event.event_type != EV_NO_ACTION:
                    tpm.pcr_extend(boot_event.pcr, boot_event.digests["sha256"])
        for pcr, digest in (extend_before or {}).items():
            tpm.pcr_extend(pcr, digest)
        for event in events:
            tpm.pcr_extend(event.pcr, event_digest(event))
        return tpm

    def _shutdown(self) -> None:
        """TPM2_Shutdown(CLEAR), then close: an orderly power-down. Without it the TPM counts
        each restart as a possible dictionary attack on the (DA-protected) AK and locks it
        out after a few."""
        if self._tpm is None:
            return
        try:
            self._tpm.esapi.shutdown(TPM2_SU.CLEAR)
            self._tpm.close()
        finally:
            self._tpm = None

    def close(self) -> None:
        try:
            self._shutdown()
        finally:
            self.swtpm.stop()


class CertificateFactory:
    """Makes certificates with one ``TpmRig``; each certificate starts from reset PCRs."""

    def __init__(self, rig: TpmRig) -> None:
        self.rig = rig

    @property
    def trust_root_pem(self) -> str:
        return self.rig.ca.certificate_pem

    def make_certificate(
        self,
        params: RunParams | None = None,
        *,
        events: Sequence[AppEvent] | Callable[[list[AppEvent]], list[AppEvent]] | None = None,
        extend_before: Mapping[int, bytes] | None = None,
        boot_event_log: bytes | None = None,
        reference_values: str | None = None,
        signed_statements: bool = False,
        **overrides: Any,
    ) -> MadeCertificate:
        """A certificate over ``params`` (or ``RunParams.new(**overrides)``).

        ``events``: the log to measure instead of ``params.events()``, or a function that
        edits that log (the quote then really covers the edited log). ``extend_before``:
        PCR -> digest extended before the application events (a dirty platform).
        ``boot_event_log``: a TCG boot log measured first and carried by the certificate (a
        qemu or Azure VM's boot), whose reference-value set is ``reference_values``.
        ``signed_statements``: the AK signs the run's statements and their event is measured
        last, as the agent does (``statement_signing.signed_statements_of``).
        """
        if params is None:
            params = RunParams.new(**overrides)
        elif overrides:
            params = replace(params, **overrides)
        if events is None:
            log = params.events()
        elif callable(events):
            log = events(params.events())
        else:
            log = list(events)
        tpm = self.rig.measure(log, extend_before, boot_event_log)
        statements: list[SignedStatement] = []
        if signed_statements:
            statements = signed_statements_of(tpm, self.rig.ak, log)
            event = signed_statements_event(statements).to_event()
            tpm.pcr_extend(event.pcr, event_digest(event))
            log = [*log, event]
        quote = tpm.quote(self.rig.ak, QUOTED_PCRS, params.nonce)
        evidence = Evidence(
            attest=quote.attest,
            signature=quote.signature,
            pcrs={str(index): value.hex() for index, value in sorted(quote.pcrs.items())},
            nonce=params.nonce,
            ak_public=self.rig.ak.public_bytes,
            event_log=log,
            boot_event_log=boot_event_log,
            started_at=params.started_at.isoformat(),
            finished_at=params.finished_at.isoformat(),
            exit_code=params.exit_code,
            duration_ms=params.duration_ms,
            signed_statements=statements,
        )
        enrolled = EnrolledKey(
            ak_certificate_chain=self.rig.chain,
            ek_certificate_pem=self.rig.ek_certificate_pem,
            trusted_root_pem=self.trust_root_pem,
        )
        try:
            certificate = assemble_certificate(
                evidence=evidence,
                enrolled=enrolled,
                project=params.project,
                provider=params.platform,
                reference_values=reference_values,
            )
        except EventLogError:
            # The assembler refuses a log it cannot interpret; a producer that does not care
            # (an attacker) can still wrap a real quote over such a log in a certificate.
            certificate = _certificate_without_interpretation(evidence, enrolled, params)
        return MadeCertificate(certificate, params, self.trust_root_pem)

    def requote(
        self,
        made: MadeCertificate,
        pcrs: Sequence[int] = QUOTED_PCRS,
        nonce: bytes | None = None,
    ) -> tuple[bytes, bytes, dict[int, bytes]]:
        """Another real quote over ``made``'s PCR values (its log measured again from reset
        PCRs): (attest, signature, pcrs) for the PCRs asked."""
        tpm = self.rig.measure(made.certificate.event_log)
        quote = tpm.quote(self.rig.ak, pcrs, made.params.nonce if nonce is None else nonce)
        return quote.attest, quote.signature, dict(quote.pcrs)

    def sha1_quote(self, made: MadeCertificate) -> tuple[bytes, bytes, bytes]:
        """A real quote over ``made``'s PCRs by a restricted RSASSA-**SHA-1** signing key of
        this TPM: (attest, signature, TPMT_PUBLIC).

        ``Tpm`` makes SHA-256 AKs only (and checks pcrDigest sizes of SHA-2), so this goes
        to the ESAPI directly; the key is a primary in the owner hierarchy, flushed after.
        """
        tpm = self.rig.measure(made.certificate.event_log)
        template = ak_template()
        template.parameters.rsaDetail.scheme.details.anySig.hashAlg = TPM2_ALG.SHA1
        esapi = tpm.esapi
        handle, public, _, _, _ = esapi.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=template), ESYS_TR.OWNER
        )
        try:
            attest, signature = esapi.quote(
                handle,
                pcr_selection(QUOTED_PCRS),
                made.params.nonce,
                TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
            )
        finally:
            esapi.flush_context(handle)
        return bytes(attest), bytes(signature.marshal()), bytes(public.publicArea.marshal())


def _certificate_without_interpretation(
    evidence: Evidence, enrolled: EnrolledKey, params: RunParams
) -> Certificate:
    return Certificate(
        format=FORMAT,
        run=RunInfo(
            id=params.run_id,
            project=params.project,
            provider=params.platform,
            started_at=params.started_at,
            finished_at=params.finished_at,
            exit_code=params.exit_code,
            duration_ms=params.duration_ms,
            runtime_version=RUNTIME_VERSION,
        ),
        inputs=[],
        outputs=[
            OutputRecord(path=path, size=len(content), digest={"sha256": sha256_hex(content)})
            for path, content in sorted(params.outputs.items())
        ],
        event_log=list(evidence.event_log),
        boot_event_log=evidence.boot_event_log,
        platform=Platform(kind=params.platform, description=PLATFORM_DESCRIPTIONS[params.platform]),
        attestation=Attestation(
            quote=Quote(attest=evidence.attest, signature=evidence.signature, pcrs=evidence.pcrs),
            nonce=evidence.nonce,
            ak=AttestationKey(
                public=evidence.ak_public, certificate_chain=enrolled.ak_certificate_chain
            ),
            ek=EndorsementKey(certificate=enrolled.ek_certificate_pem),
        ),
    )


# -- software keys: evidence no TPM would sign -------------------------------------------


def ak_binding_for(ak_public: bytes, ek_certificate_pem: str | None) -> AkBinding:
    """The AK binding extension the platform CA would add for this TPMT_PUBLIC and EK
    certificate (no EK certificate: the digest of nothing, which no certificate matches)."""
    ek_der = (
        x509.load_pem_x509_certificate(ek_certificate_pem.encode()).public_bytes(
            serialization.Encoding.DER
        )
        if ek_certificate_pem is not None
        else b""
    )
    return AkBinding(
        ak_name=parse_tpmt_public(ak_public).name(),
        ek_certificate_sha256=hashlib.sha256(ek_der).digest(),
    )


def issue_ak_certificate(
    ca_dir: Path,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    common_name: str = "AICert AK (software key, test only)",
    binding: AkBinding | x509.UnrecognizedExtension | None = None,
) -> str:
    """An AK certificate in the platform CA's profile, signed with the CA key in ``ca_dir``,
    WITHOUT credential activation: a CA that was fooled or misbehaves. Hand-written because
    ``PlatformCA`` (rightly) certifies only keys that passed activation and its AK checks.
    ``binding``: the AK binding extension to add (an ``AkBinding``, or any raw extension
    value under its OID); None: none, as no platform CA issues since it has one."""
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY_FILE).read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the platform CA key is not an EC key")
    ca_certificate = PlatformCA.load_or_create(ca_dir).certificate
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier("2.23.133.8.3")]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if binding is not None:
        value = binding.extension() if isinstance(binding, AkBinding) else binding
        builder = builder.add_extension(value, critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class SoftwareAk:
    """An RSA key outside any TPM, a TPMT_PUBLIC describing it, and a CA certificate for it."""

    key: rsa.RSAPrivateKey
    public_bytes: bytes  # TPMT_PUBLIC, claiming the attributes asked for
    chain: list[str]
    ek_certificate_pem: str | None = None  # the EK certificate its AK binding names

    def sign_attest(self, attest: bytes) -> bytes:
        """TPMT_SIGNATURE (RSASSA, SHA-256) over ``attest``: what a TPM would return."""
        signature = self.key.sign(attest, padding.PKCS1v15(), hashes.SHA256())
        return struct.pack(">HHH", TPM_ALG_RSASSA, TPM_ALG_SHA256, len(signature)) + signature


def software_ak(
    ca: PlatformCA, ca_dir: Path, *, restricted: bool, ek_certificate_pem: str | None = None
) -> SoftwareAk:
    """A software key certified by the CA in ``ca_dir`` with the AK binding of its TPMT_PUBLIC
    and of ``ek_certificate_pem`` (the certificate ``with_software_quote`` then carries)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    template = ak_template()
    attributes = AK_ATTRIBUTES if restricted else AK_ATTRIBUTES & ~TPMA_OBJECT.RESTRICTED
    template.objectAttributes = attributes
    template.unique.rsa = key.public_key().public_numbers().n.to_bytes(256, "big")
    public_bytes = bytes(template.marshal())
    binding = ak_binding_for(public_bytes, ek_certificate_pem)
    chain = [issue_ak_certificate(ca_dir, key.public_key(), binding=binding), ca.certificate_pem]
    return SoftwareAk(
        key=key, public_bytes=public_bytes, chain=chain, ek_certificate_pem=ek_certificate_pem
    )


def with_software_quote(made: MadeCertificate, ak: SoftwareAk, attest: bytes) -> MadeCertificate:
    """``made`` re-signed: ``attest`` signed by the software AK, whose public, chain and EK
    certificate (the one its AK binding names, or none) replace the TPM AK's."""

    def mutate(document: dict[str, Any]) -> None:
        attestation = document["attestation"]
        attestation["ek"]["certificate"] = ak.ek_certificate_pem
        attestation["quote"]["attest"] = b64(attest)
        attestation["quote"]["signature"] = b64(ak.sign_attest(attest))
        attestation["ak"]["public"] = b64(ak.public_bytes)
        attestation["ak"]["certificate_chain"] = list(ak.chain)

    return tampered(made, mutate)
