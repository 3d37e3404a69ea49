"""Certificate verification: the checks of docs/verification-checks.md, in order, failing
closed on the first.

``verify_certificate`` returns a ``VerificationReport`` that says what was checked and what
the certificate binds; any failure raises the ``VerificationError`` subclass for that check.
The inputs and outputs in the report come only from the replayed application event log.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from cryptography import x509

from aicert.appevents import (
    INPUTS_PCR,
    OUTPUTS_PCR,
    MeasuredRun,
    application_pcr_start,
    interpret,
    replay,
)
from aicert.boot_events import replay_against_quote
from aicert.boot_log_check import check_boot_log
from aicert.boot_pcr_check import boot_application_start, check_azure_boot_pcrs
from aicert.chain import (
    ChainVerification,
    check_ak_binding,
    issuer_key_purposes,
    leaf_public_key_matches,
    load_pem_certificates,
    pinned_roots,
    shipped_intermediates,
    verify_ak_chain,
)
from aicert.errors import (
    AkMismatchError,
    ArtifactMismatchError,
    CertificateChainError,
    EventLogError,
    ExpectationError,
    NonceMismatchError,
    Pcr14StartError,
    PcrSelectionError,
    PlatformError,
    TpmStructureError,
    VerificationError,
)
from aicert.hashing import UnsafePathError, hash_tree, sha256_file
from aicert.lineage import (
    LineageLink,
    ParentCertificate,
    VerifyParent,
    follow_lineage,
    load_parents,
    measured_links,
)
from aicert.metrics import MetricThreshold, check_thresholds, measured_metrics, thresholds_of
from aicert.model import Certificate, InputRecord, OutputRecord, check_time
from aicert.quote import verify_quote
from aicert.reference_value_sets import REFERENCE_VALUE_SET_TYPES, PlatformReferenceValues
from aicert.signed_statements import verify_signed_statements
from aicert.tcg_eventlog import TcgEventLog, parse_event_log
from aicert.tpm_structures import parse_tpmt_public

QUOTED_PCRS = frozenset(range(16))
DEV_PLATFORM_NOTE = (
    "local platform: software TPM on the build host, no boot chain attested; this "
    "certificate proves what the AICert agent measured, not which OS or firmware ran it"
)


@dataclass(frozen=True)
class Check:
    name: str
    detail: str


@dataclass(frozen=True)
class VerificationReport:
    """What was verified, and what the certificate binds (from the replayed log only)."""

    run_id: str
    project: str
    platform: str
    boot_chain_attested: bool
    platform_note: str
    ak_root_subject: str
    ak_root_fingerprint_sha256: str
    ak_chain_expires_at: datetime
    verified_at_time: datetime
    nonce: str
    runtime_version: str
    exit_code: int
    duration_ms: int
    finished_at: datetime
    inputs: tuple[InputRecord, ...]
    outputs: tuple[OutputRecord, ...]
    pcrs: Mapping[int, str]
    checks: tuple[Check, ...] = field(default_factory=tuple)
    # The certified inputs' links, each with its verified parent's tree or unverified.
    lineage: tuple[LineageLink, ...] = ()
    # The results file's metrics (name -> value), bound by the replayed log.
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "verified": True,
            "run_id": self.run_id,
            "project": self.project,
            "platform": self.platform,
            "boot_chain_attested": self.boot_chain_attested,
            "platform_note": self.platform_note,
            "ak_root_subject": self.ak_root_subject,
            "ak_root_fingerprint_sha256": self.ak_root_fingerprint_sha256,
            "ak_chain_expires_at": self.ak_chain_expires_at.isoformat(),
            "verified_at_time": self.verified_at_time.isoformat(),
            "nonce": self.nonce,
            "runtime_version": self.runtime_version,
            "exit_code": self.exit_code,
            "duration_ms": self.duration_ms,
            "finished_at": self.finished_at.isoformat(),
            "inputs": [i.model_dump(mode="json", exclude_none=True) for i in self.inputs],
            "outputs": [o.model_dump(mode="json") for o in self.outputs],
            "pcrs": {str(k): v for k, v in sorted(self.pcrs.items())},
            "checks": [{"name": c.name, "detail": c.detail} for c in self.checks],
            **({"lineage": [link.to_dict() for link in self.lineage]} if self.lineage else {}),
            **({"metrics": dict(self.metrics)} if self.metrics else {}),
        }


TrustRoot = x509.Certificate | str | bytes | os.PathLike[str]
# A trust root file is one PEM certificate or a few; a bigger file is not one.
MAX_TRUST_ROOT_FILE_BYTES = 1024 * 1024


def load_trust_roots(trusted_roots: Iterable[TrustRoot]) -> list[x509.Certificate]:
    """The caller's trust anchors as certificates: each an ``x509.Certificate``, PEM text or
    bytes, or the path of a PEM file (each PEM may hold several certificates).

    A wrong root is the caller's mistake, not the certificate's fault: it raises ``TypeError``
    or ``ValueError`` naming ``trusted_roots[i]``, never a ``VerificationError``.

    Args:
        trusted_roots: the anchors (a list or other iterable, not one root on its own).

    Raises:
        TypeError: ``trusted_roots`` is a single str, bytes or path, or holds something that
            is none of the above (an int, None, a key).
        ValueError: a root is a file that cannot be read or a folder, or is not PEM
            certificate data (a random file, a PEM private key or CSR).
    """
    if isinstance(trusted_roots, str | bytes | bytearray | os.PathLike | x509.Certificate):
        raise TypeError(
            "trusted_roots must be a list of roots, not one "
            f"{type(trusted_roots).__name__} (pass [root])"
        )
    roots: list[x509.Certificate] = []
    for index, root in enumerate(trusted_roots):
        name = f"trusted_roots[{index}]"
        if isinstance(root, x509.Certificate):
            roots.append(root)
            continue
        if isinstance(root, bytes | bytearray) or (isinstance(root, str) and "-----BEGIN" in root):
            data, where = bytes(root) if not isinstance(root, str) else root, "PEM data"
        elif isinstance(root, str | os.PathLike):
            where = str(root)
            try:
                with Path(root).open("rb") as handle:
                    data = handle.read(MAX_TRUST_ROOT_FILE_BYTES + 1)
            except OSError as exc:
                raise ValueError(f"{name} {where}: cannot read: {exc.strerror or exc}") from None
            if len(data) > MAX_TRUST_ROOT_FILE_BYTES:
                raise ValueError(
                    f"{name} {where}: larger than {MAX_TRUST_ROOT_FILE_BYTES} bytes, "
                    "not a PEM certificate file"
                )
        else:
            raise TypeError(
                f"{name} must be an x509.Certificate, PEM str or bytes, or a path, "
                f"not {type(root).__name__}"
            )
        try:
            roots.extend(load_pem_certificates(data))
        except CertificateChainError as exc:
            raise ValueError(f"{name} {where}: {exc}") from None
    return roots


def _judge_time(at_time: datetime | None, claimed: datetime) -> datetime:
    """The time the AK chain is judged at, in UTC: the caller's ``at_time`` (an aware
    datetime in range: TypeError or ValueError naming it otherwise) or the run's end."""
    if at_time is None:
        return claimed.astimezone(UTC)  # bounded by the schema (aicert.model.check_time)
    return check_time(at_time, "at_time")


