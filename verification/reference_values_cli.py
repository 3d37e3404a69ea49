"""The reference-values commands: ``aicert reference-values <command>``, also installed as
``aicert-reference-values <command>`` and run by ``python -m aicert.reference_values``.

- ``derive-azure``: an Azure set from one boot's event log and PCR 0-9 (JSON on stdout or
  ``--output``); with ``--quote`` etc. the PCR values are first checked against the AK's quote,
  and with ``--ak-certificate`` that AK against Microsoft's pinned vTPM root.
- ``record-azure``: the PCR 0-9 and 14 values of a reference boot without an event log (Azure
  Trusted Launch) into an Azure set's ``pcr_boots`` (a new set, or ``--reference-values``);
  with ``--quote`` etc. the values are first checked against the AK's quote.
- ``merge-azure``: one Azure set accepting every value of the given sets.
- ``check``: judge an event log and its PCR 0-9 against a set (prints the report's note); an
  empty log (Azure Trusted Launch) is judged by the PCR values against the set's ``pcr_boots``.
- ``schema``: print the JSON Schema of reference-value sets.

Exit codes: 0 success, 1 the boot or quote does not verify (``VerificationError``), 2 bad input
(an unreadable or invalid file or option).
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import typer
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from aicert.boot_log_check import check_boot_evidence
from aicert.chain import (
    PINNED_ROOT_FINGERPRINTS,
    leaf_public_key_matches,
    load_pem_certificates,
    verify_ak_chain,
)
from aicert.errors import AkMismatchError, VerificationError
from aicert.quote import public_key_from_ak, verify_quote
from aicert.reference_derivation import (
    derive_azure_reference_values,
    merge_azure_reference_values,
    parse_pcr_values,
    record_azure_pcr_boot,
)
from aicert.reference_value_sets import (
    BOOT_PCRS,
    PlatformReferenceValues,
    load_reference_values,
    reference_values_json_schema,
)

PROGRAM = "aicert-reference-values"
MAX_INPUT_FILE_SIZE = 32 * 1024 * 1024

app = typer.Typer(
    name="reference-values",
    help="Derive, merge and check boot reference-value sets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _run(command: Callable[[], None]) -> None:
    """Run ``command``, turning a refusal into exit 1 and bad input into exit 2, each with
    one ``error: ...`` line on stderr."""
    try:
        command()
    except VerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None


def _read(path: Path, what: str) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(MAX_INPUT_FILE_SIZE + 1)
    if len(data) > MAX_INPUT_FILE_SIZE:
        raise ValueError(f"{what} {path}: over {MAX_INPUT_FILE_SIZE} bytes")
    return data


def _read_pcr_values(path: Path) -> dict[int, bytes]:
    return parse_pcr_values(_read(path, "PCR values").decode("utf-8", errors="replace"))


def _read_event_log(path: Path) -> bytes:
    data = _read(path, "event log")
    # The collection step of the README brings the log back base64-encoded: accept both.
    if data[:1].isalnum() and data.strip().isascii() and not data.startswith(b"\x00"):
        try:
            return base64.b64decode(b"".join(data.split()), validate=True)
        except binascii.Error:
            pass
    return data


def _write_json(reference: PlatformReferenceValues, output: Path | None) -> None:
    text = json.dumps(reference.model_dump(mode="json"), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")


def _provenance(items: Sequence[str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--provenance {item!r}: use KEY=VALUE")
        result[key] = value
    return result


def _der_prefix(data: bytes) -> bytes:
    """The DER certificate at the start of an NV index's content (Azure zero pads it to the
    index size). Hand-written: cryptography refuses trailing bytes and the verifier may not
    import the guest runtime, which has the same four lines."""
    if len(data) < 2 or data[0] != 0x30:
        raise ValueError("AK certificate: not a DER SEQUENCE")
    if data[1] < 0x80:
        header, length = 2, data[1]
    else:
        count = data[1] & 0x7F
        if not 1 <= count <= 4 or len(data) < 2 + count:
            raise ValueError("AK certificate: bad DER length")
        header, length = 2 + count, int.from_bytes(data[2 : 2 + count], "big")
    end = header + length
    if end > len(data) or any(data[end:]):
        raise ValueError("AK certificate: truncated, or followed by something else than zeros")
    return data[:end]


def _check_ak_certificate(
    ak_certificate: Path,
    ak_public_path: Path,
    ak_public: bytes,
    intermediates: Path | None,
    trust_roots: Sequence[Path],
) -> str:
    """The AK certificate (NV 0x01C101D0 content) chains to Microsoft's pinned vTPM root (or
    a ``--trust-root``) now, and certifies the key the quote is checked with; its subject."""
    leaf = x509.load_der_x509_certificate(_der_prefix(_read(ak_certificate, "AK cert")))
    chain_middle = (
        load_pem_certificates(_read(intermediates, "intermediates"))
        if intermediates is not None
        else []
    )
    roots = [root for path in trust_roots for root in load_pem_certificates(_read(path, "root"))]
    chain = verify_ak_chain(
        [cert.public_bytes(Encoding.PEM) for cert in (leaf, *chain_middle)],
        trusted_roots=roots,
        pinned_root_fingerprints=list(PINNED_ROOT_FINGERPRINTS.values()),
        at_time=datetime.now(UTC),
    )
    key, _ = public_key_from_ak(ak_public)
    if not leaf_public_key_matches(chain.leaf, key):
        raise AkMismatchError(f"{ak_public_path} is not the key of the AK certificate")
    return chain.root_subject


EventLogOption = Annotated[
    Path,
    typer.Option(
        help="the boot event log: a VM's /sys/kernel/security/tpm0/binary_bios_measurements "
        "(raw or base64)"
    ),
]
PcrsOption = Annotated[
    Path,
    typer.Option(help='PCR 0-9 of the same boot: JSON {"0": "hex", ...} or tpm2_pcrread output'),
]
OutputOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="write here instead of stdout")
]


@dataclass(frozen=True)
class _QuoteEvidence:
    """The optional ``derive-azure`` files that vouch for the PCR values: the quote over them,
    and the AK certificate that vouches for the quote's key."""

    quote: Path | None
    signature: Path | None
    ak_public: Path | None
    nonce: str | None
    ak_certificate: Path | None
    intermediates: Path | None
    trust_roots: Sequence[Path]

    def check(self, pcr_values: Mapping[int, bytes]) -> dict[str, str | bool]:
        """Verify the quote over ``pcr_values`` (and the AK certificate when given); what was
        checked, for the set's provenance."""
        checked: dict[str, str | bool] = {"quote_verified": False}
        quote, signature, ak_public, nonce = self.quote, self.signature, self.ak_public, self.nonce
        if quote is None and signature is None and ak_public is None and nonce is None:
            if self.ak_certificate is not None:
                raise ValueError("--ak-certificate checks the quote's key: give the quote too")
            return checked
        if quote is None or signature is None or ak_public is None or nonce is None:
            raise ValueError("--quote, --signature, --ak-public and --nonce go together")
        key = _read(ak_public, "AK public key")
        if self.ak_certificate is not None:
            checked["ak_root"] = _check_ak_certificate(
                self.ak_certificate, ak_public, key, self.intermediates, self.trust_roots
            )
        # The PCR values are only as good as the quote that signs them: check it first.
        verify_quote(
            _read(quote, "quote"),
            _read(signature, "signature"),
            key,
            bytes.fromhex(nonce),
            pcr_values,
        )
        checked["quote_verified"] = True
        return checked


