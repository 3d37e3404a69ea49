"""The boot-log forgery class: application events moved into the boot event log.

The verifier replays the application log from what the boot left in PCR 14 and 15, which it
reads from the certificate's boot event log. Moving the first application events of a PCR
out of ``event_log`` and into ``boot_event_log`` (as TCG events carrying the application
event's digest) keeps every replay equal to the quote, so a verifier that takes any boot log
as the start accepts a certificate whose moved events vanished from the report: an Azure
certificate with zero outputs, or without its agent's channel key.

Every certificate here is real: a swtpm extended with a real boot event log (PCR 0-9 and
shim's MOK lists in PCR 14) and then with a run's application events, quoted over PCR 0-15,
and certified by the project's platform CA. The forgeries re-sign nothing: the quote stays
valid, and only the certificate file is edited, as an attacker would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from aicert.appevents import ChannelKeyEvent, event_digest, interpret
from aicert.canonical import canonical_json
from aicert.errors import EventLogError, PlatformError
from aicert.model import AppEvent
from aicert.reference_values import (
    AzureReferenceValueSet,
    check_boot_log,
    derive_azure_reference_values,
)
from aicert.tcg_eventlog import EV_NO_ACTION, TcgEvent, parse_event_log
from tests.verification.reference_values.eventlogs import (
    IMAGE_VERSION_ID,
    REFERENCE_ID,
    read_log,
    replayed_pcrs,
    serialize,
)

from .factory import CertificateFactory, MadeCertificate, b64, sha256_hex, tampered, unb64

pytestmark = [pytest.mark.swtpm]

EV_IPL = 0x0000000D
# Two real shim boots: all three MOK lists (SHA-256 bank only), and MokList/MokListX only
# (SHA-1, SHA-256 and SHA-384 banks), which leaves room for a "MokListTrusted" disguise.
THREE_MOK_LOG = "keylime-binary_bios_measurements-secureboot.bin"
TWO_MOK_LOG = "rhel8-uefi.bin"
BOOT_LOG_EVENT = r"boot event log: PCR {pcr} event #\d+"
Disguise = Callable[[AppEvent], tuple[int, bytes]]  # -> (TCG event type, event data)


def _plain(event: AppEvent) -> tuple[int, bytes]:
    return EV_IPL, canonical_json(event.model_dump(mode="json"))


def _as_mok(name: bytes) -> Disguise:
    return lambda _event: (EV_IPL, name + b"\x00")


def _no_action(_event: AppEvent) -> tuple[int, bytes]:
    return EV_NO_ACTION, b"moved"


DISGUISES: dict[str, Disguise] = {
    "plain": _plain,
    "as-MokList": _as_mok(b"MokList"),
    "as-MokListTrusted": _as_mok(b"MokListTrusted"),
}


def channel_key_event() -> AppEvent:
    return ChannelKeyEvent(
        algorithm="ecdsa-secp256r1", public_key_sha256=sha256_hex(b"the agent's TLS key")
    ).to_event()


def azure_reference(log_name: str) -> AzureReferenceValueSet:
    raw = read_log(log_name)
    return derive_azure_reference_values(
        raw, replayed_pcrs(raw), image_version_id=IMAGE_VERSION_ID, reference_id=REFERENCE_ID
    )


def azure_certificate(factory: CertificateFactory, log_name: str) -> MadeCertificate:
    """An Azure-double certificate: the boot of ``log_name``, then a run whose first PCR 14
    event is the agent's channel key, as on an Azure VM."""
    return factory.make_certificate(
        platform="azure",
        events=lambda log: [channel_key_event(), *log],
        boot_event_log=read_log(log_name),
        reference_values=REFERENCE_ID,
    )


@pytest.fixture(scope="module")
def three_mok(factory: CertificateFactory) -> MadeCertificate:
    return azure_certificate(factory, THREE_MOK_LOG)


@pytest.fixture(scope="module")
def two_mok(factory: CertificateFactory) -> MadeCertificate:
    return azure_certificate(factory, TWO_MOK_LOG)