_LOAD_HINT = "aicert.reference_values.load_reference_values(path)"


def _reference_sets(
    given: PlatformReferenceValues | Iterable[PlatformReferenceValues] | None,
) -> tuple[PlatformReferenceValues, ...]:
    """The caller's reference-value sets; anything else is a TypeError naming the argument
    (a path given for a set loaded with ``load_reference_values(path)``)."""
    if given is None:
        return ()
    if isinstance(given, REFERENCE_VALUE_SET_TYPES):
        return (given,)
    if isinstance(given, str | bytes | os.PathLike) or not isinstance(given, Iterable):
        raise TypeError(
            "reference_values must be a reference-value set or a list of them, not "
            f"{type(given).__name__}; load a file with {_LOAD_HINT}"
        )
    sets = tuple(given)
    for index, item in enumerate(sets):
        if not isinstance(item, REFERENCE_VALUE_SET_TYPES):
            raise TypeError(
                f"reference_values[{index}] must be a reference-value set, not "
                f"{type(item).__name__}; load a file with {_LOAD_HINT}"
            )
    return sets


def verify_certificate(
    certificate: Certificate,
    *,
    trusted_roots: Iterable[TrustRoot] = (),
    expected_inputs: Mapping[str, str] | None = None,
    at_time: datetime | None = None,
    allow_dev_platform: bool = False,
    model: str | os.PathLike[str] | None = None,
    reference_values: PlatformReferenceValues | Iterable[PlatformReferenceValues] | None = None,
    parents: Iterable[ParentCertificate] = (),
    require_lineage: bool = False,
    expected_metrics: Iterable[MetricThreshold | str] = (),
) -> VerificationReport:
    """Verify everything the certificate claims; raise on the first failed check.

    ``trusted_roots``: extra trust anchors (the local/qemu platform CA); Microsoft's Azure
    vTPM root is pinned by fingerprint. ``expected_inputs``: input name, URI or path ->
    expected SHA-256 (or git commit SHA-1 for a source). ``at_time``: when to judge the AK
    chain's validity (default: the measured end of the run). ``allow_dev_platform``: accept a
    ``local`` certificate, which attests no boot chain. ``model``: a file or folder that must
    match the certified outputs. ``reference_values``: the reference-value sets (one, or
    several to choose from by the id the certificate names) that judge a qemu or azure boot
    chain. ``parents``: certificates (or their paths) of the certified inputs' lineage, at any
    depth; each is verified with this same policy and its link checked (``aicert.lineage``).
    ``require_lineage``: refuse a certified input whose parent was not supplied
    (``LineageMissingParentError``) instead of reporting it unverified.
    ``expected_metrics``: thresholds (``accuracy>=0.9``) the certified metrics must meet.
    """
    # The caller's arguments first: a mistake there is a TypeError or ValueError naming the
    # argument, not a verification failure of the certificate.
    judge_time = _judge_time(at_time, certificate.run.finished_at)
    roots = load_trust_roots(trusted_roots)
    reference_sets = _reference_sets(reference_values)
    parent_certificates = load_parents(parents)
    thresholds = thresholds_of(expected_metrics)
    checks: list[Check] = []
    # 1. (the certificate's schema: aicert.model, before this function)
    # 2. AK certificate chain to a trusted root, at the run's time or the caller's.
    chain = _check_ak_certificate_chain(certificate, roots, judge_time, checks)
    # 3. The quoting key is the certified key, and a restricted signing key.
    _check_ak_public_key(certificate, chain.leaf, checks)
    # 4-5. Quote signature and TPMS_ATTEST contents.
    claimed_pcrs = _check_quote(certificate, checks)
    # 6. Application event log replay against PCR 14 and 15.
    boot_log = _boot_log(certificate)
    start = _logless_start(certificate, claimed_pcrs, boot_log, reference_sets)
    measured = _check_application_event_log(certificate, claimed_pcrs, boot_log, checks, start)
    # 7. The statements the AK signed inside the machine (model_signing, SLSA provenance).
    _check_signed_statements(certificate, measured, checks)
    # 8. Platform.
    boot_attested, platform_note = _verify_platform(
        certificate, claimed_pcrs, allow_dev_platform, boot_log, reference_sets
    )
    checks.append(Check("platform", platform_note))
    # 9. The caller's expectations.
    _check_expectations(certificate, expected_inputs, model, checks)
    # 10. The certified metrics, and the caller's thresholds.
    metrics = _check_metrics(measured, thresholds, checks)
    # 11. Lineage: each certified input's parent, verified with this same policy.
    same_policy = partial(
        verify_certificate,
        trusted_roots=roots,
        at_time=at_time,
        allow_dev_platform=allow_dev_platform,
        reference_values=reference_sets,
    )
    lineage = _check_lineage(
        certificate, measured, parent_certificates, require_lineage, same_policy, checks
    )
    return VerificationReport(
        run_id=certificate.run.id,
        project=certificate.run.project,
        platform=certificate.platform.kind,
        boot_chain_attested=boot_attested,
        platform_note=platform_note,
        ak_root_subject=chain.root_subject,
        ak_root_fingerprint_sha256=chain.root_fingerprint_sha256,
        ak_chain_expires_at=chain.not_after,
        verified_at_time=judge_time,
        nonce=certificate.attestation.nonce.hex(),
        runtime_version=measured.runtime.runtime_version,
        exit_code=measured.result.exit_code,
        duration_ms=measured.result.duration_ms,
        finished_at=measured.finished_at,
        # _verify_event_log found the certificate's records equal to those the replayed log
        # gives; its own copies are frozen models, so they are reused rather than rebuilt.
        inputs=tuple(certificate.inputs),
        outputs=tuple(certificate.outputs),
        pcrs={index: value.hex() for index, value in sorted(claimed_pcrs.items())},
        checks=tuple(checks),
        lineage=lineage,
        metrics=metrics,
    )


