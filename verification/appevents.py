"""The application event log: what AICert measures into PCR 14 (inputs) and PCR 15 (outputs).

Each event is ``{"pcr": 14|15, "type": "aicert....", "data": {...}}``. Its digest is SHA-256
over the RFC 8785 canonical JSON of the whole event, and that digest is what the guest
extends into the PCR. Replaying the log from zeros must give exactly the quoted PCR 14 and
15: that is how a verifier knows the inputs and outputs listed are the ones measured, in
order, with nothing added or left out.

The typed ``*Event`` models below are the vocabulary: the guest builds events from them and
the verifier parses replayed events back into them. An event type the verifier does not know
is an error (fail closed): an input it cannot show would be an input nobody checked.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
)

from aicert.canonical import canonical_sha256
from aicert.errors import EventLogError
from aicert.event_data import (
    INPUTS_PCR,
    OUTPUTS_PCR,
    EventData,
    IsoTimestamp,
    RelativePath,
    Sha1Hex,
    Sha256Hex,
)
from aicert.gpus import GpuEvent, check_measured_gpus

if TYPE_CHECKING:
    from aicert.tcg_eventlog import TcgEvent, TcgEventLog
from aicert.model import (
    STATEMENT_KINDS,
    AppEvent,
    InputRecord,
    OutputRecord,
    PlatformKind,
    StatementKind,
)

PCR_RESET_VALUE = bytes(32)


# One kind of event payload, for the helpers that pick events by kind.
_Event = TypeVar("_Event", bound=EventData)


class RuntimeEvent(EventData):
    """First event: who measures (runtime version), which run, and the verifier's nonce."""

    TYPE = "aicert.runtime"
    PCR = INPUTS_PCR
    runtime_version: str
    run_id: str
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16,128}$")]
    platform: PlatformKind
    started_at: IsoTimestamp


class ChannelKeyEvent(EventData):
    """The guest agent's channel (TLS) public key on remote platforms: the machine's first
    PCR 14 event, measured when the agent starts, before it serves anything. The
    orchestrator checks it against a platform quote before it sends the run."""

    TYPE = "aicert.runtime.channel-key"
    PCR = INPUTS_PCR
    algorithm: str
    public_key_sha256: Sha256Hex

    @classmethod
    def for_certificate(cls, certificate_pem: bytes) -> ChannelKeyEvent:
        """The event for the key in a TLS certificate: SHA-256 of its SubjectPublicKeyInfo."""
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        key = x509.load_pem_x509_certificate(certificate_pem).public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            algorithm = f"ecdsa-{key.curve.name}"
        else:
            algorithm = type(key).__name__.removesuffix("PublicKey").lower()
        spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return cls(algorithm=algorithm, public_key_sha256=hashlib.sha256(spki).hexdigest())


class ConfigEvent(EventData):
    TYPE = "aicert.input.config"
    PCR = INPUTS_PCR
    config: dict[str, JsonValue]


class ImageEvent(EventData):
    TYPE = "aicert.input.image"
    PCR = INPUTS_PCR
    role: Literal["base", "training"]
    name: str
    image_id: Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]


class SourceEvent(EventData):
    TYPE = "aicert.input.source"
    PCR = INPUTS_PCR
    type: Literal["git"]
    url: str
    ref: str | None
    subdirectory: str | None
    commit: Sha1Hex
    tree_sha256: Sha256Hex
    file_count: Annotated[int, Field(ge=0)]
    size: Annotated[int, Field(ge=0)]


class ResourceEvent(EventData):
    TYPE = "aicert.input.resource"
    PCR = INPUTS_PCR
    url: str
    destination: RelativePath
    sha256: Sha256Hex
    size: Annotated[int, Field(ge=0)]


class CertifiedResourceEvent(ResourceEvent):
    """A resource that is an output of an earlier certificate (``certifiedBy``): the same
    facts as ``aicert.input.resource`` plus the link a verifier follows to that parent.

    ``certificate_sha256`` is ``aicert.lineage.certificate_sha256`` of the parent (RFC 8785
    SHA-256 of its JSON), ``run_id`` its run, ``output`` the output path whose digest is
    ``sha256``. The orchestrator verified the parent before the run; the agent, which holds
    no trust policy, binds the link here so that every later verifier can check it again.
    """

    TYPE = "aicert.input.certified-resource"
    certificate_sha256: Sha256Hex
    run_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")]
    output: RelativePath