@pytest.fixture(scope="module")
def three_mok_reference() -> AzureReferenceValueSet:
    return azure_reference(THREE_MOK_LOG)


@pytest.fixture(scope="module")
def two_mok_reference() -> AzureReferenceValueSet:
    return azure_reference(TWO_MOK_LOG)


def _tcg_event(raw: bytes, pcr: int, event_type: int, data: bytes, sha256: bytes) -> TcgEvent:
    """A TCG event whose SHA-256 digest is ``sha256``; the other banks of the log get the
    hash of ``data`` (an attacker's choice: only SHA-256 is quoted)."""
    banks = parse_event_log(raw).banks
    digests = {bank: hashlib.new(bank, data).digest() for bank in banks}
    digests["sha256"] = sha256
    return TcgEvent(index=0, pcr=pcr, event_type=event_type, digests=digests, data=data)


def with_boot_events(raw: bytes, extra: Sequence[TcgEvent]) -> bytes:
    """``raw`` with ``extra`` appended (after shim's PCR 14 events, as a later boot stage)."""
    log = parse_event_log(raw)
    return serialize(raw, log, [*log.events, *extra])


def moved_into_boot_log(
    made: MadeCertificate, positions: Sequence[int], disguise: Disguise = _plain
) -> MadeCertificate:
    """The forgery: the application events at ``positions`` leave ``event_log`` and are
    appended to the boot event log in their PCR, with their digest; ``inputs``/``outputs``
    become what the remaining log measures. The quote is not touched."""
    events = list(made.certificate.event_log)
    raw = made.certificate.boot_event_log
    assert raw is not None
    moved = [events[position] for position in positions]
    remaining = [event for position, event in enumerate(events) if position not in positions]
    extra = []
    for event in moved:
        event_type, data = disguise(event)
        extra.append(_tcg_event(raw, event.pcr, event_type, data, event_digest(event)))
    forged_boot_log = with_boot_events(raw, extra)

    def mutate(document: dict[str, Any]) -> None:
        document["boot_event_log"] = b64(forged_boot_log)
        document["event_log"] = [event.model_dump(mode="json") for event in remaining]
        try:
            measured = interpret(remaining)
        except EventLogError:
            return  # the remaining log is not a run: nothing to rewrite it to
        document["inputs"] = [r.model_dump(mode="json") for r in measured.input_records()]
        document["outputs"] = [r.model_dump(mode="json") for r in measured.output_records()]

    return tampered(made, mutate)


def positions_in(made: MadeCertificate, pcr: int) -> list[int]:
    return [i for i, event in enumerate(made.certificate.event_log) if event.pcr == pcr]


def output_file_positions(made: MadeCertificate) -> list[int]:
    log = made.certificate.event_log
    return [i for i, event in enumerate(log) if event.type == "aicert.output.file"]


# -- the honest certificates verify -------------------------------------------------------------


def test_the_azure_double_certificates_verify(
    three_mok: MadeCertificate,
    two_mok: MadeCertificate,
    three_mok_reference: AzureReferenceValueSet,
    two_mok_reference: AzureReferenceValueSet,
) -> None:
    for made, reference in ((three_mok, three_mok_reference), (two_mok, two_mok_reference)):
        report = made.verify(reference_values=[reference])
        assert report.boot_chain_attested
        assert len(report.outputs) == 2
        assert report.pcrs[14] != "00" * 32


# -- the reported forgery: every output moved ---------------------------------------------------


@pytest.mark.parametrize("disguise", sorted(DISGUISES))
def test_all_outputs_moved_into_the_boot_log_are_refused(
    three_mok: MadeCertificate, three_mok_reference: AzureReferenceValueSet, disguise: str
) -> None:
    forged = moved_into_boot_log(three_mok, output_file_positions(three_mok), DISGUISES[disguise])
    assert forged.certificate.outputs == []  # what the forger wants the report to say
    with pytest.raises(
        EventLogError, match=BOOT_LOG_EVENT.format(pcr=15) + r" \(EV_IPL\): PCR 15 belongs"
    ):
        forged.verify(reference_values=[three_mok_reference])