def _check_metrics(
    measured: MeasuredRun, thresholds: Sequence[MetricThreshold], checks: list[Check]
) -> dict[str, float]:
    """Step 10: the results file's metrics (declared by the measured config), and the
    caller's thresholds on them."""
    metrics = measured_metrics(measured)
    if thresholds:
        check_thresholds(metrics, thresholds)
        checks.append(Check("metrics", ", ".join(map(str, thresholds)) + " met"))
    return metrics


def _check_lineage(
    certificate: Certificate,
    measured: MeasuredRun,
    parents: Sequence[Certificate],
    require_lineage: bool,
    verify_parent: VerifyParent,
    checks: list[Check],
) -> tuple[LineageLink, ...]:
    """Step 11: each certified input's link checked against the supplied parents, each
    parent verified by ``verify_parent`` (the child's policy); see ``aicert.lineage``."""
    links = measured_links(measured.resources)
    if not links and not parents:
        return links
    links = follow_lineage(
        certificate, links, parents, verify_parent, require_lineage=require_lineage
    )
    verified = sum(link.verified for link in links)
    checks.append(
        Check(
            "lineage", f"{verified} of {len(links)} certified input(s) linked to a verified parent"
        )
    )
    return links


def _check_ak_certificate_chain(
    certificate: Certificate,
    roots: Sequence[x509.Certificate],
    judge_time: datetime,
    checks: list[Check],
) -> ChainVerification:
    """Step 2: the AK certificate chains to a trusted root or one pinned for the certificate's
    platform, valid at ``judge_time`` (a gcp chain may use Google's shipped intermediates)."""
    kind = certificate.platform.kind
    chain = verify_ak_chain(
        [*certificate.attestation.ak.certificate_chain, *shipped_intermediates(kind)],
        trusted_roots=roots,
        pinned_root_fingerprints=pinned_roots(kind),
        at_time=judge_time,
        issuer_purposes=issuer_key_purposes(kind),
    )
    checks.append(
        Check(
            "ak-certificate-chain",
            f"AK certificate chains to {chain.root_subject} "
            f"(SHA-256 {chain.root_fingerprint_sha256[:16]}...), valid at {judge_time.isoformat()}",
        )
    )
    return chain