SecurityTypeOption = Annotated[Literal["TrustedLaunch", "ConfidentialVM"], typer.Option()]
ProvenanceOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="KEY=VALUE",
        help="recorded, never checked (e.g. vm_size=..., region=...); repeatable",
    ),
]
SignatureOption = Annotated[Path | None, typer.Option(help="tpm2_quote -s output")]
AkPublicOption = Annotated[Path | None, typer.Option(help="tpm2_readpublic -o output of the AK")]
NonceOption = Annotated[str | None, typer.Option(help="the quote's qualifying data, hex")]
AkCertificateOption = Annotated[
    Path | None,
    typer.Option(
        help="tpm2_nvread 0x01C101D0 output: must chain to Microsoft's vTPM root and "
        "certify --ak-public"
    ),
]
IntermediatesOption = Annotated[
    Path | None, typer.Option(help="PEM intermediates of the AK certificate")
]
TrustRootOption = Annotated[
    list[Path] | None,
    typer.Option(help="PEM root trusted besides Microsoft's pinned one (tests); repeatable"),
]


@app.command("derive-azure")
def derive_azure(
    event_log: EventLogOption,
    pcrs: PcrsOption,
    image_version: Annotated[str, typer.Option(help="the gallery image version's resource id")],
    reference_id: Annotated[
        str | None, typer.Option("--id", help="the set's id (default: <image>-<version>)")
    ] = None,
    security_type: SecurityTypeOption = "TrustedLaunch",
    check_firmware_pcr: Annotated[
        list[int] | None,
        typer.Option(
            metavar="N",
            help="also check firmware PCR N (0-3, 5, 6) with this boot's value; repeatable",
        ),
    ] = None,
    provenance: ProvenanceOption = None,
    quote: Annotated[Path | None, typer.Option(help="tpm2_quote -m output over sha256:0-9")] = None,
    signature: SignatureOption = None,
    ak_public: AkPublicOption = None,
    nonce: NonceOption = None,
    ak_certificate: AkCertificateOption = None,
    intermediates: IntermediatesOption = None,
    trust_root: TrustRootOption = None,
    output: OutputOption = None,
) -> None:
    """Derive an Azure set from one boot's event log and PCR 0-9 (prints JSON)."""
    evidence = _QuoteEvidence(
        quote, signature, ak_public, nonce, ak_certificate, intermediates, trust_root or []
    )

    def derive() -> None:
        pcr_values = _read_pcr_values(pcrs)
        if missing := [index for index in BOOT_PCRS if index not in pcr_values]:
            raise ValueError(f"PCR values {pcrs}: PCR {missing} missing (need 0-9)")
        checked = evidence.check(pcr_values)
        reference = derive_azure_reference_values(
            _read_event_log(event_log),
            pcr_values,
            image_version_id=image_version,
            reference_id=reference_id,
            security_type=security_type,
            check_firmware_pcrs=check_firmware_pcr or [],
            provenance={**checked, **_provenance(provenance or [])},
        )
        _write_json(reference, output)

    _run(derive)


