"""``aicert export`` on the stored real certificates, through ``register`` on a fresh Typer app
(the command joins ``aicert`` through the ``aicert.cli`` entry-point group).

Exit codes as ``aicert verify``: 0 exported, 1 not verified (nothing written), 2 bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from click.testing import Result
from google.protobuf import json_format
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement as InTotoStatement
from typer.testing import CliRunner

from aicert.exports.cli import register
from aicert.exports.cyclonedx import bom_json
from aicert.exports.verified import VerifiedCertificate
from tests.verification.verify.seeds import Seed, load_seed

# The formats every verified certificate has; model-signing and slsa need signed statements
# (tests/exports/test_signed_exports.py), which only the local seed carries so far.
FORMATS = ("cyclonedx", "slsa-statement")


def run_export(*args: str | Path) -> Result:
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:  # a second command: typer then keeps `export` as a subcommand name
        """Unused."""

    return CliRunner().invoke(app, ["export", *map(str, args)])


def trust_options(seed: Seed) -> list[str | Path]:
    """The options that verify ``seed`` with ``aicert verify``."""
    manifest = json.loads((seed.folder / "seed.json").read_text())
    options: list[str | Path] = []
    for name in manifest["trusted_roots"]:
        options += ["--trust-root", seed.folder / name]
    if seed.reference_values_path is not None:
        options += ["--reference-values", seed.reference_values_path]
    if seed.allow_dev_platform:
        options.append("--allow-dev-platform")
    return options


@pytest.mark.parametrize("export_format", FORMATS)
def test_a_verified_certificate_is_exported(seed: Seed, export_format: str, tmp_path: Path) -> None:
    output = tmp_path / "out" / f"export.{export_format}.json"
    result = run_export(
        seed.folder / "proof.json", "--format", export_format, "-o", output, *trust_options(seed)
    )
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    assert [p.name for p in output.parent.iterdir()] == [output.name]  # no temporary left
    document = output.read_bytes()
    if export_format == "cyclonedx":
        verified = VerifiedCertificate.of(seed.certificate, seed.verify(), raw=seed.raw)
        assert document.decode() == bom_json(verified)
    else:
        statement = json_format.Parse(document, statement_pb2.Statement())
        InTotoStatement.copy_from_pb(statement).validate()
        subjects = {s.name: s.digest["sha256"] for s in statement.subject}
        assert subjects == seed.outputs


@pytest.mark.parametrize("export_format", FORMATS)
def test_two_exports_are_byte_identical(seed: Seed, export_format: str, tmp_path: Path) -> None:
    outputs = [tmp_path / "first.json", tmp_path / "second.json"]
    for output in outputs:
        options = trust_options(seed)
        result = run_export(seed.folder / "proof.json", "-f", export_format, "-o", output, *options)
        assert result.exit_code == 0, result.output
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


def _tampered(seed: Seed, folder: Path) -> Path:
    """The seed with its first output's digest edited, in the record and its event alike (so
    the certificate is well formed and its event log no longer replays to the quote)."""
    document = json.loads(seed.raw)
    forged = "0" * 64
    document["outputs"][0]["digest"]["sha256"] = forged
    event = next(e for e in document["event_log"] if e["type"] == "aicert.output.file")
    event["data"]["sha256"] = forged
    path = folder / "proof.json"
    path.write_text(json.dumps(document))
    return path


@pytest.mark.parametrize("export_format", FORMATS)
def test_an_unverifiable_certificate_exports_nothing(export_format: str, tmp_path: Path) -> None:
    seed = load_seed("qemu")
    proof = _tampered(seed, tmp_path)
    output = tmp_path / "out" / "export.json"
    result = run_export(proof, "-f", export_format, "-o", output, *trust_options(seed))
    assert result.exit_code == 1, result.output
    assert "NOT VERIFIED" in result.output
    assert "EventLogError" in result.output
    assert not output.parent.exists()


def test_a_failed_export_leaves_an_existing_file_alone(tmp_path: Path) -> None:
    seed = load_seed("local")
    output = tmp_path / "export.json"
    output.write_text("the previous export\n")
    # Without --allow-dev-platform the local certificate does not verify.
    proof, root = seed.folder / "proof.json", seed.folder / "platform-ca.pem"
    result = run_export(proof, "-f", "slsa", "-o", output, "--trust-root", root)
    assert result.exit_code == 1, result.output
    assert "PlatformError" in result.output
    assert output.read_text() == "the previous export\n"
    assert [p.name for p in tmp_path.iterdir()] == ["export.json"]


def test_an_output_path_that_cannot_be_written_is_bad_input(tmp_path: Path) -> None:
    seed = load_seed("local")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    proof = seed.folder / "proof.json"
    result = run_export(proof, "-f", "slsa-statement", "-o", folder, *trust_options(seed))
    assert result.exit_code == 2, result.output
    assert str(folder) in result.output.replace("\n", "")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("bad", ["certificate", "trust-root", "reference-values"])
def test_unreadable_inputs_are_bad_input(bad: str, tmp_path: Path) -> None:
    seed = load_seed("qemu")
    missing = tmp_path / "missing.pem"
    proof: Path = seed.folder / "proof.json"
    options = trust_options(seed)
    if bad == "certificate":
        proof = tmp_path / "missing.json"
    else:
        options[options.index(f"--{bad}") + 1] = missing
    output = tmp_path / "export.json"
    result = run_export(proof, "-f", "cyclonedx", "-o", output, *options)
    assert result.exit_code == 2, result.output
    assert not output.exists()