def _check_ak_public_key(
    certificate: Certificate, leaf: x509.Certificate, checks: list[Check]
) -> None:
    """Step 3: ``attestation.ak.public`` is the certified key, a restricted signing key, and
    the one the AK binding extension names."""
    try:
        ak = parse_tpmt_public(certificate.attestation.ak.public)
    except TpmStructureError as exc:
        raise AkMismatchError(f"attestation.ak.public: {exc}") from None
    if not leaf_public_key_matches(leaf, ak.to_cryptography_key()):
        raise AkMismatchError("attestation.ak.public is not the key in the AK certificate")
    if not ak.is_restricted_signing_key():
        raise AkMismatchError(
            "the AK is not a restricted signing key (fixedTPM, fixedParent, "
            "sensitiveDataOrigin, restricted, sign): it could sign forged quotes"
        )
    checks.append(
        Check(
            "ak-public-key",
            "the quote key is the certified restricted signing key; "
            + check_ak_binding(
                leaf,
                ak,
                certificate.attestation.ek.certificate,
                platform=certificate.platform.kind,
                required=certificate.platform.kind in PLATFORM_CA_PLATFORMS,
            ),
        )
    )


def _check_quote(certificate: Certificate, checks: list[Check]) -> dict[int, bytes]:
    """Steps 4-5: the quote covers PCR 0-15, is signed by the AK and carries the nonce;
    the quoted PCR values."""
    attestation = certificate.attestation
    claimed_pcrs = attestation.quote.pcr_values()
    if set(claimed_pcrs) != QUOTED_PCRS:
        raise PcrSelectionError(
            f"attestation.quote.pcrs must list PCRs 0-15, got {sorted(claimed_pcrs)}"
        )
    verify_quote(
        attestation.quote.attest,
        attestation.quote.signature,
        attestation.ak.public,
        attestation.nonce,
        claimed_pcrs,
    )
    checks.append(
        Check(
            "quote",
            "TPM quote over PCRs 0-15 (SHA-256) signed by the AK, with this certificate's nonce",
        )
    )
    return claimed_pcrs