class PackageEvent(EventData):
    TYPE = "aicert.input.package"
    PCR = INPUTS_PCR
    name: str
    version: str
    filename: str
    sha256: Sha256Hex
    size: Annotated[int, Field(ge=0)]


class OutputFileEvent(EventData):
    TYPE = "aicert.output.file"
    PCR = OUTPUTS_PCR
    path: RelativePath
    size: Annotated[int, Field(ge=0)]
    sha256: Sha256Hex


class ResultsFileEvent(OutputFileEvent):
    """The output file the config names as ``results``, with its parsed metrics (name ->
    number, ``aicert.metrics.parse_metrics``): bound facts in the report, not a file to trust."""

    TYPE = "aicert.output.results-file"
    metrics: dict[Annotated[str, StringConstraints(min_length=1, max_length=128)], float]


class ResultEvent(EventData):
    """Last event: how the training ended. Measured after every output file."""

    TYPE = "aicert.output.result"
    PCR = OUTPUTS_PCR
    exit_code: int
    duration_ms: Annotated[int, Field(ge=0)]
    finished_at: IsoTimestamp


class StatementDigest(BaseModel):
    """One signed statement the agent made: its kind and the SHA-256 of its DSSE envelope
    (RFC 8785 canonical JSON of the envelope, ``aicert.signed_statements.envelope_sha256``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    kind: StatementKind
    sha256: Sha256Hex


def _one_of_each_kind(statements: list[StatementDigest]) -> list[StatementDigest]:
    kinds = [statement.kind for statement in statements]
    if kinds != [kind for kind in STATEMENT_KINDS if kind in kinds]:
        raise ValueError(f"statement kinds must be distinct, in the order {STATEMENT_KINDS}")
    return statements


class SignedStatementsEvent(EventData):
    """After the result: the statements the TPM signed inside the machine (model_signing,
    SLSA provenance), each by the digest of its envelope. The envelopes themselves travel in
    the certificate's ``signed_statements``; this event binds them to the quote."""

    TYPE = "aicert.output.signed-statements"
    PCR = OUTPUTS_PCR
    statements: Annotated[
        list[StatementDigest],
        Field(min_length=1, max_length=len(STATEMENT_KINDS)),
        AfterValidator(_one_of_each_kind),
    ]


EVENT_TYPES: dict[str, type[EventData]] = {
    cls.TYPE: cls
    for cls in (
        RuntimeEvent,
        ChannelKeyEvent,
        ConfigEvent,
        GpuEvent,
        ImageEvent,
        SourceEvent,
        ResourceEvent,
        CertifiedResourceEvent,
        PackageEvent,
        OutputFileEvent,
        ResultsFileEvent,
        ResultEvent,
        SignedStatementsEvent,
    )
}


def event_digest(event: AppEvent) -> bytes:
    """SHA-256 over the RFC 8785 canonical JSON of the event: the value extended into its PCR.

    Raises ``EventLogError`` for an event RFC 8785 cannot represent (NaN, infinities,
    integers beyond 2**53): JSON parsers accept them, so a certificate can carry them.
    """
    try:
        # The event's three fields as a plain dict: what model_dump(mode="json") returns for
        # them (the data is already JSON values), without copying every event's data.
        return canonical_sha256({"pcr": event.pcr, "type": event.type, "data": event.data})
    except ValueError as exc:
        raise EventLogError(f"{event.type} event has no RFC 8785 form: {exc}") from None


