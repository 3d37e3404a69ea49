"""What a boot event log may carry outside PCR 0-9: exactly the ``mok_events`` of the set.

Shim measures its MOK lists into PCR 14 (``EV_IPL`` "MokList", "MokListX", "MokListTrusted"),
where the application's replay starts. A reference-value set records those events with the
reference boot's digests; anything else outside PCR 0-9, in any PCR from 10 up, is refused.
"""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from aicert.errors import EventLogError, PlatformError
from aicert.reference_values import (
    AzureReferenceValueSet,
    MokListEvent,
    check_boot_log,
    check_events_outside_boot_pcrs,
    derive_azure_reference_values,
    merge_azure_reference_values,
)
from aicert.tcg_eventlog import parse_event_log

from .eventlogs import (
    EV_IPL,
    IMAGE_VERSION_ID,
    MAIN_LOG,
    REFERENCE_ID,
    minimal_qemu_set,
    read_log,
    replayed_pcrs,
    with_event_inserted,
    with_other_digest,
    without_event,
)

EV_NO_ACTION = 0x00000003


def derive(raw: bytes) -> AzureReferenceValueSet:
    return derive_azure_reference_values(
        raw, replayed_pcrs(raw), image_version_id=IMAGE_VERSION_ID, reference_id=REFERENCE_ID
    )


def mok_events_of(raw: bytes) -> list[tuple[int, str, str]]:
    return [
        (event.index, event.data.rstrip(b"\x00").decode(), event.digests["sha256"].hex())
        for event in parse_event_log(raw).events
        if event.pcr == 14
    ]


def last_index(raw: bytes) -> int:
    return parse_event_log(raw).events[-1].index


def test_derivation_records_shims_mok_events_with_their_digests() -> None:
    raw = read_log(MAIN_LOG)
    reference = derive(raw)
    assert [(e.pcr, e.variable, e.sha256) for e in reference.mok_events] == [
        (14, name, [digest]) for _index, name, digest in mok_events_of(raw)
    ]
    assert [e.variable for e in reference.mok_events] == ["MokList", "MokListX", "MokListTrusted"]
    check_boot_log(parse_event_log(raw), replayed_pcrs(raw), reference)


def test_a_reference_boot_with_another_event_outside_pcr_0_9_is_not_derived() -> None:
    raw = read_log(MAIN_LOG)
    extra = with_event_inserted(raw, last_index(raw), 17, EV_IPL, b"vendor\x00", b"vendor")
    with pytest.raises(PlatformError, match=r"^boot event log: PCR 17 event #\d+"):
        derive(extra)
    in_15 = with_event_inserted(raw, last_index(raw), 15, EV_IPL, b"x\x00", b"x")
    with pytest.raises(EventLogError, match=r"^boot event log: PCR 15 event #\d+"):
        derive(in_15)


def test_a_mok_event_with_another_digest_is_named() -> None:
    raw = read_log(MAIN_LOG)
    reference = derive(raw)
    index, name, _digest = mok_events_of(raw)[1]
    edited = with_other_digest(raw, index)
    with pytest.raises(
        PlatformError,
        match=rf"^boot event log: PCR 14 event #{index} \(EV_IPL {name}\): measured "
        rf"{hashlib.sha256(b'another component').hexdigest()}, not one of the 1 digest",
    ):
        check_events_outside_boot_pcrs(parse_event_log(edited), reference)


def test_a_listed_mok_event_missing_from_the_log_is_refused() -> None:
    raw = read_log(MAIN_LOG)
    reference = derive(raw)
    index, _name, _digest = mok_events_of(raw)[-1]
    with pytest.raises(PlatformError, match=r"shim's MokListTrusted measurement\(s\).*not in"):
        check_events_outside_boot_pcrs(parse_event_log(without_event(raw, index)), reference)


@pytest.mark.parametrize("pcr", [10, 11, 12, 13, 16, 20, 23])
def test_any_unlisted_event_from_pcr_10_up_is_refused(pcr: int) -> None:
    raw = read_log(MAIN_LOG)
    reference = derive(raw)
    extra = with_event_inserted(raw, 2, pcr, EV_IPL, b"x\x00", b"x")
    with pytest.raises(PlatformError, match=rf"^boot event log: PCR {pcr} event #2 "):
        check_events_outside_boot_pcrs(parse_event_log(extra), reference)


def test_an_ev_no_action_event_beyond_pcr_9_is_refused() -> None:
    raw = read_log(MAIN_LOG)
    extra = with_event_inserted(raw, 2, 18, EV_NO_ACTION, b"note\x00", b"note")
    with pytest.raises(PlatformError, match=r"PCR 18 event #2 \(EV_NO_ACTION note\)"):
        check_events_outside_boot_pcrs(parse_event_log(extra), derive(raw))


def test_a_qemu_set_lists_nothing_outside_pcr_0_9_by_default() -> None:
    qemu = minimal_qemu_set("qemu-test")
    assert qemu.mok_events == []
    with pytest.raises(
        PlatformError, match=r"^boot event log: PCR 14 event #30 \(EV_IPL MokList\).*list nothing"
    ):
        check_events_outside_boot_pcrs(parse_event_log(read_log(MAIN_LOG)), qemu)


def test_the_model_allows_pcr_14_only_and_each_mok_list_once() -> None:
    with pytest.raises(ValidationError):
        MokListEvent.model_validate({"pcr": 15, "variable": "MokList", "sha256": ["00" * 32]})
    with pytest.raises(ValidationError):
        MokListEvent.model_validate({"variable": "aicert.output.file", "sha256": ["00" * 32]})
    reference = derive(read_log(MAIN_LOG))
    document = reference.model_dump(mode="json")
    document["mok_events"] = [document["mok_events"][0]] * 2
    with pytest.raises(ValidationError, match="listed twice"):
        AzureReferenceValueSet.model_validate(document)


def test_merging_joins_the_mok_digests_and_refuses_other_mok_lists() -> None:
    raw = read_log(MAIN_LOG)
    first = derive(raw)
    index, _name, digest = mok_events_of(raw)[0]
    other_boot = with_other_digest(raw, index)
    second = derive(other_boot)
    merged = merge_azure_reference_values([first, second])
    assert merged.mok_events[0].sha256 == [digest, hashlib.sha256(b"another component").hexdigest()]
    check_boot_log(parse_event_log(other_boot), replayed_pcrs(other_boot), merged)
    fewer = derive(without_event(raw, mok_events_of(raw)[-1][0]))
    with pytest.raises(PlatformError, match="cannot merge sets with different MOK lists"):
        merge_azure_reference_values([first, fewer])