def _check_application_event_log(
    certificate: Certificate,
    claimed_pcrs: Mapping[int, bytes],
    boot_log: TcgEventLog | None,
    checks: list[Check],
    start: Mapping[int, bytes] | None = None,
) -> MeasuredRun:
    """Step 6: the application event log replays to the quoted PCR 14 and 15 and is what the
    certificate claims; the run it measured. ``start``: see ``_verify_event_log``."""
    measured = _verify_event_log(certificate, claimed_pcrs, boot_log, start)
    channel = (
        f"; the first is the agent's TLS key ({measured.channel_key.public_key_sha256[:16]}...)"
        if measured.channel_key is not None
        else ""
    )
    checks.append(
        Check(
            "event-log",
            f"{len(certificate.event_log)} events replay to the quoted PCR 14 and PCR 15" + channel,
        )
    )
    if certificate.run.finished_at != measured.finished_at:
        raise EventLogError("run.finished_at differs from the measured result event")
    return measured


def _check_signed_statements(
    certificate: Certificate, measured: MeasuredRun, checks: list[Check]
) -> None:
    """Step 7: the signed statements are the log's, signed by the certified AK, and exactly
    those PCR 15 measured (``aicert.signed_statements``)."""
    # Parsed in step 3 already, where a malformed key was refused.
    ak_key = parse_tpmt_public(certificate.attestation.ak.public).to_cryptography_key()
    checks.append(
        Check("signed-statements", verify_signed_statements(certificate, measured, ak_key))
    )


def _check_expectations(
    certificate: Certificate,
    expected_inputs: Mapping[str, str] | None,
    model: str | os.PathLike[str] | None,
    checks: list[Check],
) -> None:
    """Step 9: the inputs the caller expects are certified, and the model matches outputs."""
    if expected_inputs:
        _check_expected_inputs(certificate.inputs, expected_inputs)
        checks.append(Check("expected-inputs", f"{len(expected_inputs)} expected inputs match"))
    if model is not None:
        matched = _check_artifact(certificate.outputs, Path(model))
        checks.append(Check("model", f"{matched} file(s) at {model} match certified outputs"))


# Platforms whose AK certificate comes from the project's platform CA, which binds the AK's
# TPM name (and the EK certificate) in the AK binding extension. Azure's come from Microsoft.
PLATFORM_CA_PLATFORMS = frozenset({"local", "qemu"})


def _boot_log(certificate: Certificate) -> TcgEventLog | None:
    """The certificate's boot event log, parsed once for both checks that read it. The local
    platform has no boot: its platform check refuses a boot log if one is attached."""
    # Zero bytes (an Azure Trusted Launch VM's log) is no log: there is nothing to replay.
    if certificate.platform.kind == "local" or not certificate.boot_event_log:
        return None
    return parse_event_log(certificate.boot_event_log)


def _logless_start(
    certificate: Certificate,
    quoted: Mapping[int, bytes],
    boot_log: TcgEventLog | None,
    reference_sets: PlatformReferenceValues | Iterable[PlatformReferenceValues] | None,
) -> dict[int, bytes] | None:
    """An Azure certificate without a boot log: PCR 14/15 before the agent's first event,
    from the reference boot its quoted PCRs match (``aicert.boot_pcr_check``); else None."""
    if certificate.platform.kind != "azure" or boot_log is not None or not reference_sets:
        # Without sets, step 8 refuses the certificate for want of one (after step 6 has
        # judged the claims it can, e.g. the platform kind the log measured).
        return None
    reference = _select_reference_values(certificate, reference_sets)
    return boot_application_start(None, quoted, reference)