def test_all_outputs_moved_are_refused_by_verify_artifact(
    three_mok: MadeCertificate, tmp_path: Path
) -> None:
    forged = moved_into_boot_log(three_mok, output_file_positions(three_mok))
    model = tmp_path / "metrics.json"
    model.write_bytes(b'{"accuracy": 0.93}\n')
    with pytest.raises(EventLogError, match=BOOT_LOG_EVENT.format(pcr=15)):
        forged.certificate.verify_artifact(model)


# -- prefixes of each PCR, and each event alone ---------------------------------------------


PREFIXES = [(14, count) for count in range(1, 9)] + [(15, count) for count in range(1, 4)]


@pytest.mark.parametrize(("pcr", "count"), PREFIXES)
def test_a_prefix_of_a_pcrs_events_moved_is_refused(
    three_mok: MadeCertificate, three_mok_reference: AzureReferenceValueSet, pcr: int, count: int
) -> None:
    """PCR 14: the channel key, then the runtime event, config, images, source, resource,
    package; PCR 15: the outputs, then the result."""
    prefix = positions_in(three_mok, pcr)[:count]
    assert len(prefix) == count
    forged = moved_into_boot_log(three_mok, prefix)
    with pytest.raises(EventLogError, match=BOOT_LOG_EVENT.format(pcr=pcr)):
        forged.verify(reference_values=[three_mok_reference])


@pytest.mark.parametrize("position", range(11))
def test_each_event_moved_alone_is_refused(
    three_mok: MadeCertificate, three_mok_reference: AzureReferenceValueSet, position: int
) -> None:
    assert len(three_mok.certificate.event_log) == 11
    pcr = three_mok.certificate.event_log[position].pcr
    forged = moved_into_boot_log(three_mok, [position])
    with pytest.raises(EventLogError, match=BOOT_LOG_EVENT.format(pcr=pcr)):
        forged.verify(reference_values=[three_mok_reference])


def test_the_channel_key_moved_as_a_repeated_mok_list_is_refused(
    three_mok: MadeCertificate, three_mok_reference: AzureReferenceValueSet
) -> None:
    """All three MOK names are taken by shim's real events: a fourth is not shim's."""
    forged = moved_into_boot_log(three_mok, [0], _as_mok(b"MokList"))
    with pytest.raises(EventLogError, match=BOOT_LOG_EVENT.format(pcr=14) + r".*MokList"):
        forged.verify(reference_values=[three_mok_reference])


# -- disguised as the MOK list shim did not measure: the reference values refuse ------------


@pytest.mark.parametrize("count", [1, 2])
def test_pcr14_events_disguised_as_an_unmeasured_mok_list_are_refused(
    two_mok: MadeCertificate, two_mok_reference: AzureReferenceValueSet, count: int
) -> None:
    """The boot logged MokList and MokListX only; the forger adds "MokListTrusted" (once: a
    second one is refused by name) holding the channel key's digest. Every bank of the
    forged event is the forger's; SHA-256 is the one quoted, and the one judged."""
    positions = positions_in(two_mok, 14)[:count]
    forged = moved_into_boot_log(two_mok, positions, _as_mok(b"MokListTrusted"))
    if count == 1:
        with pytest.raises(
            PlatformError, match=BOOT_LOG_EVENT.format(pcr=14) + r" \(EV_IPL MokListTrusted\)"
        ):
            forged.verify(reference_values=[two_mok_reference])
    else:
        with pytest.raises(EventLogError, match=BOOT_LOG_EVENT.format(pcr=14)):
            forged.verify(reference_values=[two_mok_reference])


