"""The ``aicert/v1`` certificate: one pydantic model tree, shared by producer and verifier.

The guest runtime builds these models; the verifier parses them. They share nothing else
(the go-tpm-tools client/server split): the JSON Schema in ``schemas/aicert-v1.schema.json``
is generated from this module and kept in the repository.

Bytes travel as standard base64 (strictly decoded), digests as lowercase hex.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
)

from aicert.bounded_json import JsonLimits, check_json
from aicert.errors import MalformedCertificateError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from aicert.policy import VerificationPolicy
    from aicert.reference_value_sets import PlatformReferenceValues
    from aicert.verify import TrustRoot, VerificationReport

FORMAT = "aicert/v1"

# Limits: a certificate is evidence from an untrusted party; refuse absurd sizes before
# any parsing work is spent on them. The event limits are set so that the largest legitimate
# certificate verifies in under 2 s and 300 MB (a real one with 20,000 output files, made by
# tests/verification/verify/factory.py: 9.2 MB, about 0.5 million JSON values, nesting depth 7,
# verified in about 1.9 s on a loaded 2-core machine; tests/benchmarks/bench_parse_limits.py
# measures it). A run with more output files than MAX_OUTPUT_FILES is refused by the agent
# before PCR 15 is extended (pack a dataset of many small files into shards or an archive).
MAX_CERTIFICATE_BYTES = 64 * 1024 * 1024
MAX_OUTPUT_FILES = 20_000
# Events per list: MAX_OUTPUT_FILES output files plus up to 5,000 inputs (packages, resources).
MAX_EVENTS = 25_000
MAX_BOOT_EVENT_LOG_BYTES = 16 * 1024 * 1024
MAX_CHAIN_LENGTH = 8
MAX_PEM_CHARS = 16 * 1024
# The JSON shape, checked on the raw bytes before any object tree is built
# (aicert.bounded_json). Values and keys: 22 per output file (record + event), 25 per input,
# so 25,000 events take about 0.6 million; the rest is room for the measured config.
MAX_JSON_VALUES = 1_000_000
# Nesting: a certificate is 7 deep; the measured config is YAML a person wrote.
MAX_JSON_DEPTH = 64
# One string, as written between its quotes: the longest legitimate one is the base64 of the
# largest boot event log; every other string has a schema limit of at most MAX_PEM_CHARS.
MAX_JSON_STRING_BYTES = 4 * ((MAX_BOOT_EVENT_LOG_BYTES + 2) // 3)
# Digits in a row in a number literal: sizes are below 2**64 (20 digits), a double's shortest
# form has 17; a 100,000-digit integer is refused before int() (quadratic) ever sees it.
MAX_JSON_NUMBER_CHARS = 40
# Escape sequences (backslashes) in the whole certificate: a certificate has a few (line
# breaks of its PEM chain); the measured config is at most 256 KiB of YAML. Each escape costs
# the RFC 8785 canonicalizer a Python call when an event is hashed.
MAX_JSON_ESCAPES = 256 * 1024
CERTIFICATE_JSON_LIMITS = JsonLimits(
    max_bytes=MAX_CERTIFICATE_BYTES,
    max_values=MAX_JSON_VALUES,
    max_depth=MAX_JSON_DEPTH,
    max_string_bytes=MAX_JSON_STRING_BYTES,
    max_number_chars=MAX_JSON_NUMBER_CHARS,
    max_escapes=MAX_JSON_ESCAPES,
)
# Times (run start and end, event timestamps, the caller's at_time): years 2000 to 9000 in
# UTC, any offset under a day. Far from datetime's year 1 and 9999, where converting an
# offset to UTC overflows (9999-12-31T23:59:59-23:59 raised OverflowError before any check).
EARLIEST_TIME = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(9000, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def check_time(value: datetime, name: str) -> datetime:
    """``value`` in UTC, if it is an aware datetime between EARLIEST_TIME and LATEST_TIME.

    Args:
        value: the time to check.
        name: what it is, for the error message (a field or argument name).

    Raises:
        TypeError: ``value`` is not a datetime.
        ValueError: it has no timezone, or is out of range; the message names ``name``.
    """
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} has no timezone (a naive datetime is ambiguous)")
    # The local year first: within it, the conversion below cannot overflow.
    if not EARLIEST_TIME.year <= value.year <= LATEST_TIME.year or not (
        EARLIEST_TIME <= value.astimezone(UTC) <= LATEST_TIME
    ):
        raise ValueError(
            f"{name} {value.isoformat()} is outside {EARLIEST_TIME.isoformat()} to "
            f"{LATEST_TIME.isoformat()}"
        )
    return value.astimezone(UTC)


def _bounded_time(value: datetime) -> datetime:
    check_time(value, "the time")
    return value


BoundedTime = Annotated[AwareDatetime, AfterValidator(_bounded_time)]


def _b64decode(value: Any, max_length: int) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")
    # Refused before decoding: a 60 MB string for a 4 KB field costs no 45 MB allocation.
    if len(value) > 4 * ((max_length + 2) // 3):
        raise ValueError(f"base64 of more than {max_length} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64: {exc}") from exc


def _b64encode(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def Base64Bytes(max_length: int) -> Any:
    return Annotated[
        bytes,
        BeforeValidator(partial(_b64decode, max_length=max_length)),
        Field(max_length=max_length),
        PlainSerializer(_b64encode, return_type=str, when_used="json"),
        WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
    ]


Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
LowerHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2,128}$")]
PcrIndex = Annotated[str, StringConstraints(pattern=r"^(?:[0-9]|1[0-9]|2[0-3])$")]
ShortText = Annotated[str, StringConstraints(max_length=4096)]
Pem = Annotated[
    str,
    StringConstraints(max_length=MAX_PEM_CHARS, pattern=r"^-----BEGIN CERTIFICATE-----"),
]
DigestAlgorithm = Literal["sha256", "sha1", "sha384", "sha512"]
PlatformKind = Literal["local", "qemu", "azure", "gcp"]
"""The platforms a certificate can come from; every part names them through this type."""
PLATFORM_KINDS: tuple[PlatformKind, ...] = get_args(PlatformKind)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _require_sha256(value: dict[DigestAlgorithm, str]) -> dict[DigestAlgorithm, str]:
    if "sha256" not in value:
        raise ValueError("a digest must include sha256")
    return value


# Every digest of an input or output includes SHA-256, whatever else it lists.
Digest = Annotated[dict[DigestAlgorithm, LowerHex], AfterValidator(_require_sha256)]


class AppEvent(_Strict):
    """One event of the application event log; its RFC 8785 digest is extended into ``pcr``."""

    pcr: Literal[14, 15]
    type: Annotated[str, StringConstraints(pattern=r"^aicert\.[a-z][a-z0-9.\-]{0,62}$")]
    data: dict[str, JsonValue]


class RunInfo(_Strict):
    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")]
    project: ShortText
    provider: PlatformKind
    started_at: BoundedTime
    finished_at: BoundedTime
    exit_code: int
    duration_ms: Annotated[int, Field(ge=0)]
    runtime_version: ShortText


class InputRecord(_Strict):
    """A measured input, as shown to people. The verifier rebuilds these from the event log."""

    kind: Literal["config", "image", "source", "resource", "package"]
    name: ShortText
    uri: ShortText | None = None
    path: ShortText | None = None
    version: ShortText | None = None
    size: Annotated[int, Field(ge=0)] | None = None
    digest: Digest


class OutputRecord(_Strict):
    path: ShortText
    size: Annotated[int, Field(ge=0)]
    digest: Digest


class Platform(_Strict):
    kind: PlatformKind
    reference_values: ShortText | None = None
    description: ShortText | None = None


class Quote(_Strict):
    attest: Base64Bytes(4096)  # TPMS_ATTEST as marshalled by the TPM
    signature: Base64Bytes(2048)  # TPMT_SIGNATURE
    pcrs: dict[PcrIndex, Sha256Hex]  # SHA-256 bank, the values the quote covers

    def pcr_values(self) -> dict[int, bytes]:
        return {int(index): bytes.fromhex(value) for index, value in self.pcrs.items()}


class AttestationKey(_Strict):
    public: Base64Bytes(2048)  # TPMT_PUBLIC
    certificate_chain: Annotated[list[Pem], Field(min_length=1, max_length=MAX_CHAIN_LENGTH)]


class EndorsementKey(_Strict):
    certificate: Pem | None = None


class Attestation(_Strict):
    quote: Quote
    nonce: Base64Bytes(64)
    ak: AttestationKey
    ek: EndorsementKey = EndorsementKey()


# A signed statement's payload: the model_signing statement lists every output file (about
# 150 bytes each, MAX_OUTPUT_FILES of them); the SLSA statement every input and the config.
MAX_STATEMENT_BYTES = 8 * 1024 * 1024
StatementKind = Literal["model-signing", "slsa-provenance"]
"""The statements the agent signs: OpenSSF model signing, and SLSA provenance v1."""
STATEMENT_KINDS: tuple[StatementKind, ...] = get_args(StatementKind)


class DsseSignature(_Strict):
    """One signature of a DSSE envelope (field names as the DSSE specification spells them)."""

    keyid: ShortText
    sig: Base64Bytes(1024)  # DER ECDSA or PKCS#1 v1.5 over the envelope's PAE


class DsseEnvelope(_Strict):
    """A DSSE envelope (https://github.com/secure-systems-lab/dsse), as its JSON spells it."""

    payloadType: ShortText
    payload: Base64Bytes(MAX_STATEMENT_BYTES)
    # The AK signs once; an envelope with more signatures is not one the agent made.
    signatures: Annotated[list[DsseSignature], Field(min_length=1, max_length=1)]


class SignedStatement(_Strict):
    """A statement the TPM signed with the AK inside the attested machine, and its kind."""

    kind: StatementKind
    envelope: DsseEnvelope


class Certificate(_Strict):
    format: Literal["aicert/v1"]
    run: RunInfo
    inputs: Annotated[list[InputRecord], Field(max_length=MAX_EVENTS)]
    outputs: Annotated[list[OutputRecord], Field(max_length=MAX_EVENTS)]
    event_log: Annotated[list[AppEvent], Field(max_length=MAX_EVENTS)]
    boot_event_log: Base64Bytes(MAX_BOOT_EVENT_LOG_BYTES) | None = None
    platform: Platform
    attestation: Attestation
    # Present exactly when the log measured an aicert.output.signed-statements event, in its
    # order; the AK certificate chain for a Sigstore bundle is attestation.ak's.
    signed_statements: (
        Annotated[list[SignedStatement], Field(min_length=1, max_length=len(STATEMENT_KINDS))]
        | None
    ) = None

    # -- serialization -------------------------------------------------------------------

    def to_json_bytes(self) -> bytes:
        """The certificate's JSON (a certificate without signed statements has no key for
        them, as before the field existed)."""
        absent = {"signed_statements"} if self.signed_statements is None else None
        return self.model_dump_json(indent=2, exclude=absent).encode("utf-8") + b"\n"

    @classmethod
    def from_json_bytes(cls, data: bytes, *, source: str = "certificate") -> Certificate:
        """Parse a certificate (shape limits, duplicate keys, schema; nothing verified yet).

        Args:
            data: the certificate file's bytes.
            source: names it in error messages.

        Raises:
            MalformedCertificateError: naming the limit, key or field that is wrong.
        """
        if not isinstance(data, bytes):  # bytearray, memoryview, or JSON text
            data = data.encode() if isinstance(data, str) else bytes(data)
        check_json(data, CERTIFICATE_JSON_LIMITS, source)
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise MalformedCertificateError(f"{source}: {_describe(exc)}") from None
        except (ValueError, RecursionError) as exc:
            raise MalformedCertificateError(f"{source}: not valid JSON: {exc}") from None

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a reader sees the old file or the whole new one, never a part."""
        return write_atomic(Path(path), self.to_json_bytes())

    # -- verification (defined in aicert.verify, bound here for the public API) ------------

    def verify(
        self,
        *,
        trusted_roots: Iterable[TrustRoot] = (),
        expected_inputs: Mapping[str, str] | None = None,
        at_time: datetime | None = None,
        allow_dev_platform: bool = False,
        model: str | os.PathLike[str] | None = None,
        reference_values: PlatformReferenceValues | Iterable[PlatformReferenceValues] | None = None,
        parents: Iterable[Certificate | str | os.PathLike[str]] = (),
        require_lineage: bool = False,
        expected_metrics: Iterable[str] = (),
        policy: VerificationPolicy | None = None,
    ) -> VerificationReport:
        """Verify this certificate: ``aicert.verify.verify_certificate`` (same arguments)."""
        from aicert.verify import verify_certificate

        return verify_certificate(
            self,
            trusted_roots=trusted_roots,
            expected_inputs=expected_inputs,
            at_time=at_time,
            allow_dev_platform=allow_dev_platform,
            model=model,
            reference_values=reference_values,
            parents=parents,
            require_lineage=require_lineage,
            expected_metrics=expected_metrics,
            policy=policy,
        )

    def verify_artifact(self, path: str | os.PathLike[str]) -> int:
        """Re-hash a model file or folder against the measured outputs; the matched count.

        See ``aicert.verify.verify_artifact``: the quote and chain are not checked.
        """
        from aicert.verify import verify_artifact

        return verify_artifact(self, Path(path))


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:5]:
        location = ".".join(str(part) for part in error["loc"]) or "(root)"
        problems.append(f"{location}: {error['msg']}")
    more = exc.error_count() - len(problems)
    if more > 0:
        problems.append(f"... and {more} more")
    return "; ".join(problems)


def write_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    directory_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
    return path


def load(path: str | os.PathLike[str]) -> Certificate:
    """Read and parse a certificate file (schema and size checked; nothing verified yet)."""
    file_path = Path(path)
    try:
        with file_path.open("rb") as handle:
            data = handle.read(MAX_CERTIFICATE_BYTES + 1)
    except OSError as exc:
        raise MalformedCertificateError(f"{file_path}: cannot read: {exc.strerror}") from None
    return Certificate.from_json_bytes(data, source=str(file_path))


def json_schema() -> dict[str, Any]:
    schema = Certificate.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "urn:aicert:schema:aicert-v1"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