def _verify_event_log(
    certificate: Certificate,
    quoted: Mapping[int, bytes],
    boot_log: TcgEventLog | None,
    reference_start: Mapping[int, bytes] | None = None,
) -> MeasuredRun:
    # A boot that extended PCR 14 (shim's MOK lists) is the start; without one, zeros; an
    # Azure boot without a log starts at its reference boot's values (reference_start).
    start = dict(reference_start or application_pcr_start(boot_log))
    replayed = replay(certificate.event_log, start)
    for pcr in (INPUTS_PCR, OUTPUTS_PCR):
        if reference_start is not None and pcr == INPUTS_PCR:
            _check_pcr14_from_reference(replayed[pcr], quoted[pcr], start[pcr])
        if not hmac.compare_digest(replayed[pcr], quoted[pcr]):
            raise EventLogError(
                f"the application event log replays PCR {pcr} to {replayed[pcr].hex()}, "
                f"but the quote says {quoted[pcr].hex()}: events were added, removed, "
                "reordered or edited"
            )
    measured = interpret(certificate.event_log)
    if not hmac.compare_digest(
        measured.runtime.nonce.encode(), certificate.attestation.nonce.hex().encode()
    ):
        raise NonceMismatchError("the measured runtime event carries a different nonce")
    run = certificate.run
    mismatches = [
        name
        for name, claimed, actual in (
            ("run.id", run.id, measured.runtime.run_id),
            # The project name and start time are shown to people: bind them too.
            ("run.project", run.project, measured.project),
            ("run.started_at", run.started_at, measured.started_at),
            ("run.provider", run.provider, measured.runtime.platform),
            ("run.exit_code", run.exit_code, measured.result.exit_code),
            ("run.duration_ms", run.duration_ms, measured.result.duration_ms),
            ("run.runtime_version", run.runtime_version, measured.runtime.runtime_version),
            ("platform.kind", certificate.platform.kind, measured.runtime.platform),
        )
        if claimed != actual
    ]
    if mismatches:
        raise EventLogError(f"{', '.join(mismatches)} differ from the measured events")
    if measured.result.exit_code != 0:
        raise EventLogError(
            f"the measured training exited with code {measured.result.exit_code}: "
            "a failed run certifies nothing"
        )
    if list(certificate.inputs) != measured.input_records():
        raise EventLogError("inputs[] differs from the inputs measured in the event log")
    if list(certificate.outputs) != measured.output_records():
        raise EventLogError("outputs[] differs from the outputs measured in the event log")
    return measured


def _check_pcr14_from_reference(replayed: bytes, quoted: bytes, start: bytes) -> None:
    if not hmac.compare_digest(replayed, quoted):
        raise Pcr14StartError(
            f"no boot event log: from the reference boot's PCR 14 start {start.hex()} the "
            f"application event log replays PCR 14 to {replayed.hex()}, but the quote says "
            f"{quoted.hex()}: PCR 14 did not start at the reference value (an unexplained "
            "start could hide application events), or events were edited"
        )


def _verify_platform(
    certificate: Certificate,
    pcrs: Mapping[int, bytes],
    allow_dev_platform: bool,
    log: TcgEventLog | None,
    reference_values: PlatformReferenceValues | Iterable[PlatformReferenceValues] | None = None,
) -> tuple[bool, str]:
    kind = certificate.platform.kind
    if kind == "local":
        nonzero = [index for index in range(14) if pcrs[index] != bytes(32)]
        if nonzero:
            raise PlatformError(
                f"local platform: PCRs {nonzero} are not in their reset state, so this "
                "TPM was not a fresh local software TPM"
            )
        if certificate.boot_event_log is not None:
            raise PlatformError("local platform: a boot event log is present but cannot apply")
        if not allow_dev_platform:
            raise PlatformError(
                "local platform: no boot chain is attested (software TPM on the build host); "
                "accept it explicitly with allow_dev_platform=True / --allow-dev-platform"
            )
        return False, DEV_PLATFORM_NOTE
    if log is None and kind == "azure":
        # Trusted Launch gives the guest an empty log: judged by the quoted PCR values.
        reference = _select_reference_values(certificate, reference_values)
        return True, check_azure_boot_pcrs(pcrs, reference).note
    if log is None:
        raise PlatformError(f"{kind} platform: the certificate has no boot event log")
    # Before the reference is chosen: a log that does not replay is refused as such.
    replay_against_quote(log, pcrs)
    reference = _select_reference_values(certificate, reference_values)
    # Names the component that differs: kernel command line, initrd, kernel, boot loader,
    # Secure Boot policy (PCR 7), firmware (PCR n); an azure note lists the unchecked PCRs.
    return True, check_boot_log(log, pcrs, reference).note


