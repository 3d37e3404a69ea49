"""The verifier's public API on real certificates: the report, the order of the checks,
the low-level helpers, the names exported at ``aicert``'s root, and the bare install's
imports (no Prefect, Docker or tpm2-pytss)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import aicert
from aicert.appevents import interpret
from aicert.errors import (
    AkMismatchError,
    CertificateChainError,
    EventLogError,
    NonceMismatchError,
    PcrDigestError,
    PlatformError,
    QuoteSignatureError,
    VerificationError,
)
from aicert.guest_runtime.config import RunConfig
from aicert.verify import DEV_PLATFORM_NOTE

from .factory import (
    DEFAULT_OUTPUTS,
    PROJECT,
    RESOURCE_CONTENT,
    RESOURCE_DESTINATION,
    MadeCertificate,
    TpmRig,
    b64,
    flip_bit_b64,
    run_config,
    sha256_hex,
    tampered,
)

CORE_CHECKS = [
    "ak-certificate-chain",
    "ak-public-key",
    "quote",
    "event-log",
    "signed-statements",
    "platform",
]


# -- the report ----------------------------------------------------------------------------------


def test_report_lists_the_checks_in_order(base: MadeCertificate) -> None:
    report = base.verify()
    assert [check.name for check in report.checks] == CORE_CHECKS
    assert all(check.detail for check in report.checks)


def test_report_lists_expectations_after_the_core_checks(
    base: MadeCertificate, tmp_path: Path
) -> None:
    model = tmp_path / "weights.bin"
    model.write_bytes(DEFAULT_OUTPUTS["model/weights.bin"])
    report = base.verify(
        expected_inputs={RESOURCE_DESTINATION: sha256_hex(RESOURCE_CONTENT)}, model=model
    )
    assert [check.name for check in report.checks] == [*CORE_CHECKS, "expected-inputs", "model"]


def test_report_binds_what_the_event_log_measured(base: MadeCertificate) -> None:
    report = base.verify()
    measured = interpret(base.certificate.event_log)
    assert list(report.inputs) == measured.input_records()
    assert list(report.outputs) == measured.output_records()
    assert [(o.path, o.size, o.digest["sha256"]) for o in report.outputs] == [
        (path, len(content), sha256_hex(content))
        for path, content in sorted(DEFAULT_OUTPUTS.items())
    ]
    assert [i.kind for i in report.inputs] == [
        "config",
        "image",
        "image",
        "source",
        "resource",
        "package",
    ]
    resource = next(i for i in report.inputs if i.kind == "resource")
    assert resource.name == RESOURCE_DESTINATION
    assert resource.digest == {"sha256": sha256_hex(RESOURCE_CONTENT)}


def test_report_describes_the_run_and_platform(base: MadeCertificate, rig: TpmRig) -> None:
    report = base.verify()
    params = base.params
    assert report.run_id == params.run_id
    assert report.project == PROJECT
    assert report.platform == "local"
    assert report.boot_chain_attested is False
    assert report.platform_note == DEV_PLATFORM_NOTE
    assert report.nonce == params.nonce.hex()
    assert report.exit_code == 0
    assert report.duration_ms == params.duration_ms
    assert report.finished_at == params.finished_at
    # Without at_time, the chain is judged at the measured end of the run.
    assert report.verified_at_time == params.finished_at
    assert report.ak_root_subject == rig.ca.certificate.subject.rfc4514_string()
    leaf = x509.load_pem_x509_certificate(rig.chain[0].encode())
    assert report.ak_chain_expires_at == leaf.not_valid_after_utc
    assert sorted(report.pcrs) == list(range(16))
    assert report.pcrs[14] == base.certificate.attestation.quote.pcrs["14"]


def test_report_to_dict_is_json(base: MadeCertificate) -> None:
    data = base.verify().to_dict()
    decoded = json.loads(json.dumps(data))
    assert decoded["verified"] is True
    assert decoded["run_id"] == base.params.run_id
    assert [c["name"] for c in decoded["checks"]] == CORE_CHECKS
    assert [o["path"] for o in decoded["outputs"]] == sorted(DEFAULT_OUTPUTS)
    assert list(decoded["pcrs"]) == [str(i) for i in range(16)]


def test_at_time_is_the_time_the_chain_is_judged_at(base: MadeCertificate) -> None:
    when = datetime.now(UTC) + timedelta(hours=1)
    assert base.verify(at_time=when).verified_at_time == when


# -- fail closed, in order -----------------------------------------------------------------------


def _bad_chain(document: dict[str, Any]) -> None:
    document["attestation"]["ak"]["certificate_chain"].reverse()


def _bad_ak(document: dict[str, Any]) -> None:
    public = document["attestation"]["ak"]["public"]
    document["attestation"]["ak"]["public"] = flip_bit_b64(public, -3)


def _bad_signature(document: dict[str, Any]) -> None:
    quote = document["attestation"]["quote"]
    quote["signature"] = flip_bit_b64(quote["signature"], -1)


def _bad_pcr(document: dict[str, Any]) -> None:
    document["attestation"]["quote"]["pcrs"]["3"] = "11" * 32


def _bad_event(document: dict[str, Any]) -> None:
    document["event_log"][2]["data"]["name"] = "other/image:latest"


def _bad_platform(document: dict[str, Any]) -> None:
    document["boot_event_log"] = b64(b"not a boot log")


ORDERED_TAMPERS = [
    (_bad_chain, CertificateChainError),
    (_bad_ak, AkMismatchError),
    (_bad_signature, QuoteSignatureError),
    (_bad_pcr, PcrDigestError),
    (_bad_event, EventLogError),
    (_bad_platform, PlatformError),
]


@pytest.mark.parametrize("first", range(len(ORDERED_TAMPERS)))
def test_the_earliest_failed_check_is_reported(base: MadeCertificate, first: int) -> None:
    # Every tamper from ``first`` on applied at once: the first check's error comes out.
    def mutate(document: dict[str, Any]) -> None:
        for tamper, _ in ORDERED_TAMPERS[first:]:
            tamper(document)

    expected = ORDERED_TAMPERS[first][1]
    with pytest.raises(expected) as caught:
        tampered(base, mutate).verify()
    assert type(caught.value) is expected


# -- low-level helpers on certificate evidence ---------------------------------------------------


def test_verify_quote_on_certificate_evidence(base: MadeCertificate) -> None:
    attestation = base.certificate.attestation
    pcrs = attestation.quote.pcr_values()
    parsed = aicert.verify_quote(
        attestation.quote.attest,
        attestation.quote.signature,
        attestation.ak.public,
        attestation.nonce,
        pcrs,
    )
    assert parsed.extra_data == base.params.nonce
    assert list(parsed.quote.pcr_select.selections[0].pcrs) == list(range(16))  # type: ignore[union-attr]

    # The AK as PEM (from its certificate) is accepted too.
    leaf = x509.load_pem_x509_certificate(attestation.ak.certificate_chain[0].encode())
    pem = leaf.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    aicert.verify_quote(
        attestation.quote.attest, attestation.quote.signature, pem, attestation.nonce, pcrs
    )
    with pytest.raises(NonceMismatchError):
        aicert.verify_quote(
            attestation.quote.attest, attestation.quote.signature, pem, b"\x00" * 32, pcrs
        )


def test_parse_event_log_refuses_garbage() -> None:
    with pytest.raises(EventLogError):
        aicert.parse_event_log(b"\x00" * 64)


def test_verify_artifact_returns_the_matched_count(base: MadeCertificate, tmp_path: Path) -> None:
    for relative, content in DEFAULT_OUTPUTS.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(content)
    assert base.certificate.verify_artifact(tmp_path) == len(DEFAULT_OUTPUTS)
    assert base.certificate.verify_artifact(tmp_path / "metrics.json") == 1


def test_written_certificate_loads_and_verifies(base: MadeCertificate, tmp_path: Path) -> None:
    path = base.certificate.write(tmp_path / "proof.json")
    loaded = aicert.load(path)
    assert loaded == base.certificate
    report = loaded.verify(trusted_roots=[base.trust_root_pem], allow_dev_platform=True)
    assert report.run_id == base.params.run_id


def test_trusted_root_as_path_bytes_or_certificate(base: MadeCertificate, tmp_path: Path) -> None:
    root_path = tmp_path / "root.pem"
    root_path.write_text(base.trust_root_pem)
    root = x509.load_pem_x509_certificate(base.trust_root_pem.encode())
    for trusted in (root_path, str(root_path), base.trust_root_pem.encode(), root):
        base.verify(trusted_roots=[trusted])
    # A root the caller cannot read is the caller's mistake, not the certificate's fault.
    with pytest.raises(ValueError, match=r"trusted_roots\[0\] .*absent.pem: cannot read"):
        base.verify(trusted_roots=[tmp_path / "absent.pem"])


# -- project name: the verifier's derivation mirrors the builder's --------------------------------


@pytest.mark.parametrize(
    "source",
    [
        {"name": "named-project"},
        {"source": {"gitRepo": "https://git.example.org/acme/Flowers_Classifier.git"}},
        {"source": {"gitRepo": "/srv/repos/my.repo/", "subdirectory": "train/Net V2"}},
        {"source": {"gitRepo": "https://example.org/___.git"}},
    ],
)
def test_measured_project_matches_the_builders_project_name(source: dict[str, Any]) -> None:
    from aicert.appevents import ConfigEvent, MeasuredRun

    config = RunConfig.model_validate(
        {"kind": "python", "pythonEntryPoint": "main.py", **{"source": {"gitRepo": "x"}}, **source}
    )
    measured = MeasuredRun(
        runtime=None,  # type: ignore[arg-type]
        channel_key=None,
        config=ConfigEvent(config=config.measured_form()),
        images=(),
        source=None,
        resources=(),
        packages=(),
        outputs=(),
        result=None,  # type: ignore[arg-type]
    )
    assert measured.project == config.project_name()


def test_factory_config_is_a_valid_run_config() -> None:
    config = RunConfig.model_validate(run_config())
    assert config.measured_form() == run_config()
    assert config.project_name() == PROJECT


# -- public names ---------------------------------------------------------------------------------

PUBLIC_NAMES = {
    "load",
    "Certificate",
    "VerificationReport",
    "Check",
    "verify_quote",
    "parse_event_log",
    "TcgEventLog",
    "VerificationError",
    "MalformedCertificateError",
    "TpmStructureError",
    "CertificateChainError",
    "AkMismatchError",
    "QuoteSignatureError",
    "AttestStructureError",
    "NonceMismatchError",
    "PcrSelectionError",
    "PcrDigestError",
    "EventLogError",
    "PlatformError",
    "ExpectationError",
    "ArtifactMismatchError",
}


def test_public_names_are_exported_at_the_root() -> None:
    assert set(aicert.__all__) >= PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        assert getattr(aicert, name) is not None
    errors = [getattr(aicert, n) for n in PUBLIC_NAMES if n.endswith("Error")]
    assert all(issubclass(error, aicert.VerificationError) for error in errors)
    assert aicert.VerificationError is VerificationError
    assert callable(aicert.Certificate.verify) and callable(aicert.Certificate.verify_artifact)


BLOCKED_IMPORTS = ("prefect", "docker", "tpm2_pytss", "fastapi", "uvicorn", "httpx", "yaml")

_BLOCKING_SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}

    class NotInstalled:
        # Wraps each import finder so that the blocked packages look absent: find_spec
        # returns None, importing raises ModuleNotFoundError, as on a bare install.
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return self.finder.find_spec(name, path, target)

        def invalidate_caches(self):
            getattr(self.finder, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [NotInstalled(finder) for finder in sys.meta_path]
    import aicert, aicert.verify, aicert.cli, aicert.appevents, aicert.chain
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    from aicert.cli import main
    try:
        main(sys.argv[1:])  # typer ends it with SystemExit
    finally:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
    """
)


def test_bare_verifier_imports_and_verifies_without_builder_dependencies(
    base: MadeCertificate, tmp_path: Path
) -> None:
    """The verifier and its CLI must work where Prefect, Docker and libtss2 are absent."""
    proof = base.certificate.write(tmp_path / "proof.json")
    root = tmp_path / "root.pem"
    root.write_text(base.trust_root_pem)
    script = _BLOCKING_SCRIPT.format(blocked=BLOCKED_IMPORTS)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "verify",
            str(proof),
            "--trust-root",
            str(root),
            "--allow-dev-platform",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verified"] is True


def test_blocker_really_blocks(tmp_path: Path) -> None:
    # The control of the test above: the same blocker makes a builder import fail.
    script = _BLOCKING_SCRIPT.format(blocked=BLOCKED_IMPORTS).replace(
        "import aicert, aicert.verify", "import aicert.guest_runtime.tpm, aicert.verify"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode != 0
    assert "No module named 'tpm2_pytss'" in result.stderr
