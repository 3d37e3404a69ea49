"""The application event log: digests, replay and the grammar the verifier enforces."""

from __future__ import annotations

import hashlib

import pytest
import rfc8785

from aicert.appevents import (
    ChannelKeyEvent,
    ConfigEvent,
    ImageEvent,
    OutputFileEvent,
    PackageEvent,
    ResourceEvent,
    ResultEvent,
    RuntimeEvent,
    SourceEvent,
    event_digest,
    interpret,
    replay,
)
from aicert.errors import EventLogError
from aicert.model import AppEvent

SHA = "ab" * 32


def runtime() -> AppEvent:
    return RuntimeEvent(
        runtime_version="1.0",
        run_id="run-1",
        nonce="00" * 32,
        platform="local",
        started_at="2026-11-25T00:00:00+00:00",
    ).to_event()


def config() -> AppEvent:
    return ConfigEvent(config={"kind": "python", "source": {"gitRepo": "x"}}).to_event()


def base_image() -> AppEvent:
    return ImageEvent(role="base", name="base:1", image_id="sha256:" + SHA).to_event()


def source() -> AppEvent:
    return SourceEvent(
        type="git",
        url="https://example.org/repo",
        ref="v1",
        subdirectory=None,
        commit="1" * 40,
        tree_sha256=SHA,
        file_count=3,
        size=10,
    ).to_event()


def output(path: str) -> AppEvent:
    return OutputFileEvent(path=path, size=1, sha256=SHA).to_event()


def result(code: int = 0) -> AppEvent:
    return ResultEvent(
        exit_code=code, duration_ms=5, finished_at="2026-11-25T00:00:01+00:00"
    ).to_event()


def valid_log() -> list[AppEvent]:
    return [
        runtime(),
        config(),
        base_image(),
        source(),
        ResourceEvent(url="file:///d", destination="d.csv", sha256=SHA, size=4).to_event(),
        PackageEvent(
            name="six", version="1.16.0", filename="six.whl", sha256=SHA, size=9
        ).to_event(),
        ImageEvent(role="training", name="t:1", image_id="sha256:" + "cd" * 32).to_event(),
        output("a.bin"),
        output("b/c.bin"),
        result(),
    ]


def test_event_digest_is_sha256_of_rfc8785_json() -> None:
    event = runtime()
    expected = hashlib.sha256(rfc8785.dumps(event.model_dump(mode="json"))).digest()
    assert event_digest(event) == expected
    # Key order in the data does not change the digest: canonical JSON sorts keys.
    shuffled = AppEvent(pcr=14, type=event.type, data=dict(reversed(event.data.items())))
    assert event_digest(shuffled) == expected


def test_replay_extends_from_zeros_per_pcr() -> None:
    log = valid_log()
    values = replay(log)
    pcr14 = bytes(32)
    for event in log:
        if event.pcr == 14:
            pcr14 = hashlib.sha256(pcr14 + event_digest(event)).digest()
    assert values[14] == pcr14
    assert replay([]) == {14: bytes(32), 15: bytes(32)}


def test_interpret_gives_the_views_in_order() -> None:
    measured = interpret(valid_log())
    kinds = [record.kind for record in measured.input_records()]
    assert kinds == ["config", "image", "image", "source", "resource", "package"]
    assert [o.path for o in measured.output_records()] == ["a.bin", "b/c.bin"]
    source_record = measured.input_records()[3]
    assert source_record.digest == {"sha256": SHA, "sha1": "1" * 40}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda log: log[1:], "first PCR 14 event must be aicert.runtime"),
        (lambda log: [log[0], log[2], log[1], *log[3:]], "out of order"),
        (lambda log: [*log[:2], *log[3:]], "base image"),
        (lambda log: [*log[:4], log[3], *log[4:]], "more than one"),
        (lambda log: log[:-1], "last PCR 15 event must be aicert.output.result"),
        (lambda log: [*log[:7], log[8], log[7], log[9]], "sorted by path"),
        (lambda log: [*log[:7], log[7], log[7], *log[8:]], "sorted by path"),
        (lambda log: [*log[:7], result(), *log[7:]], "output files followed by one result"),
        (
            lambda log: [log[0], log[1], config(), *log[2:]],
            "exactly one aicert.input.config",
        ),
        (
            lambda log: [*log[:6], *log[7:9], log[6], log[9]],
            "input was measured after the first output",
        ),
        (
            lambda log: [*log[:3], AppEvent(pcr=14, type="aicert.input.other", data={})],
            "unknown event type",
        ),
        (
            lambda log: [*log[:3], AppEvent(pcr=15, type=log[3].type, data=log[3].data)],
            "must be measured into PCR 14",
        ),
        (
            lambda log: [
                *log[:3],
                AppEvent(pcr=14, type=log[3].type, data={**log[3].data, "commit": "x"}),
            ],
            "data.commit",
        ),
    ],
)
def test_grammar_violations_are_event_log_errors(mutate, message: str) -> None:
    with pytest.raises(EventLogError, match=message):
        interpret(mutate(valid_log()))


def channel_key() -> AppEvent:
    return ChannelKeyEvent(algorithm="ecdsa-secp256r1", public_key_sha256=SHA).to_event()


def test_channel_key_is_the_machines_first_event() -> None:
    measured = interpret([channel_key(), *valid_log()])
    assert measured.channel_key is not None
    assert measured.channel_key.public_key_sha256 == SHA
    assert measured.runtime.run_id == "run-1"
    assert interpret(valid_log()).channel_key is None  # optional (local platform)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        # After the runtime event, a key could have been swapped in mid-run.
        (lambda log: [log[0], channel_key(), *log[1:]], "out of order"),
        (lambda log: [channel_key(), channel_key(), *log], "first PCR 14 event must be"),
        (lambda log: [channel_key(), *log[1:]], "first PCR 14 event must be aicert.runtime"),
        (lambda log: [channel_key()], "first PCR 14 event must be aicert.runtime"),
    ],
)
def test_misplaced_channel_key_is_refused(mutate: object, message: str) -> None:
    with pytest.raises(EventLogError, match=message):
        interpret(mutate(valid_log()))  # type: ignore[operator]


def test_channel_key_event_from_a_certificate() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from aicert.guest_runtime.channel import new_channel_identity

    identity = new_channel_identity()
    event = ChannelKeyEvent.for_certificate(identity.certificate_pem)
    spki = (
        x509.load_pem_x509_certificate(identity.certificate_pem)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    assert event.algorithm == "ecdsa-secp256r1"
    assert event.public_key_sha256 == hashlib.sha256(spki).hexdigest()
    assert ChannelKeyEvent.for_certificate(new_channel_identity().certificate_pem) != event
