"""GPU facts in a certificate: the ``aicert.input.gpus`` event (what the agent's nvidia-smi
reported about the GPUs passed to the job) verifies and is shown as measured, not attested;
an edited event fails the replay; a malformed or inconsistent one is refused by name. Real
certificates from the factory (a swtpm quote over the very log)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aicert.appevents import ConfigEvent, ImageEvent
from aicert.errors import EventLogError
from aicert.gpus import GPU_FACTS_NOTE, GpuDevice, GpuEvent
from aicert.model import AppEvent

from .factory import CertificateFactory, MadeCertificate, run_config, tampered
from .test_cli import aicert_cli

UUIDS = (
    "GPU-14ac2834-0d81-0508-69eb-e25264c08d21",
    "GPU-3c3e6e2e-5b1f-4d2a-9e0f-8a7b6c5d4e3f",
)
H100 = GpuEvent(
    driver_version="550.54.15",
    cuda_version="12.4",
    devices=[
        GpuDevice(index=i, name="NVIDIA H100 80GB HBM3", uuid=uuid, memory_total_mib=81559)
        for i, uuid in enumerate(UUIDS)
    ],
)
REPLAY_ERROR = re.compile(
    r"the application event log replays PCR 14 to [0-9a-f]{64}, but the quote says "
    r"[0-9a-f]{64}: events were added, removed, reordered or edited"
)


def with_gpus(
    requested: int, data: dict[str, Any] | None = None, *, after: str = ConfigEvent.TYPE
) -> Callable[[list[AppEvent]], list[AppEvent]]:
    """An event editor: the config asks for ``requested`` GPUs and the log measures a gpus
    event of ``data`` (default: the two H100s) after the ``after`` event (the base image's,
    for an image)."""
    body = H100.model_dump(mode="json") if data is None else data

    def edit(events: list[AppEvent]) -> list[AppEvent]:
        edited = []
        for event in events:
            if event.type == ConfigEvent.TYPE:
                event = ConfigEvent(config={**run_config(), "gpus": requested}).to_event()
            edited.append(event)
            if event.type == after and (after != ImageEvent.TYPE or event.data["role"] == "base"):
                edited.append(AppEvent(pcr=GpuEvent.PCR, type=GpuEvent.TYPE, data=body))
        return edited

    return edit


@pytest.fixture(scope="module")
def with_h100s(factory: CertificateFactory) -> MadeCertificate:
    return factory.make_certificate(events=with_gpus(2))


def test_gpu_facts_verify_and_the_report_shows_them_as_measured_not_attested(
    with_h100s: MadeCertificate,
) -> None:
    report = with_h100s.verify()
    assert report.gpus == H100
    assert report.to_dict()["gpus"] == {
        "note": GPU_FACTS_NOTE,
        "attested": False,
        "driver_version": "550.54.15",
        "cuda_version": "12.4",
        "devices": [
            {"index": i, "name": "NVIDIA H100 80GB HBM3", "uuid": u, "memory_total_mib": 81559}
            for i, u in enumerate(UUIDS)
        ],
    }
    gpus_check = next(check for check in report.checks if check.name == "gpus")
    assert gpus_check.detail == f"2 GPU(s) as the config asks, {GPU_FACTS_NOTE}"
    assert "not attested hardware" in GPU_FACTS_NOTE


def test_a_run_without_gpus_reports_none(base: MadeCertificate) -> None:
    report = base.verify()
    assert report.gpus is None and "gpus" not in report.to_dict()
    assert all(check.name != "gpus" for check in report.checks)


def test_an_edited_gpu_event_fails_the_replay(with_h100s: MadeCertificate) -> None:
    def edit(document: dict[str, Any]) -> None:
        for event in document["event_log"]:
            if event["type"] == GpuEvent.TYPE:
                event["data"]["devices"][0]["name"] = "NVIDIA H200"

    with pytest.raises(EventLogError) as refused:
        tampered(with_h100s, edit).verify()
    assert REPLAY_ERROR.fullmatch(str(refused.value)), str(refused.value)


def _device(**changes: object) -> dict[str, Any]:
    device = H100.devices[0].model_dump(mode="json")
    device.update(changes)
    return device


def _body(**changes: object) -> dict[str, Any]:
    body = H100.model_dump(mode="json")
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("requested", "data", "expected"),
    [
        (
            1,
            _body(devices=[_device(uuid="GPU-not-a-uuid")]),
            "data.devices.0.uuid: String should match pattern",
        ),
        (
            1,
            _body(devices=[_device(memory_total_mib="81559")]),
            "data.devices.0.memory_total_mib: Input should be a valid integer",
        ),
        (1, _body(devices=[_device(name="H100\nforged")]), "data.devices.0.name: String should"),
        (1, _body(devices=[_device(index=1)]), "devices must be indices 0 to 0 in order, got [1]"),
        (1, _body(devices=[]), "data.devices: List should have at least 1 item"),
        (1, _body(driver_version="latest"), "data.driver_version: String should match pattern"),
        (1, _body(cuda_version=12.4), "data.cuda_version: Input should be a valid string"),
        (1, {**_body(), "attested": True}, "data.attested: Extra inputs are not permitted"),
        (
            2,
            _body(devices=[_device(), _device(index=1)]),
            "data.devices: Value error, two devices have the same uuid",
        ),
    ],
    ids=[
        "bad-uuid",
        "memory-as-text",
        "name-with-newline",
        "index-not-from-0",
        "no-devices",
        "bad-driver",
        "cuda-as-number",
        "extra-field",
        "same-uuid",
    ],
)
def test_malformed_gpu_events_are_refused_by_field(
    factory: CertificateFactory, requested: int, data: dict[str, Any], expected: str
) -> None:
    """Measured and quoted (the replay passes), but no valid GPU description."""
    made = factory.make_certificate(events=with_gpus(requested, data))
    with pytest.raises(EventLogError) as refused:
        made.verify()
    assert str(refused.value).startswith("event #2 (aicert.input.gpus): "), str(refused.value)
    assert expected in str(refused.value)


@pytest.mark.parametrize(
    ("requested", "data", "expected"),
    [
        (
            3,
            None,
            "the aicert.input.gpus event lists 2 GPUs but the measured config asks for 3 (gpus: 3)",
        ),
        (
            0,
            None,
            "the aicert.input.gpus event lists 2 GPUs but the measured config asks for 0 (gpus: 0)",
        ),
    ],
    ids=["fewer-than-asked", "none-asked"],
)
def test_gpu_events_must_match_the_config(
    factory: CertificateFactory, requested: int, data: dict[str, Any] | None, expected: str
) -> None:
    made = factory.make_certificate(events=with_gpus(requested, data))
    with pytest.raises(EventLogError, match=re.escape(expected) + "$"):
        made.verify()


def test_gpus_asked_for_but_not_measured(factory: CertificateFactory) -> None:
    def edit(events: list[AppEvent]) -> list[AppEvent]:
        return [e for e in with_gpus(2)(events) if e.type != GpuEvent.TYPE]

    with pytest.raises(EventLogError) as refused:
        factory.make_certificate(events=edit).verify()
    assert str(refused.value) == (
        "the measured config asks for 2 GPUs (gpus: 2) but the log has no aicert.input.gpus "
        "event: the GPUs the job had are not recorded"
    )


def test_two_gpu_events_and_a_late_one_are_refused(factory: CertificateFactory) -> None:
    def twice(events: list[AppEvent]) -> list[AppEvent]:
        edited = with_gpus(2)(events)
        index = next(i for i, e in enumerate(edited) if e.type == GpuEvent.TYPE)
        return [*edited[: index + 1], edited[index], *edited[index + 1 :]]

    with pytest.raises(EventLogError, match=r"^the log has 2 aicert\.input\.gpus events; a run"):
        factory.make_certificate(events=twice).verify()
    late = factory.make_certificate(events=with_gpus(2, after=ImageEvent.TYPE))
    with pytest.raises(EventLogError, match=r"^event #3: aicert\.input\.gpus is out of order$"):
        late.verify()


def test_cli_shows_the_gpus_under_their_caveat(with_h100s: MadeCertificate, tmp_path: Path) -> None:
    proof = with_h100s.certificate.write(tmp_path / "gpu.proof.json")
    root = tmp_path / "platform-ca.pem"
    root.write_text(with_h100s.trust_root_pem)
    trust = ["--trust-root", root, "--allow-dev-platform"]
    shown = aicert_cli("verify", proof, *trust)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "not attested hardware (no GPU attestation)" in text
    assert "NVIDIA H100 80GB HBM3" in text and UUIDS[1] in text and "CUDA 12.4" in text
    assert "! gpus: 2 GPU(s) as the config asks" in text
    as_json = aicert_cli("verify", proof, *trust, "--json")
    assert as_json.returncode == 0 and '"attested": false' in as_json.stdout