def _select_reference_values(
    certificate: Certificate,
    given: PlatformReferenceValues | Iterable[PlatformReferenceValues] | None,
) -> PlatformReferenceValues:
    """The caller's reference-value set with the id the certificate names, for the
    certificate's platform (the id only selects: the boot log is then judged against the
    caller's values, not the certificate's)."""
    kind = certificate.platform.kind
    claimed = certificate.platform.reference_values
    candidates = [given] if isinstance(given, REFERENCE_VALUE_SET_TYPES) else list(given or ())
    if not candidates:
        raise PlatformError(
            f"{kind} platform: the boot event log replays, but no reference-value set was "
            f"given to judge it (the certificate names {claimed!r}; pass reference_values= "
            "or --reference-values)"
        )
    for reference in candidates:
        if reference.id == claimed and reference.platform == kind:
            return reference
    other_platform = [r for r in candidates if r.id == claimed]
    if other_platform:
        raise PlatformError(
            f"{kind} platform: the given reference values {claimed!r} are for platform "
            f"{other_platform[0].platform!r}, not {kind!r}"
        )
    raise PlatformError(
        f"{kind} platform: the certificate names reference values {claimed!r}, and none of "
        f"the given sets ({', '.join(r.id for r in candidates)}) is that one"
    )


def _check_expected_inputs(inputs: Sequence[InputRecord], expected: Mapping[str, str]) -> None:
    for key, digest in expected.items():
        wanted = digest.lower().removeprefix("sha256:")
        candidates = [i for i in inputs if key in {i.name, i.uri, i.path}]
        if not candidates:
            raise ExpectationError(f"expected input {key!r} is not in the certificate")
        if not any(wanted in i.digest.values() for i in candidates):
            found = ", ".join(f"{k}:{v}" for i in candidates for k, v in i.digest.items())
            raise ExpectationError(
                f"expected input {key!r} has digest {wanted}, the certificate has {found}"
            )


def _check_artifact(outputs: Sequence[OutputRecord], path: Path) -> int:
    try:
        if path.is_dir():
            found = {d.path: d for d in hash_tree(path)}
            certified = {o.path: o for o in outputs}
            if set(found) != set(certified):
                missing = sorted(set(certified) - set(found))
                extra = sorted(set(found) - set(certified))
                raise ArtifactMismatchError(
                    f"{path}: files differ from the certified outputs "
                    f"(missing: {missing[:5]}, not certified: {extra[:5]})"
                )
            for name, digest in found.items():
                if digest.sha256 != certified[name].digest["sha256"]:
                    raise ArtifactMismatchError(
                        f"{path / name}: SHA-256 {digest.sha256} differs from the certified "
                        f"{certified[name].digest['sha256']}"
                    )
            return len(found)
        digest, _size = sha256_file(path)
    except OSError as exc:
        raise ArtifactMismatchError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnsafePathError as exc:
        raise ArtifactMismatchError(f"{path}: {exc}") from None
    same_name = [o for o in outputs if o.path == path.name or o.path.endswith("/" + path.name)]
    pool = same_name or list(outputs)
    if not any(o.digest["sha256"] == digest for o in pool):
        where = f"the certified {same_name[0].path}" if same_name else "any certified output"
        raise ArtifactMismatchError(f"{path}: SHA-256 {digest} does not match {where}")
    return 1


def verify_artifact(certificate: Certificate, path: Path) -> int:
    """Re-hash a model file or folder and check it against the outputs the log measured.

    This checks the file against the event log's outputs, whose replay must give the
    certificate's PCR 14/15 values; it does not check the quote or chain: call
    ``verify(model=path, ...)`` for the whole verification.
    """
    try:
        measured = _verify_event_log(
            certificate, certificate.attestation.quote.pcr_values(), _boot_log(certificate)
        )
    except KeyError:
        raise PcrSelectionError("attestation.quote.pcrs lacks PCR 14 or 15") from None
    return _check_artifact(measured.output_records(), path)


__all__ = [
    "Check",
    "VerificationError",
    "VerificationReport",
    "load_trust_roots",
    "verify_artifact",
    "verify_certificate",
]
