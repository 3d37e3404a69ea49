"""Producing reference-value sets (the image publisher's side): an Azure set derived from the
event log and PCR 0-9 of one boot of a gallery image version, sets of several boots merged into
one, the PCR values of a boot without an event log recorded into a set (Azure Trusted Launch
gives the guest a zero-byte log), and the PCR values those boots report read from JSON or
``tpm2_pcrread`` output.

``aicert reference-values derive-azure``, ``merge-azure`` and ``record-azure``
(:mod:`aicert.reference_values_cli`) run these on files; ``deployments/azure/README.md``
section 3 is the procedure. A derived set is reviewed before it is published: the derivation
takes the boot as good (after checking that the log replays to the PCRs and Secure Boot is on)
and records what it measured.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from aicert.appevents import INPUTS_PCR, check_application_pcrs_in_boot_log
from aicert.boot_events import (
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    classify_boot_events,
    describe_boot_event,
    replay_against_quote,
    sha256_digest,
)
from aicert.errors import EventLogError, PlatformError
from aicert.reference_value_sets import (
    AZURE_IMAGE_PCRS,
    BOOT_PCRS,
    DEFAULT_AZURE_UNCHECKED_REASONS,
    EVENT_KIND_COMPONENT,
    SECURE_BOOT_COMPONENT,
    AzureImage,
    AzurePcrBoot,
    AzureReferenceValueSet,
    ExpectedEvent,
    MokListEvent,
)
from aicert.tcg_eventlog import (
    EFI_GLOBAL_VARIABLE_GUID,
    TcgEventLog,
    decode_efi_variable,
    parse_event_log,
)

_PCRREAD_BANK = re.compile(r"^\s*([A-Za-z0-9_]+)\s*:\s*$")
_PCRREAD_VALUE = re.compile(r"^\s*([0-9]{1,2})\s*:\s*0x([0-9A-Fa-f]+)\s*$")


def _require_secure_boot(log: TcgEventLog) -> None:
    for event in log.events:
        if event.pcr != 7 or event.event_type != EV_EFI_VARIABLE_DRIVER_CONFIG:
            continue
        try:
            variable = decode_efi_variable(event.data)
        except EventLogError:
            continue
        if variable.variable_name == EFI_GLOBAL_VARIABLE_GUID and variable.unicode_name == (
            "SecureBoot"
        ):
            if variable.variable_data != b"\x01":
                raise PlatformError(
                    f"{SECURE_BOOT_COMPONENT}: Secure Boot is off in this boot (SecureBoot = "
                    f"{variable.variable_data.hex() or 'empty'}, event #{event.index}): derive "
                    "reference values from a Trusted Launch VM with Secure Boot on"
                )
            return
    raise PlatformError(
        f"{SECURE_BOOT_COMPONENT}: the log measures no SecureBoot variable: not a UEFI "
        "Secure Boot boot"
    )


def _boot_application_name(path: str, position: int, count: int) -> str:
    name = path.rsplit("\\", 1)[-1].lower()
    if name.startswith("shim"):
        return "boot loader (shim)"
    if name.startswith("grub"):
        return "boot loader (GRUB)"
    # GRUB hands the kernel to the firmware from memory: no file path, and the last one.
    if position == count - 1 and position > 0 and (not path or "vmlinu" in name):
        return "kernel"
    return f"boot application ({path or 'no file path'})"


def _reference_mok_events(log: TcgEventLog) -> list[MokListEvent]:
    """Shim's MOK-list events of a reference boot, with their digests: what its set lets a
    boot log carry outside PCR 0-9. Anything else there is refused (EventLogError in PCR 14
    and 15, PlatformError elsewhere): a certificate's boot log could not carry it either."""
    check_application_pcrs_in_boot_log(log)
    events: list[MokListEvent] = []
    for event in log.events:
        if event.pcr in BOOT_PCRS:
            continue
        if event.pcr != INPUTS_PCR:
            raise PlatformError(
                f"{describe_boot_event(event)}: a reference boot may log nothing outside PCR "
                "0-9 but shim's MOK lists in PCR 14"
            )
        variable = event.data.rstrip(b"\x00").decode("ascii")
        events.append(
            MokListEvent.model_validate(
                {"variable": variable, "sha256": [sha256_digest(event).hex()]}
            )
        )
    return events