def test_a_mok_event_with_another_sha256_digest_is_refused_whatever_its_other_banks(
    factory: CertificateFactory, two_mok_reference: AzureReferenceValueSet
) -> None:
    """A boot whose MokListX differs in SHA-256 only (the SHA-1 and SHA-384 digests stay
    those of the reference boot): the SHA-256 bank is the one the verifier reads."""
    raw = read_log(TWO_MOK_LOG)
    log = parse_event_log(raw)
    (mok_x,) = [event for event in log.events if event.data == b"MokListX\x00"]
    other = replace(mok_x, digests={**mok_x.digests, "sha256": hashlib.sha256(b"x").digest()})
    edited = serialize(raw, log, [other if e is mok_x else e for e in log.events])
    made = factory.make_certificate(
        platform="azure",
        events=lambda events: [channel_key_event(), *events],
        boot_event_log=edited,
        reference_values=REFERENCE_ID,
    )
    with pytest.raises(
        PlatformError, match=rf"boot event log: PCR 14 event #{mok_x.index} \(EV_IPL MokListX\)"
    ):
        made.verify(reference_values=[two_mok_reference])


# -- the rest of the class: events the quote does not cover, or the set does not list ---------


@pytest.mark.parametrize(
    ("pcr", "event_type"),
    [(10, EV_IPL), (13, EV_IPL), (16, EV_IPL), (23, EV_IPL), (16, EV_NO_ACTION)],
)
def test_an_unlisted_event_outside_pcr_0_9_is_refused(
    three_mok: MadeCertificate,
    three_mok_reference: AzureReferenceValueSet,
    pcr: int,
    event_type: int,
) -> None:
    """PCR 16-23 are not quoted and PCR 10-13 are not replayed: the boot log may still carry
    nothing there that the reference values do not list."""
    raw = three_mok.certificate.boot_event_log
    assert raw is not None
    extra = _tcg_event(raw, pcr, event_type, b"something", hashlib.sha256(b"x").digest())
    forged_log = with_boot_events(raw, [extra])
    forged = tampered(three_mok, lambda d: d.update(boot_event_log=b64(forged_log)))
    with pytest.raises(PlatformError, match=BOOT_LOG_EVENT.format(pcr=pcr)):
        forged.verify(reference_values=[three_mok_reference])


def test_a_no_action_event_in_pcr14_is_refused(
    three_mok: MadeCertificate, three_mok_reference: AzureReferenceValueSet
) -> None:
    forged = moved_into_boot_log(three_mok, [0], _no_action)
    with pytest.raises(EventLogError, match=BOOT_LOG_EVENT.format(pcr=14)):
        forged.verify(reference_values=[three_mok_reference])


def test_mok_events_are_refused_by_a_set_that_lists_none(
    three_mok: MadeCertificate, three_mok_reference: AzureReferenceValueSet
) -> None:
    """A set derived from a boot without shim's MOK lists (or a qemu set) lists nothing
    outside PCR 0-9: shim's real events are then refused too, naming the first."""
    bare = three_mok_reference.model_copy(update={"mok_events": []})
    with pytest.raises(PlatformError, match=BOOT_LOG_EVENT.format(pcr=14) + r" \(EV_IPL MokList\)"):
        three_mok.verify(reference_values=[bare])
    raw = three_mok.certificate.boot_event_log
    assert raw is not None
    quoted = {
        int(i): bytes.fromhex(v) for i, v in three_mok.certificate.attestation.quote.pcrs.items()
    }
    with pytest.raises(PlatformError, match=BOOT_LOG_EVENT.format(pcr=14)):
        check_boot_log(parse_event_log(raw), quoted, bare)


def test_a_local_certificate_never_starts_from_a_boot_log(factory: CertificateFactory) -> None:
    """The local platform has no boot: a boot log is refused, and the replay starts from
    zeros, so moved events also break the replay."""
    made = factory.make_certificate(events=lambda log: [channel_key_event(), *log])
    raw = read_log(THREE_MOK_LOG)
    moved = made.certificate.event_log[0]
    forged_log = with_boot_events(
        raw, [_tcg_event(raw, 14, EV_IPL, b"MokListTrusted\x00", event_digest(moved))]
    )

    def mutate(document: dict[str, Any]) -> None:
        document["boot_event_log"] = b64(forged_log)
        document["event_log"] = document["event_log"][1:]

    with pytest.raises(EventLogError, match="application event log replays PCR 14"):
        tampered(made, mutate).verify()
    assert unb64(b64(forged_log)) == forged_log
