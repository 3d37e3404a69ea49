"""``aicert.boot_events``: a boot log's replay against the quoted PCR 0-9, how an event is named
in errors, and the component events of a shim + GRUB + Linux boot (on the real log of
``reference_values/eventlogs.py``)."""

from __future__ import annotations

import pytest

from aicert.boot_events import (
    classify_boot_events,
    describe_boot_event,
    replay_against_quote,
    sha256_digest,
)
from aicert.errors import EventLogError
from aicert.tcg_eventlog import TcgEventLog, parse_event_log
from tests.verification.reference_values.eventlogs import read_log, replayed_pcrs


@pytest.fixture(scope="module")
def log() -> TcgEventLog:
    return parse_event_log(read_log())


def test_a_log_replays_to_the_pcrs_it_was_quoted_with(log: TcgEventLog) -> None:
    replay_against_quote(log, replayed_pcrs(read_log()))


def test_a_pcr_the_quote_lacks_or_that_differs_is_an_event_log_error(log: TcgEventLog) -> None:
    pcrs = replayed_pcrs(read_log())
    with pytest.raises(EventLogError, match="the quote does not cover PCR 3"):
        replay_against_quote(log, {index: value for index, value in pcrs.items() if index != 3})
    with pytest.raises(EventLogError, match=f"replays PCR 7 to {pcrs[7].hex()}, but the quote"):
        replay_against_quote(log, {**pcrs, 7: bytes(32)})


def test_an_event_is_named_by_pcr_index_type_and_name(log: TcgEventLog) -> None:
    mok_lists = [describe_boot_event(event) for event in log.events if event.pcr == 14]
    assert mok_lists == [
        "boot event log: PCR 14 event #30 (EV_IPL MokList)",
        "boot event log: PCR 14 event #31 (EV_IPL MokListX)",
        "boot event log: PCR 14 event #33 (EV_IPL MokListTrusted)",
    ]


def test_the_components_of_a_shim_grub_linux_boot(log: TcgEventLog) -> None:
    found = classify_boot_events(log)
    applications = [event.description for event in found if event.kind == "boot_application"]
    # GRUB hands the kernel to the firmware from memory: it has no file path.
    assert applications == ["\\EFI\\redhat\\shimx64.efi", "\\EFI\\redhat\\grubx64.efi", ""]
    variables = [event.description for event in found if event.kind == "secure_boot_variable"]
    assert variables == [f"variable {name}" for name in ("SecureBoot", "PK", "KEK", "db", "dbx")]
    kinds = {(event.pcr, event.kind) for event in found}
    assert {(8, "kernel_command_line"), (9, "kernel_file"), (9, "initrd")} <= kinds
    by_index = {event.index: event for event in log.events}
    assert all(event.digest == sha256_digest(by_index[event.index]) for event in found)