def _default_reference_id(image_version_id: str) -> str:
    parts = image_version_id.strip("/").split("/")
    words = [parts[-3], parts[-1]] if len(parts) >= 4 else parts[-1:]
    slug = re.sub(r"[^a-z0-9._-]+", "-", "-".join(words).lower()).strip("-._")
    return slug[:128] or "azure-image"


def derive_azure_reference_values(
    event_log: bytes | TcgEventLog,
    quoted_pcrs: Mapping[int, bytes],
    *,
    image_version_id: str,
    reference_id: str | None = None,
    security_type: Literal["TrustedLaunch", "ConfidentialVM"] = "TrustedLaunch",
    check_firmware_pcrs: Iterable[int] = (),
    provenance: Mapping[str, Any] | None = None,
) -> AzureReferenceValueSet:
    """The Azure reference-value set of one boot: what the image publisher runs on the event
    log and PCR 0-9 of a VM made from the new gallery image version.

    The log must replay to ``quoted_pcrs`` (else EventLogError) and show Secure Boot on (else
    PlatformError). PCR 4, 7, 8 and 9 are checked with their values in this boot, and each
    component event in them becomes an expected event; firmware PCRs in
    ``check_firmware_pcrs`` are checked with this boot's value, the others are listed as
    unchecked with the reasons of ``DEFAULT_AZURE_UNCHECKED_REASONS``. Join the sets of several
    VMs with :func:`merge_azure_reference_values` to accept each value they measured.
    """
    raw = event_log if isinstance(event_log, bytes | bytearray) else None
    log = parse_event_log(bytes(raw)) if raw is not None else event_log
    if not isinstance(log, TcgEventLog):
        raise TypeError(f"event_log must be bytes or a TcgEventLog, not {type(log).__name__}")
    replay_against_quote(log, quoted_pcrs)
    _require_secure_boot(log)
    mok_events = _reference_mok_events(log)
    firmware = sorted(set(check_firmware_pcrs))
    if not set(firmware) <= set(DEFAULT_AZURE_UNCHECKED_REASONS):
        raise ValueError(
            f"check_firmware_pcrs: {firmware} are not all firmware PCRs "
            f"{sorted(DEFAULT_AZURE_UNCHECKED_REASONS)} (PCR 4, 7, 8, 9 are always checked)"
        )
    checked = sorted({*AZURE_IMAGE_PCRS, *firmware})
    measured = [event for event in classify_boot_events(log) if event.pcr in checked]
    applications = [event for event in measured if event.kind == "boot_application"]
    expected: list[ExpectedEvent] = []
    for event in measured:
        if event.kind == "boot_application":
            position = applications.index(event)
            component = _boot_application_name(event.description, position, len(applications))
        else:
            component = EVENT_KIND_COMPONENT[event.kind]
        expected.append(
            ExpectedEvent(
                pcr=event.pcr,
                kind=event.kind,
                component=component,
                description=event.description[:4096],
                sha256=[event.digest.hex()],
            )
        )
    derived: dict[str, Any] = {
        "derived_by": "aicert.reference_values derive-azure",
        "derived_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "boots": 1,
        "events": len(log.events),
    }
    if raw is not None:
        derived["event_log_sha256"] = hashlib.sha256(raw).hexdigest()
    return AzureReferenceValueSet(
        id=reference_id or _default_reference_id(image_version_id),
        platform="azure",
        image=AzureImage(gallery_image_version_id=image_version_id, security_type=security_type),
        pcrs={str(index): [bytes(quoted_pcrs[index]).hex()] for index in checked},
        unchecked_pcrs={
            str(index): reason
            for index, reason in DEFAULT_AZURE_UNCHECKED_REASONS.items()
            if index not in checked
        },
        events=expected,
        mok_events=mok_events,
        provenance={**derived, **dict(provenance or {})},
    )


