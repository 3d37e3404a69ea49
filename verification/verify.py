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
from dataclasses import replace
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
from aicert.chain import (
    ChainVerification,
    check_ak_binding,
    issuer_key_purposes,
    leaf_public_key_matches,
    pinned_roots,
    shipped_intermediates,
    verify_ak_chain,
)
from aicert.errors import (
    AkMismatchError,
    ArtifactMismatchError,
    EventLogError,
    ExpectationError,
    NonceMismatchError,
    Pcr14StartError,
    PcrSelectionError,
    TpmStructureError,
    VerificationError,
)
from aicert.gpus import GPU_FACTS_NOTE
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
from aicert.platform_check import (
    DEV_PLATFORM_NOTE,
    boot_log_of,
    logless_application_start,
    reference_sets,
    verify_platform,
)
from aicert.policy import VerificationPolicy
from aicert.quote import verify_quote
from aicert.reference_value_sets import PlatformReferenceValues
from aicert.report import Check, VerificationReport
from aicert.signed_statements import verify_signed_statements
from aicert.tcg_eventlog import TcgEventLog
from aicert.tpm_structures import parse_tpmt_public
from aicert.trust_anchors import TrustRoot, load_trust_roots

QUOTED_PCRS = frozenset(range(16))


def _judge_time(at_time: datetime | None, claimed: datetime) -> datetime:
    """The time the AK chain is judged at, in UTC: the caller's ``at_time`` (an aware
    datetime in range: TypeError or ValueError naming it otherwise) or the run's end."""
    if at_time is None:
        return claimed.astimezone(UTC)  # bounded by the schema (aicert.model.check_time)
    return check_time(at_time, "at_time")


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
    policy: VerificationPolicy | None = None,
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
    ``policy``: a ``VerificationPolicy`` the verified report must meet (``aicert.policy``;
    ``PolicyError`` lists every failed rule).
    """
    # The caller's arguments first: a mistake there is a TypeError or ValueError naming the
    # argument, not a verification failure of the certificate.
    judge_time = _judge_time(at_time, certificate.run.finished_at)
    roots = load_trust_roots(trusted_roots)
    sets = reference_sets(reference_values)
    parent_certificates = load_parents(parents)
    thresholds = thresholds_of(expected_metrics)
    _check_policy_argument(policy)
    checks: list[Check] = []
    # 1. (the certificate's schema: aicert.model, before this function)
    # 2. AK certificate chain to a trusted root, at the run's time or the caller's.
    chain = _check_ak_certificate_chain(certificate, roots, judge_time, checks)
    # 3. The quoting key is the certified key, and a restricted signing key.
    _check_ak_public_key(certificate, chain.leaf, checks)
    # 4-5. Quote signature and TPMS_ATTEST contents.
    claimed_pcrs = _check_quote(certificate, checks)
    # 6. Application event log replay against PCR 14 and 15.
    boot_log = boot_log_of(certificate)
    start = logless_application_start(certificate, claimed_pcrs, boot_log, sets)
    measured = _check_application_event_log(certificate, claimed_pcrs, boot_log, checks, start)
    # 7. The statements the AK signed inside the machine (model_signing, SLSA provenance).
    _check_signed_statements(certificate, measured, checks)
    # 8. Platform.
    boot_attested, platform_note = verify_platform(
        certificate, claimed_pcrs, allow_dev_platform, boot_log, sets
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
        reference_values=sets,
    )
    lineage = _check_lineage(
        certificate, measured, parent_certificates, require_lineage, same_policy, checks
    )
    platform = (boot_attested, platform_note)
    report = _report(certificate, measured, chain, judge_time, claimed_pcrs, platform,
                     checks=tuple(checks), lineage=lineage, metrics=metrics)  # fmt: skip
    # 12. The caller's policy, on the verified report (every failed rule named).
    return _check_policy(report, policy)


def _check_policy_argument(policy: object) -> None:
    """A policy that is not a ``VerificationPolicy`` is the caller's mistake (TypeError)."""
    if policy is not None and not isinstance(policy, VerificationPolicy):
        raise TypeError(
            f"policy must be a VerificationPolicy (aicert.policy.load_policy(path)), "
            f"not {type(policy).__name__}"
        )


def _check_policy(
    report: VerificationReport, policy: VerificationPolicy | None
) -> VerificationReport:
    """Step 12: the verified report meets the caller's policy (``PolicyError`` otherwise)."""
    if policy is None:
        return report
    policy.check(report)
    return replace(report, checks=(*report.checks, Check("policy", "every rule of the policy met")))


def _report(
    certificate: Certificate,
    measured: MeasuredRun,
    chain: ChainVerification,
    judge_time: datetime,
    claimed_pcrs: Mapping[int, bytes],
    platform: tuple[bool, str],
    *,
    checks: tuple[Check, ...],
    lineage: tuple[LineageLink, ...],
    metrics: Mapping[str, float],
) -> VerificationReport:
    """The report of a verification that passed: the run as its replayed log measured it."""
    boot_attested, platform_note = platform
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
        checks=checks,
        lineage=lineage,
        metrics=dict(metrics),
        reference_values=certificate.platform.reference_values if boot_attested else None,
        gpus=measured.gpus,
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
    if measured.gpus is not None:
        count = len(measured.gpus.devices)
        checks.append(Check("gpus", f"{count} GPU(s) as the config asks, {GPU_FACTS_NOTE}"))
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
            certificate, certificate.attestation.quote.pcr_values(), boot_log_of(certificate)
        )
    except KeyError:
        raise PcrSelectionError("attestation.quote.pcrs lacks PCR 14 or 15") from None
    return _check_artifact(measured.output_records(), path)


__all__ = [
    "DEV_PLATFORM_NOTE",
    "Check",
    "TrustRoot",
    "VerificationError",
    "VerificationReport",
    "load_trust_roots",
    "verify_artifact",
    "verify_certificate",
]