def extend(pcr_value: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(pcr_value + digest).digest()


# What shim (the first-stage boot loader of Azure's and most distributions' images) measures
# into PCR 14: one EV_IPL event per MOK list, whose data is the variable's name and a NUL and
# whose digest covers the list. Nothing else of a boot lands in the application's PCRs.
EV_IPL = 0x0000000D
ShimMokVariable = Literal["MokList", "MokListX", "MokListTrusted"]
SHIM_MOK_VARIABLES: tuple[str, ...] = get_args(ShimMokVariable)


def _shim_mok_variable(event: TcgEvent) -> str | None:
    """The MOK list a boot-log event is shim's measurement of, None for any other event."""
    if event.pcr != INPUTS_PCR or event.event_type != EV_IPL:
        return None
    for name in SHIM_MOK_VARIABLES:
        if event.data == name.encode("ascii") + b"\x00":
            return name
    return None


def check_application_pcrs_in_boot_log(log: TcgEventLog) -> None:
    """Refuse a boot event log that carries anything in PCR 14 or 15 but shim's MOK lists.

    The application event log must be the only source of application events: a boot log
    event in PCR 15, or in PCR 14 other than shim's ``EV_IPL`` MokList / MokListX /
    MokListTrusted event (each at most once), could be an application event moved out of the
    application log, which would then vanish from the report while every replay still gives
    the quote. Raises ``EventLogError`` naming the PCR and the event index: the boot log
    holds what only the application log may hold, whatever the platform's reference values.
    Whether shim's events carry the digests of the reference boot, and that nothing else is
    logged outside PCR 0-9, is the reference values' check
    (``aicert.reference_values.check_boot_log``, ``PlatformError``).
    """
    seen: set[str] = set()
    for event in log.events:
        if event.pcr not in (INPUTS_PCR, OUTPUTS_PCR):
            continue
        where = f"boot event log: PCR {event.pcr} event #{event.index} ({event.event_type_name})"
        if event.pcr == OUTPUTS_PCR:
            raise EventLogError(
                f"{where}: PCR {OUTPUTS_PCR} belongs to the application event log (the run's "
                "outputs); no boot component measures there"
            )
        name = _shim_mok_variable(event)
        if name is None:
            raise EventLogError(
                f"{where}: in PCR {INPUTS_PCR} a boot logs only shim's EV_IPL "
                f"{'/'.join(SHIM_MOK_VARIABLES)} events; anything else could be an "
                "application event moved out of the application event log"
            )
        if name in seen:
            raise EventLogError(f"{where}: shim measures {name} once, this is a second {name}")
        seen.add(name)


def application_pcr_start(boot_event_log: bytes | TcgEventLog | None) -> dict[int, bytes]:
    """PCR 14 and 15 when the OS hands over to the agent: the reset value, or what the boot
    extended there, per the boot event log (shim measures its MOK lists into PCR 14).

    Only shim's MOK-list events may be the start (``check_application_pcrs_in_boot_log``,
    ``EventLogError`` otherwise): an application event moved into the boot log would replay
    to the same quoted value while vanishing from the report. That shim's events carry the
    reference boot's digests is for the platform check to judge (``check_boot_log``); an
    event that is not shim's genuine one fails there. PCR 15 always starts at the reset
    value. Only the SHA-256 bank is read: it is the bank the quote covers."""
    start = {INPUTS_PCR: PCR_RESET_VALUE, OUTPUTS_PCR: PCR_RESET_VALUE}
    if boot_event_log is None:
        return start
    from aicert.tcg_eventlog import parse_event_log

    log = (
        parse_event_log(boot_event_log)
        if isinstance(boot_event_log, bytes | bytearray)
        else boot_event_log
    )
    check_application_pcrs_in_boot_log(log)
    boot = log.replay().get("sha256", {})
    return {pcr: boot.get(pcr, value) for pcr, value in start.items()}


def replay(events: Iterable[AppEvent], start: dict[int, bytes] | None = None) -> dict[int, bytes]:
    """PCR 14 and 15 after extending every event's digest, from ``start`` (default: the reset
    value; see ``application_pcr_start`` for machines whose boot extended PCR 14)."""
    values = dict(start) if start else {INPUTS_PCR: PCR_RESET_VALUE, OUTPUTS_PCR: PCR_RESET_VALUE}
    for event in events:
        values[event.pcr] = extend(values[event.pcr], event_digest(event))
    return values


def parse_event(event: AppEvent, position: int) -> EventData:
    """The typed payload of one event; unknown types and malformed payloads are errors."""
    model = EVENT_TYPES.get(event.type)
    if model is None:
        raise EventLogError(f"event #{position}: unknown event type {event.type!r}")
    if event.pcr != model.PCR:
        raise EventLogError(
            f"event #{position}: {event.type} must be measured into PCR {model.PCR}, "
            f"not PCR {event.pcr}"
        )
    try:
        return model.model_validate(event.data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(data)"
        raise EventLogError(
            f"event #{position} ({event.type}): data.{field}: {first['msg']}"
        ) from None


@dataclass(frozen=True)
class MeasuredRun:
    """What the replayed application event log proves, in measurement order."""

    runtime: RuntimeEvent
    channel_key: ChannelKeyEvent | None
    config: ConfigEvent
    images: tuple[ImageEvent, ...]
    source: SourceEvent | None
    resources: tuple[ResourceEvent, ...]
    packages: tuple[PackageEvent, ...]
    outputs: tuple[OutputFileEvent, ...]
    result: ResultEvent
    signed_statements: SignedStatementsEvent | None = None
    # What nvidia-smi reported about the GPUs passed to the job (aicert.gpus); None: no GPUs.
    gpus: GpuEvent | None = None

    @property
    def started_at(self) -> datetime:
        return datetime.fromisoformat(self.runtime.started_at)

    @property
    def finished_at(self) -> datetime:
        return datetime.fromisoformat(self.result.finished_at)

    @property
    def project(self) -> str | None:
        """The project name the builder derives from the measured config, None if it cannot.

        Mirrors ``aicert.guest_runtime.config.RunConfig.project_name`` (the verifier cannot
        import the builder); tests/verification/verify cross-checks the two.
        """
        config = self.config.config
        name = config.get("name")
        if isinstance(name, str) and name:
            return name
        source = config.get("source")
        if not isinstance(source, dict):
            return None
        subdirectory, repo = source.get("subdirectory"), source.get("gitRepo")
        if isinstance(subdirectory, str) and subdirectory:
            base = subdirectory
        elif isinstance(repo, str) and repo:
            base = repo.rstrip("/")
        else:
            return None
        base = base.rsplit("/", 1)[-1].removesuffix(".git")
        slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
        return slug[:63] or "project"

    def input_records(self) -> list[InputRecord]:
        records = [
            InputRecord(
                kind="config",
                name="aicert.yaml",
                digest={"sha256": canonical_sha256(self.config.config).hex()},
            )
        ]
        records += [
            InputRecord(
                kind="image",
                name=f"{image.role}:{image.name}",
                digest={"sha256": image.image_id.removeprefix("sha256:")},
            )
            for image in self.images
        ]
        if self.source is not None:
            records.append(
                InputRecord(
                    kind="source",
                    name=self.source.url.rstrip("/").rsplit("/", 1)[-1] or self.source.url,
                    uri=self.source.url,
                    version=self.source.ref,
                    size=self.source.size,
                    digest={"sha256": self.source.tree_sha256, "sha1": self.source.commit},
                )
            )
        records += [
            InputRecord(
                kind="resource",
                name=resource.destination,
                uri=resource.url,
                path=f"/workspace/resources/{resource.destination}",
                size=resource.size,
                digest={"sha256": resource.sha256},
            )
            for resource in self.resources
        ]
        records += [
            InputRecord(
                kind="package",
                name=package.name,
                uri=package.filename,
                version=package.version,
                size=package.size,
                digest={"sha256": package.sha256},
            )
            for package in self.packages
        ]
        return records

    def output_records(self) -> list[OutputRecord]:
        return [
            OutputRecord(path=output.path, size=output.size, digest={"sha256": output.sha256})
            for output in self.outputs
        ]


def interpret(events: Sequence[AppEvent]) -> MeasuredRun:
    """Check the log's grammar and return what it measured.

    PCR 14: [channel-key], runtime, config, [gpus], image(s), [source], resource*,
    package*, and a training image last when packages were installed. A gpus event is there
    exactly when the config asks for GPUs, and lists that many (``check_measured_gpus``).
    PCR 15: output files sorted by path without repeats, then exactly one result, then at
    most one signed-statements event.
    Anything else is an error.
    """
    inputs = [(i, e) for i, e in enumerate(events) if e.pcr == INPUTS_PCR]
    outputs = [(i, e) for i, e in enumerate(events) if e.pcr == OUTPUTS_PCR]
    parsed_inputs = [parse_event(e, i) for i, e in inputs]
    parsed_outputs = [parse_event(e, i) for i, e in outputs]

    # Rank of each input event type: the log must be non-decreasing in rank.
    rank = {
        ChannelKeyEvent: 0,
        RuntimeEvent: 1,
        ConfigEvent: 2,
        GpuEvent: 3,
        ImageEvent: 4,
        SourceEvent: 5,
        ResourceEvent: 6,
        CertifiedResourceEvent: 6,  # one resource list, each certified or not, config order
        PackageEvent: 7,
    }
    leading = 1 if parsed_inputs and isinstance(parsed_inputs[0], ChannelKeyEvent) else 0
    runtime = parsed_inputs[leading] if len(parsed_inputs) > leading else None
    if not isinstance(runtime, RuntimeEvent):
        raise EventLogError(
            "the first PCR 14 event must be aicert.runtime (after the channel key, if any)"
        )
    previous = -1
    for (position, _), data in zip(inputs, parsed_inputs, strict=True):
        current = rank.get(type(data))
        if current is None:
            raise EventLogError(f"event #{position}: {data.TYPE} cannot be in PCR 14")
        is_final_training_image = isinstance(data, ImageEvent) and data.role == "training"
        if current < previous and not is_final_training_image:
            raise EventLogError(f"event #{position}: {data.TYPE} is out of order")
        previous = max(previous, current)

    configs = _of_kind(parsed_inputs, ConfigEvent)
    for kind in (RuntimeEvent, ConfigEvent):
        if len(_of_kind(parsed_inputs, kind)) != 1:
            raise EventLogError(f"the log must have exactly one {kind.TYPE} event")
    channel = _of_kind(parsed_inputs, ChannelKeyEvent)
    source = _of_kind(parsed_inputs, SourceEvent)
    if len(channel) > 1 or len(source) > 1:
        raise EventLogError("the log has more than one channel-key or source event")
    images = _of_kind(parsed_inputs, ImageEvent)
    if [i.role for i in images] not in (["base"], ["base", "training"]):
        raise EventLogError("the log must measure the base image, then at most one training image")
    if images[-1] is not parsed_inputs[-1] and len(images) == 2:
        raise EventLogError("the training image must be the last PCR 14 event")

    gpus = check_measured_gpus(configs[0].config, _of_kind(parsed_inputs, GpuEvent))
    files, result, signed = _output_events(parsed_outputs)
    if inputs and outputs and outputs[0][0] < inputs[-1][0]:
        raise EventLogError("an input was measured after the first output")

    return MeasuredRun(
        runtime=runtime,
        channel_key=channel[0] if channel else None,
        config=configs[0],
        images=tuple(images),
        source=source[0] if source else None,
        resources=tuple(_of_kind(parsed_inputs, ResourceEvent)),
        packages=tuple(_of_kind(parsed_inputs, PackageEvent)),
        outputs=tuple(files),
        result=result,
        signed_statements=signed,
        gpus=gpus,
    )


def _output_events(
    parsed: Sequence[EventData],
) -> tuple[list[OutputFileEvent], ResultEvent, SignedStatementsEvent | None]:
    """PCR 15's grammar: output files sorted by path without repeats, one result, then at
    most one signed-statements event (measured after the result, so the statements it binds
    can describe the whole run)."""
    signed = parsed[-1] if parsed else None
    if isinstance(signed, SignedStatementsEvent):
        parsed = parsed[:-1]
    else:
        signed = None
    result = parsed[-1] if parsed else None
    if not isinstance(result, ResultEvent):
        raise EventLogError(
            "the last PCR 15 event must be aicert.output.result (or, after it, "
            "aicert.output.signed-statements)"
        )
    files = _of_kind(parsed[:-1], OutputFileEvent)
    if len(files) != len(parsed) - 1:
        raise EventLogError("PCR 15 must hold output files followed by one result event")
    paths = [f.path for f in files]
    if paths != sorted(paths) or len(set(paths)) != len(paths):
        raise EventLogError("output file events must be sorted by path, without repeats")
    return files, result, signed


def _of_kind(events: Sequence[EventData], kind: type[_Event]) -> list[_Event]:
    """The events of one type, in log order."""
    return [event for event in events if isinstance(event, kind)]
