"""The check of a boot event log against a reference-value set, and of a platform quote.

``check_boot_log`` replays the log against the quoted PCR 0-9, refuses anything outside PCR 0-9
that the set does not list (:func:`check_events_outside_boot_pcrs`), and then compares each
component, raising :class:`PlatformError` that names the first component that differs:
"kernel command line", "initrd", "kernel", "boot loader (...)", "Secure Boot policy (PCR 7)",
"firmware (PCR n)".

For a qemu set (:class:`ReferenceValueSet`): PCR 9 must hold exactly the kernel command line
and the initrd the set predicts, PCR 4 exactly the kernel it observed, and PCR 0-9 the values
it observed. For an Azure set (:class:`AzureReferenceValueSet`): the component events of the
checked PCRs must be those the set lists, each with an accepted digest, and every checked PCR
one of its accepted values; the PCRs it leaves unchecked are named in the report with the
reasons.

:func:`check_boot_evidence` judges a machine's boot whether or not it sent a log (an Azure
Trusted Launch VM sends zero bytes: :mod:`aicert.boot_pcr_check`).

:func:`verify_platform_quote` is the one definition of the platform-quote check (a quote asked
before the workload, over ``platform_quote_nonce(challenge)``) that the orchestrator and the
image build call.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar, overload

from aicert.appevents import check_application_pcrs_in_boot_log
from aicert.boot_events import (
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EVENT_TAG,
    EV_IPL,
    EV_NO_ACTION,
    MeasuredEvent,
    classify_boot_events,
    describe_boot_event,
    replay_against_quote,
    sha256_digest,
)
from aicert.boot_pcr_check import AzurePcrBootReport, check_azure_boot_pcrs, unchecked_note
from aicert.errors import PlatformError
from aicert.quote import verify_quote
from aicert.reference_value_sets import (
    AZURE_PCR_COMPONENTS,
    BOOT_PCRS,
    EVENT_KIND_COMPONENT,
    EVENT_KIND_PCRS,
    FIRMWARE_PCRS,
    AzureReferenceValueSet,
    ExpectedEvent,
    PlatformReferenceValues,
    ReferenceValueSet,
)
from aicert.tcg_eventlog import (
    LINUX_EFI_INITRD_EVENT_ID,
    LINUX_EFI_LOAD_OPTIONS_EVENT_ID,
    TcgEventLog,
    decode_tagged_event,
    parse_event_log,
)

# The extraData of a platform quote (a quote asked before the workload, to check the boot
# chain) is SHA-256 over this context and the orchestrator's challenge: never equal to a run
# nonce, so a platform quote cannot stand in for a certificate's quote.
PLATFORM_QUOTE_CONTEXT = b"aicert/platform-quote/v1\x00"

# How an error counts the events of each kind.
_KIND_WHAT = {
    "boot_application": "boot applications (EV_EFI_BOOT_SERVICES_APPLICATION)",
    "secure_boot_variable": "Secure Boot variables (EV_EFI_VARIABLE_DRIVER_CONFIG)",
    "secure_boot_authority": "Secure Boot authorities (EV_EFI_VARIABLE_AUTHORITY)",
    "kernel_command_line": "kernel command line events",
    "kernel_file": "kernel file events",
    "initrd": "initrd events",
}
# An expected or a measured component event, grouped by PCR and kind.
_Grouped = TypeVar("_Grouped", ExpectedEvent, MeasuredEvent)
# The order the Azure check visits the kinds of component events in.
_KIND_ORDER = {kind: rank for rank, kind in enumerate(EVENT_KIND_PCRS)}


def platform_quote_nonce(challenge: bytes) -> bytes:
    """The extraData of a platform quote over ``challenge`` (see PLATFORM_QUOTE_CONTEXT)."""
    return hashlib.sha256(PLATFORM_QUOTE_CONTEXT + bytes(challenge)).digest()


@dataclass(frozen=True)
class BootChainReport:
    """What a boot event log was found to attest."""

    reference_id: str
    kernel_pcr4_digest: str
    initrd_sha256: str
    load_options_sha256: str
    events: int

    @property
    def note(self) -> str:
        """One line for a person: what matched, and (Azure) what was not checked."""
        return (
            f"boot chain matches reference values {self.reference_id}: firmware PCR 0-7, "
            f"kernel {self.kernel_pcr4_digest[:16]}..., initrd {self.initrd_sha256[:16]}..., "
            "kernel command line"
        )


def check_events_outside_boot_pcrs(log: TcgEventLog, reference: PlatformReferenceValues) -> None:
    """The boot log carries, outside PCR 0-9, exactly the events ``reference.mok_events``
    lists, in that order, each with an accepted SHA-256 digest.

    Every event counts, ``EV_NO_ACTION`` included, in any PCR from 10 up (PCR 16-23 are not
    quoted and PCR 10-13 are not replayed, so nothing else would ever judge them); an event
    the set does not list, one whose digest it does not accept, or one it lists that the log
    lacks is a ``PlatformError`` naming the PCR and the event index: the boot is not the
    reference boot. Only the SHA-256 digest is judged: it is the bank the quote covers, and
    the other banks' digests cannot be recomputed from the log (shim logs the name of a MOK
    list, not its content). Before that, anything in PCR 14/15 that is not shim's is an
    ``EventLogError`` (``check_application_pcrs_in_boot_log``): the application event log is
    the only source of application events, whatever a set lists.
    """
    check_application_pcrs_in_boot_log(log)
    allowed = list(reference.mok_events)
    outside = [event for event in log.events if event.pcr not in BOOT_PCRS]
    for position, event in enumerate(outside):
        where = describe_boot_event(event)
        if position >= len(allowed):
            listed = ", ".join(f"PCR {e.pcr} {e.variable}" for e in allowed) or "nothing"
            raise PlatformError(
                f"{where}: reference values {reference.id} list {listed} outside PCR 0-9, "
                "and this event is not one of them"
            )
        want = allowed[position]
        expected_data = want.variable.encode("ascii") + b"\x00"
        if event.pcr != want.pcr or event.event_type != EV_IPL or event.data != expected_data:
            raise PlatformError(
                f"{where}: reference values {reference.id} expect shim's EV_IPL "
                f"{want.variable} in PCR {want.pcr} here"
            )
        digest = sha256_digest(event).hex()
        if digest not in want.sha256:
            raise PlatformError(
                f"{where}: measured {digest}, not one of the {len(want.sha256)} digest(s) "
                f"reference values {reference.id} accept for {want.variable} "
                f"({', '.join(want.sha256)})"
            )
    if len(outside) < len(allowed):
        missing = ", ".join(e.variable for e in allowed[len(outside) :])
        raise PlatformError(
            f"boot event log: PCR {allowed[len(outside)].pcr}: shim's {missing} measurement(s), "
            f"which reference "
            f"values {reference.id} list, are not in the log"
        )


def _check_pcr9(log: TcgEventLog, reference: ReferenceValueSet) -> None:
    load_options: list[bytes] = []
    initrds: list[bytes] = []
    for event in log.events:
        if event.pcr != 9 or event.event_type == EV_NO_ACTION:
            continue
        tag = decode_tagged_event(event.data) if event.event_type == EV_EVENT_TAG else None
        if tag is not None and tag.tagged_event_id == LINUX_EFI_LOAD_OPTIONS_EVENT_ID:
            load_options.append(sha256_digest(event))
        elif tag is not None and tag.tagged_event_id == LINUX_EFI_INITRD_EVENT_ID:
            initrds.append(sha256_digest(event))
        else:
            raise PlatformError(
                f"kernel measurements (PCR 9): unexpected {event.event_type_name} event "
                f"#{event.index}: a boot of the reference image logs only the command line "
                "and the initrd there"
            )
    expected_options = bytes.fromhex(reference.load_options_sha256)
    if len(load_options) != 1:
        raise PlatformError(
            f"kernel command line: {len(load_options)} LOADED_IMAGE::LoadOptions events in "
            "PCR 9, expected exactly 1"
        )
    if not hmac.compare_digest(load_options[0], expected_options):
        raise PlatformError(
            f"kernel command line: measured digest {load_options[0].hex()} differs from the "
            f"reference {expected_options.hex()} ({reference.load_options!r})"
        )
    expected_initrd = bytes.fromhex(reference.initrd_sha256)
    if len(initrds) != 1:
        raise PlatformError(
            f"initrd: {len(initrds)} 'Linux initrd' events in PCR 9, expected exactly 1"
        )
    if not hmac.compare_digest(initrds[0], expected_initrd):
        raise PlatformError(
            f"initrd: measured SHA-256 {initrds[0].hex()} differs from the reference "
            f"{reference.initrd_sha256}"
        )


def _check_kernel(log: TcgEventLog, reference: ReferenceValueSet) -> bytes:
    if reference.kernel_pcr4_digest is None:
        raise PlatformError(
            f"kernel: reference values {reference.id} have no PCR 4 kernel digest "
            "(boot the image once to observe it)"
        )
    applications = [
        event
        for event in log.events
        if event.pcr == 4 and event.event_type == EV_EFI_BOOT_SERVICES_APPLICATION
    ]
    if len(applications) != 1:
        raise PlatformError(
            f"kernel: {len(applications)} boot applications measured in PCR 4, "
            "expected exactly the kernel"
        )
    measured = sha256_digest(applications[0])
    if not hmac.compare_digest(measured, bytes.fromhex(reference.kernel_pcr4_digest)):
        raise PlatformError(
            f"kernel: measured digest {measured.hex()} differs from the reference "
            f"{reference.kernel_pcr4_digest} ({reference.kernel_pcr4_digest_source})"
        )
    return measured


def _pcr_component(index: int) -> str:
    if index in FIRMWARE_PCRS:
        return f"firmware (PCR {index})"
    if index == 8:
        return "boot loader (PCR 8)"
    return "kernel measurements (PCR 9)"


def _check_qemu_boot_log(
    log: TcgEventLog, quoted_pcrs: Mapping[int, bytes], reference: ReferenceValueSet
) -> BootChainReport:
    """Check a boot event log against quoted PCR 0-9 and a reference-value set.

    The log must replay to the quoted PCR 0-9 (else EventLogError); then the command line,
    the initrd, the kernel and the firmware PCRs must equal the reference (else PlatformError
    naming that component). The quote itself is the caller's check (``verify_quote``).
    """
    replay_against_quote(log, quoted_pcrs)
    check_events_outside_boot_pcrs(log, reference)
    if not reference.observed or set(reference.pcrs) != {str(i) for i in BOOT_PCRS}:
        raise PlatformError(
            f"firmware: reference values {reference.id} hold no observed PCR 0-9 values "
            "(boot the image once to observe them)"
        )
    # Components first, so that the error names what changed rather than the PCR it lands in.
    _check_pcr9(log, reference)
    kernel = _check_kernel(log, reference)
    expected = reference.pcr_values()
    for index in BOOT_PCRS:
        if not hmac.compare_digest(bytes(quoted_pcrs[index]), expected[index]):
            raise PlatformError(
                f"{_pcr_component(index)}: quoted {bytes(quoted_pcrs[index]).hex()}, the "
                f"reference values {reference.id} observed {expected[index].hex()}"
            )
    return BootChainReport(
        reference_id=reference.id,
        kernel_pcr4_digest=kernel.hex(),
        initrd_sha256=reference.initrd_sha256,
        load_options_sha256=reference.load_options_sha256,
        events=len(log.events),
    )


@dataclass(frozen=True)
class AzureBootChainReport:
    """What a boot event log was found to attest against an Azure reference-value set."""

    reference_id: str
    image_version_id: str
    checked_pcrs: tuple[int, ...]
    unchecked_pcrs: tuple[tuple[int, str], ...]
    components: tuple[str, ...]
    events: int
    platform_name: str = "Azure"  # the set's cloud, as a person names it (a gcp set: Google Cloud)

    @property
    def note(self) -> str:
        """One line for a person: what matched, and (Azure) what was not checked."""
        checked = ", ".join(str(index) for index in self.checked_pcrs)
        text = (
            f"boot chain matches {self.platform_name} reference values {self.reference_id} (image "
            f"{self.image_version_id}): PCR {checked} checked"
        )
        if self.components:
            text += f" ({', '.join(self.components)})"
        return text + unchecked_note(self.unchecked_pcrs)


def _group(events: Iterable[_Grouped]) -> dict[tuple[int, str], list[_Grouped]]:
    groups: dict[tuple[int, str], list[_Grouped]] = {}
    for event in events:
        groups.setdefault((event.pcr, event.kind), []).append(event)
    return groups


def _check_azure_components(
    measured: Sequence[MeasuredEvent], reference: AzureReferenceValueSet
) -> None:
    expected_groups = _group(reference.events)
    measured_groups = _group(measured)
    for key in sorted(
        set(expected_groups) | set(measured_groups),
        key=lambda key: (key[0], _KIND_ORDER[key[1]]),
    ):
        pcr, kind = key
        expected: list[ExpectedEvent] = expected_groups.get(key, [])
        found: list[MeasuredEvent] = measured_groups.get(key, [])
        if len(expected) != len(found):
            names = list(dict.fromkeys(event.component for event in expected))
            component = names[0] if len(names) == 1 else EVENT_KIND_COMPONENT[kind]
            listed = ", ".join(event.component for event in expected) or "none"
            logged = ", ".join(f"#{event.index} {event.description}".strip() for event in found)
            raise PlatformError(
                f"{component}: the log has {len(found)} {_KIND_WHAT[kind]} in PCR {pcr} "
                f"({logged or 'none'}), reference values {reference.id} list "
                f"{len(expected)} ({listed})"
            )
        for want, got in zip(expected, found, strict=True):
            if got.digest.hex() not in want.sha256:
                named = f"{want.description}: " if want.description else ""
                logged = (
                    f" (the log describes it as {got.description!r})"
                    if got.description != want.description
                    else ""
                )
                raise PlatformError(
                    f"{want.component}: {named}event #{got.index} in PCR {pcr} measured "
                    f"{got.digest.hex()}{logged}, not one of the {len(want.sha256)} digest(s) "
                    f"reference values {reference.id} accept ({', '.join(want.sha256)})"
                )


def _azure_pcr_component(index: int) -> str:
    return AZURE_PCR_COMPONENTS.get(index, f"firmware (PCR {index})")


def check_azure_boot_log(
    log: TcgEventLog, quoted_pcrs: Mapping[int, bytes], reference: AzureReferenceValueSet
) -> AzureBootChainReport:
    """Check an Azure VM's boot event log against quoted PCR 0-9 and an Azure set.

    The log must replay to the quoted PCR 0-9 (else EventLogError). Then the component events
    of the checked PCRs must be those the reference lists, in number and order, each with an
    accepted digest, and every checked PCR must hold one of its accepted values (else
    PlatformError naming the component, or the PCR). PCRs in ``unchecked_pcrs`` are not
    compared, and the report's note lists them with the reasons.
    """
    replay_against_quote(log, quoted_pcrs)
    check_events_outside_boot_pcrs(log, reference)
    checked = reference.checked_pcrs()
    measured = [event for event in classify_boot_events(log) if event.pcr in checked]
    # Components first, so that the error names what changed rather than the PCR it lands in.
    _check_azure_components(measured, reference)
    accepted = reference.accepted_pcr_values()
    for index in checked:
        quoted = bytes(quoted_pcrs[index])
        if not any(hmac.compare_digest(quoted, value) for value in accepted[index]):
            raise PlatformError(
                f"{_azure_pcr_component(index)}: quoted PCR {index} {quoted.hex()} is not one "
                f"of the {len(accepted[index])} value(s) reference values {reference.id} accept"
            )
    return AzureBootChainReport(
        reference_id=reference.id,
        image_version_id=reference.image_name(),
        platform_name="Google Cloud" if reference.platform == "gcp" else "Azure",
        checked_pcrs=checked,
        unchecked_pcrs=tuple(
            (int(index), reason) for index, reason in sorted(reference.unchecked_pcrs.items())
        ),
        components=tuple(dict.fromkeys(event.component for event in reference.events)),
        events=len(log.events),
    )


# --- Either platform ---------------------------------------------------------------------------

BootReport = BootChainReport | AzureBootChainReport


@overload
def check_boot_log(
    log: TcgEventLog, quoted_pcrs: Mapping[int, bytes], reference: ReferenceValueSet
) -> BootChainReport: ...
@overload
def check_boot_log(
    log: TcgEventLog, quoted_pcrs: Mapping[int, bytes], reference: AzureReferenceValueSet
) -> AzureBootChainReport: ...
def check_boot_log(
    log: TcgEventLog, quoted_pcrs: Mapping[int, bytes], reference: PlatformReferenceValues
) -> BootReport:
    """Check a boot event log against quoted PCR 0-9 and a reference-value set of either
    platform (see :func:`check_azure_boot_log` for Azure).

    The log must replay to the quoted PCR 0-9 (else EventLogError) and carry nothing outside
    PCR 0-9 but the set's ``mok_events`` (see :func:`check_events_outside_boot_pcrs`:
    EventLogError for anything but shim's events in PCR 14/15, PlatformError otherwise); then
    the command line, the initrd, the kernel and the firmware PCRs must equal the reference
    (else PlatformError naming that component). The quote itself is the caller's check
    (``verify_quote``).
    """
    if isinstance(reference, AzureReferenceValueSet):
        return check_azure_boot_log(log, quoted_pcrs, reference)
    if not isinstance(reference, ReferenceValueSet):
        raise TypeError(f"not a reference-value set: {type(reference).__name__}")
    return _check_qemu_boot_log(log, quoted_pcrs, reference)


def verify_platform_quote(
    *,
    attest: bytes,
    signature: bytes,
    ak_public: bytes,
    challenge: bytes,
    pcrs: Mapping[int, bytes],
    boot_event_log: bytes | None,
    reference: PlatformReferenceValues,
) -> BootReport | AzurePcrBootReport:
    """Check a platform quote (asked with ``challenge`` before the workload) and its boot
    event log against ``reference``. The caller has already established that ``ak_public``
    is the machine's certified AK.

    Args:
        attest: the quote's TPMS_ATTEST bytes.
        signature: its TPMT_SIGNATURE bytes.
        ak_public: the AK's TPM2B_PUBLIC that signed it.
        challenge: the orchestrator's challenge; the quote's extraData must be
            :func:`platform_quote_nonce` of it.
        pcrs: the PCR values the quote covers (PCR 0-9 at least).
        boot_event_log: the machine's TCG boot event log (None or empty: an Azure boot
            is then judged by its PCR values, see :func:`check_boot_evidence`).
        reference: the reference-value set of the machine's image.

    Returns:
        The report of :func:`check_boot_log` (its type follows ``reference``'s platform).

    Raises:
        VerificationError: the quote does not verify (a subclass naming why), the log is
            missing or does not replay (``PlatformError``, ``EventLogError``), or the boot
            differs from the reference (``PlatformError`` naming the component).
    """
    verify_quote(attest, signature, ak_public, platform_quote_nonce(challenge), pcrs)
    return check_boot_evidence(boot_event_log, pcrs, reference)


def check_boot_evidence(
    boot_event_log: bytes | None,
    quoted_pcrs: Mapping[int, bytes],
    reference: PlatformReferenceValues,
) -> BootReport | AzurePcrBootReport:
    """Judge a machine's boot: its event log replayed and checked (:func:`check_boot_log`)
    when it sent one; an Azure boot without one (None, or the zero bytes Trusted Launch
    gives) by its quoted PCR values (:func:`aicert.boot_pcr_check.check_azure_boot_pcrs`).

    Raises:
        PlatformError: a qemu machine sent no log (its boot is always logged), or the boot
            differs from the reference (a subclass naming the PCRs for a boot without a log).
        EventLogError: the log does not parse or replay.
    """
    if boot_event_log:
        return check_boot_log(parse_event_log(boot_event_log), quoted_pcrs, reference)
    # Only Azure boots may come without a log: a gcp set (an Azure subclass) has no pcr_boots.
    if isinstance(reference, AzureReferenceValueSet) and reference.platform == "azure":
        return check_azure_boot_pcrs(quoted_pcrs, reference)
    raise PlatformError(f"{reference.platform} platform: the machine sent no boot event log")