@app.command("record-azure")
def record_azure(
    pcrs: Annotated[
        Path,
        typer.Option(
            help="PCR 0-9 and 14 of a fresh reference boot, read before the agent's first "
            'event: JSON {"0": "hex", ...} or `tpm2_pcrread sha256:0-9,14` output'
        ),
    ],
    vm_family: Annotated[
        str, typer.Option(help="the VM family the boot ran on (e.g. Standard_DSv5)")
    ],
    reference_values: Annotated[
        Path | None,
        typer.Option(help="an existing Azure set of the image to add the boot to"),
    ] = None,
    image_version: Annotated[
        str | None,
        typer.Option(help="without --reference-values: the gallery image version's resource id"),
    ] = None,
    reference_id: Annotated[
        str | None, typer.Option("--id", help="a new set's id (default: <image>-<version>)")
    ] = None,
    security_type: SecurityTypeOption = "TrustedLaunch",
    pin_firmware_pcr: Annotated[
        list[int] | None,
        typer.Option(
            metavar="N",
            help="also pin firmware PCR N (0-3, 5, 6) to this boot's value; repeatable",
        ),
    ] = None,
    provenance: ProvenanceOption = None,
    quote: Annotated[
        Path | None, typer.Option(help="tpm2_quote -m output over sha256:0-9,14")
    ] = None,
    signature: SignatureOption = None,
    ak_public: AkPublicOption = None,
    nonce: NonceOption = None,
    ak_certificate: AkCertificateOption = None,
    intermediates: IntermediatesOption = None,
    trust_root: TrustRootOption = None,
    output: OutputOption = None,
) -> None:
    """Record the PCR values of a boot without an event log (Azure Trusted Launch gives the
    guest an empty one) into an Azure set's pcr_boots (prints JSON)."""
    evidence = _QuoteEvidence(
        quote, signature, ak_public, nonce, ak_certificate, intermediates, trust_root or []
    )

    def record() -> None:
        pcr_values = _read_pcr_values(pcrs)
        checked = evidence.check(pcr_values)
        existing = (
            load_reference_values(reference_values, platform="azure")
            if reference_values is not None
            else None
        )
        reference = record_azure_pcr_boot(
            pcr_values,
            vm_family=vm_family,
            reference=existing,
            image_version_id=image_version,
            reference_id=reference_id,
            security_type=security_type,
            pin_firmware_pcrs=pin_firmware_pcr or [],
            provenance={**checked, **_provenance(provenance or [])},
        )
        _write_json(reference, output)

    _run(record)


@app.command("merge-azure")
def merge_azure(
    sets: Annotated[list[Path], typer.Argument(help="the Azure sets to merge")],
    output: OutputOption = None,
) -> None:
    """One Azure set accepting every value of the given sets."""
    _run(
        lambda: _write_json(
            merge_azure_reference_values(
                [load_reference_values(path, platform="azure") for path in sets]
            ),
            output,
        )
    )


@app.command("check")
def check(
    event_log: EventLogOption,
    pcrs: PcrsOption,
    reference_values: Annotated[Path, typer.Option(help="the reference-value set (JSON)")],
) -> None:
    """Check an event log and its PCR 0-9 against a reference-value set (an empty log: the
    PCRs, 14 included, against the set's pcr_boots)."""

    def judge() -> None:
        pcr_values = _read_pcr_values(pcrs)
        reference = load_reference_values(reference_values)
        # An empty log (Azure Trusted Launch) is judged by the PCR values (pcr_boots).
        print(check_boot_evidence(_read_event_log(event_log), pcr_values, reference).note)

    _run(judge)


@app.command("schema")
def schema() -> None:
    """Print the JSON Schema of reference values."""
    print(json.dumps(reference_values_json_schema(), indent=2, sort_keys=True))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aicert-reference-values`` with ``argv`` (default: the process's arguments).

    Args:
        argv: the command and its options, without the program name.

    Returns:
        The exit code: 0 success, 1 the boot or quote does not verify, 2 bad input (a usage
        error included).
    """
    try:
        app(args=list(sys.argv[1:] if argv is None else argv), prog_name=PROGRAM)
    except SystemExit as exit_:
        # Typer always ends by exiting; the code is an int (or None for success).
        return exit_.code if isinstance(exit_.code, int) else 0
    return 0
