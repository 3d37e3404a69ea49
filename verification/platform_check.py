"""Step 8 of verification, the platform: what booted the machine, judged against the
caller's reference values.

- ``local``: a software TPM on the build host; PCR 0-13 must be in their reset state, no boot
  log may be attached, and the caller must accept it explicitly (``allow_dev_platform``).
- ``qemu``, ``gcp`` and ``azure`` with a boot log: the log replays to the quoted PCRs, then
  each measured component is judged against the reference-value set the certificate names
  (``aicert.boot_log_check``).
- ``azure`` without a log (Trusted Launch hands the guest zero bytes): the quoted PCRs are
  compared with the set's recorded boots (``aicert.boot_pcr_check``).

Also the choice of that set among the caller's, shared by the application log's replay (an
Azure boot without a log starts PCR 14 at its reference value).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from aicert.boot_events import replay_against_quote
from aicert.boot_log_check import check_boot_log
from aicert.boot_pcr_check import boot_application_start, check_azure_boot_pcrs
from aicert.errors import PlatformError
from aicert.model import Certificate
from aicert.reference_value_sets import REFERENCE_VALUE_SET_TYPES, PlatformReferenceValues
from aicert.tcg_eventlog import TcgEventLog, parse_event_log

DEV_PLATFORM_NOTE = (
    "local platform: software TPM on the build host, no boot chain attested; this "
    "certificate proves what the AICert agent measured, not which OS or firmware ran it"
)
"""The platform note of every verified local-platform certificate."""


_LOAD_HINT = "aicert.reference_values.load_reference_values(path)"


def reference_sets(
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


def boot_log_of(certificate: Certificate) -> TcgEventLog | None:
    """The certificate's boot event log, parsed once for both checks that read it. The local
    platform has no boot: its platform check refuses a boot log if one is attached."""
    # Zero bytes (an Azure Trusted Launch VM's log) is no log: there is nothing to replay.
    if certificate.platform.kind == "local" or not certificate.boot_event_log:
        return None
    return parse_event_log(certificate.boot_event_log)


def logless_application_start(
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
    reference = select_reference_values(certificate, reference_sets)
    return boot_application_start(None, quoted, reference)


def verify_platform(
    certificate: Certificate,
    pcrs: Mapping[int, bytes],
    allow_dev_platform: bool,
    log: TcgEventLog | None,
    reference_values: PlatformReferenceValues | Iterable[PlatformReferenceValues] | None = None,
) -> tuple[bool, str]:
    """Step 8: judge the platform the certificate names; whether a boot chain was attested,
    and the report's platform note.

    Args:
        certificate: the certificate, its quote, event log and AK already verified.
        pcrs: the quoted PCR values.
        allow_dev_platform: accept a ``local`` certificate (no boot chain attested).
        log: the parsed boot event log (:func:`boot_log_of`), or None.
        reference_values: the caller's reference-value sets.

    Raises:
        PlatformError: the platform's evidence does not hold (or a subclass naming the
            component, PCR or reference value that differs).
    """
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
        reference = select_reference_values(certificate, reference_values)
        return True, check_azure_boot_pcrs(pcrs, reference).note
    if log is None:
        raise PlatformError(f"{kind} platform: the certificate has no boot event log")
    # Before the reference is chosen: a log that does not replay is refused as such.
    replay_against_quote(log, pcrs)
    reference = select_reference_values(certificate, reference_values)
    # Names the component that differs: kernel command line, initrd, kernel, boot loader,
    # Secure Boot policy (PCR 7), firmware (PCR n); an azure note lists the unchecked PCRs.
    return True, check_boot_log(log, pcrs, reference).note


def select_reference_values(
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