def _union(lists: Iterable[Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(value for values in lists for value in values))


def merge_azure_reference_values(
    sets: Sequence[AzureReferenceValueSet],
) -> AzureReferenceValueSet:
    """One set accepting every value the given sets (boots of the same image version on
    several VMs, sizes, regions or dates) accept. They must be for the same id and image, check
    the same PCRs and list the same components (else PlatformError: a boot that measured other
    components is not the same boot chain, and its set must be reviewed, not merged)."""
    if not sets:
        raise ValueError("no reference-value sets to merge")
    first = sets[0]

    def shape(reference: AzureReferenceValueSet) -> list[tuple[int, str, str]]:
        return [(event.pcr, event.kind, event.component) for event in reference.events]

    def mok_shape(reference: AzureReferenceValueSet) -> list[str]:
        return [event.variable for event in reference.mok_events]

    for other in sets[1:]:
        for what, mine, theirs in (
            ("id", first.id, other.id),
            ("image", first.image, other.image),
            ("checked PCRs", first.checked_pcrs(), other.checked_pcrs()),
            ("components", shape(first), shape(other)),
            ("MOK lists", mok_shape(first), mok_shape(other)),
        ):
            if mine != theirs:
                raise PlatformError(
                    f"reference values {first.id}: cannot merge sets with different {what} "
                    f"({mine} vs {theirs})"
                )
    events = [
        event.model_copy(update={"sha256": _union(same.sha256 for same in group)})
        for event, *rest in zip(*(reference.events for reference in sets), strict=True)
        for group in [[event, *rest]]
    ]
    return AzureReferenceValueSet(
        id=first.id,
        platform="azure",
        image=first.image,
        pcrs={index: _union(reference.pcrs[index] for reference in sets) for index in first.pcrs},
        unchecked_pcrs=dict(first.unchecked_pcrs),
        events=events,
        mok_events=[
            event.model_copy(update={"sha256": _union(same.sha256 for same in group)})
            for event, *rest in zip(*(reference.mok_events for reference in sets), strict=True)
            for group in [[event, *rest]]
        ],
        pcr_boots=[boot for reference in sets for boot in reference.pcr_boots],
        provenance={"merged_from": [reference.provenance for reference in sets]},
    )


def record_azure_pcr_boot(
    boot_pcrs: Mapping[int, bytes],
    *,
    vm_family: str,
    reference: AzureReferenceValueSet | None = None,
    image_version_id: str | None = None,
    reference_id: str | None = None,
    security_type: Literal["TrustedLaunch", "ConfidentialVM"] = "TrustedLaunch",
    pin_firmware_pcrs: Iterable[int] = (),
    provenance: Mapping[str, Any] | None = None,
) -> AzureReferenceValueSet:
    """An Azure set that judges boots without an event log by the PCR values of a reference
    boot: ``boot_pcrs`` holds PCR 0-9 and PCR 14 of a freshly booted VM of the image on
    ``vm_family``, read before the agent's first event (the agent extends PCR 14 when it
    starts serving; read them from the image's first boot, e.g. ``tpm2_pcrread
    sha256:0-9,14`` with the agent not started, or a quote over them).

    With ``reference`` (an existing set of the image): a new entry of its ``pcr_boots``; the
    boot's value of each PCR the set checks must be one it accepts (else PlatformError: the
    boot is not the set's image, derive or merge it first). Without: a new set for
    ``image_version_id`` checking PCR 4, 7, 8, 9 (and ``pin_firmware_pcrs``) with this boot's
    values and no component events (there is no log to take them from).
    """
    if missing := [index for index in (*BOOT_PCRS, INPUTS_PCR) if index not in boot_pcrs]:
        raise ValueError(f"PCR values: PCR {missing} missing (need 0-9 and 14)")
    firmware = sorted(set(pin_firmware_pcrs))
    if not set(firmware) <= set(DEFAULT_AZURE_UNCHECKED_REASONS):
        raise ValueError(
            f"pin_firmware_pcrs: {firmware} are not all firmware PCRs "
            f"{sorted(DEFAULT_AZURE_UNCHECKED_REASONS)}"
        )
    recorded = {
        "recorded_by": "aicert.reference_values record-azure",
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **dict(provenance or {}),
    }
    if reference is None:
        if image_version_id is None:
            raise ValueError("give the image version, or an existing set to add the boot to")
        checked = sorted({*AZURE_IMAGE_PCRS, *firmware})
        reference = AzureReferenceValueSet(
            id=reference_id or _default_reference_id(image_version_id),
            platform="azure",
            image=AzureImage(
                gallery_image_version_id=image_version_id, security_type=security_type
            ),
            pcrs={str(index): [bytes(boot_pcrs[index]).hex()] for index in checked},
            unchecked_pcrs={
                str(index): reason
                for index, reason in DEFAULT_AZURE_UNCHECKED_REASONS.items()
                if index not in checked
            },
            provenance={"derived_by": "aicert.reference_values record-azure"},
        )
    pinned = sorted({*reference.checked_pcrs(), *firmware})
    boot = AzurePcrBoot(
        vm_family=vm_family,
        pcrs={str(index): bytes(boot_pcrs[index]).hex() for index in pinned},
        pcr14_start=bytes(boot_pcrs[INPUTS_PCR]).hex(),
        provenance=recorded,
    )
    try:
        return AzureReferenceValueSet.model_validate(
            {**reference.model_dump(), "pcr_boots": [*reference.model_dump()["pcr_boots"], boot]}
        )
    except ValueError as exc:
        raise PlatformError(f"reference values {reference.id}: this boot: {exc}") from None


def parse_pcr_values(text: str) -> dict[int, bytes]:
    """SHA-256 PCR values from JSON (``{"0": "hex", ...}``, or that under a ``"sha256"`` key)
    or from the output of ``tpm2_pcrread sha256:0,1,...`` (its ``sha256:`` section). Raises
    ValueError naming what is wrong."""
    stripped = text.strip()
    values: dict[int, bytes] = {}
    if stripped.startswith("{"):
        data = json.loads(stripped)
        if isinstance(data, dict) and isinstance(data.get("sha256"), dict):
            data = data["sha256"]
        if not isinstance(data, dict):
            raise ValueError("PCR values: expected a JSON object of PCR index -> hex")
        for key, value in data.items():
            if not (isinstance(key, str) and key.isdigit() and isinstance(value, str)):
                raise ValueError(f'PCR values: entry {key!r}: expected "index": "hex"')
            values[int(key)] = _pcr_value(key, value)
    else:
        bank = None
        for line in text.splitlines():
            if header := _PCRREAD_BANK.match(line):
                bank = header.group(1).lower()
            elif (match := _PCRREAD_VALUE.match(line)) and bank == "sha256":
                values[int(match.group(1))] = _pcr_value(match.group(1), match.group(2))
    if not values:
        raise ValueError("PCR values: none found (JSON, or tpm2_pcrread output with sha256)")
    return values


def _pcr_value(index: str, value: str) -> bytes:
    try:
        raw = bytes.fromhex(value.lower().removeprefix("0x"))
    except ValueError:
        raise ValueError(f"PCR {index}: not hex: {value!r}") from None
    if len(raw) != 32:
        raise ValueError(f"PCR {index}: {len(raw)} bytes, a SHA-256 PCR has 32")
    return raw
