"""The reference-values commands as ``aicert reference-values <command>`` (through typer's
CliRunner), as ``main(argv)``, as ``python -m aicert.reference_values`` and as the installed
``aicert-reference-values`` console script: the same commands, options, output and exit codes
(0 success, 1 refused, 2 bad input).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aicert.cli import app
from aicert.reference_values import (
    AzureReferenceValueSet,
    load_reference_values,
    main,
    parse_reference_values,
    reference_values_json_schema,
)
from tests.verification.reference_values.eventlogs import (
    IMAGE_VERSION_ID,
    REFERENCE_ID,
    find_event,
    read_log,
    replayed_pcrs,
    with_other_digest,
)

EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
runner = CliRunner()


def _boot_files(folder: Path, raw: bytes) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "binary_bios_measurements"
    log_path.write_bytes(raw)
    pcrs_path = folder / "pcrs.json"
    pcrs_path.write_text(json.dumps({str(i): v.hex() for i, v in replayed_pcrs(raw).items()}))
    return log_path, pcrs_path


def _derive_argv(log_path: Path, pcrs_path: Path) -> list[str]:
    return [
        "derive-azure",
        "--event-log",
        str(log_path),
        "--pcrs",
        str(pcrs_path),
        "--image-version",
        IMAGE_VERSION_ID,
        "--provenance",
        "vm_size=Standard_D4s_v5",
    ]


@pytest.fixture
def boot(tmp_path: Path) -> tuple[Path, Path]:
    """The main log of a Trusted-Launch-like boot and the PCR 0-9 it replays to."""
    return _boot_files(tmp_path / "boot", read_log())


def test_aicert_lists_the_reference_values_commands() -> None:
    result = runner.invoke(app, ["reference-values", "--help"])
    assert result.exit_code == 0
    for command in ("derive-azure", "merge-azure", "check", "schema"):
        assert command in result.output


def test_derive_merge_and_check_through_aicert(tmp_path: Path, boot: tuple[Path, Path]) -> None:
    derived = tmp_path / "rv.json"
    result = runner.invoke(app, ["reference-values", *_derive_argv(*boot), "-o", str(derived)])
    assert result.exit_code == 0, result.output
    reference = load_reference_values(derived, platform="azure")
    assert reference.id == REFERENCE_ID
    assert reference.provenance["vm_size"] == "Standard_D4s_v5"
    merged = tmp_path / "merged.json"
    merge = ["reference-values", "merge-azure", str(derived), str(derived)]
    result = runner.invoke(app, [*merge, "--output", str(merged)])
    assert result.exit_code == 0, result.output
    assert load_reference_values(merged, platform="azure").pcrs == reference.pcrs
    log_path, pcrs_path = boot
    check = ["reference-values", "check", "--event-log", str(log_path), "--pcrs", str(pcrs_path)]
    result = runner.invoke(app, [*check, "--reference-values", str(merged)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"boot chain matches Azure reference values {REFERENCE_ID}")


def test_derive_prints_the_set_without_output(boot: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["reference-values", *_derive_argv(*boot)])
    assert result.exit_code == 0, result.output
    assert isinstance(parse_reference_values(result.stdout), AzureReferenceValueSet)


def test_a_changed_component_is_refused_with_exit_1(
    tmp_path: Path, boot: tuple[Path, Path]
) -> None:
    derived = tmp_path / "rv.json"
    assert main([*_derive_argv(*boot), "-o", str(derived)]) == 0
    raw = read_log()
    first_application = find_event(raw, lambda e: e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
    other_boot = with_other_digest(raw, first_application.index)
    log_path, pcrs_path = _boot_files(tmp_path / "other", other_boot)
    argv = ["check", "--event-log", str(log_path), "--pcrs", str(pcrs_path)]
    result = runner.invoke(app, ["reference-values", *argv, "--reference-values", str(derived)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: boot loader (shim): ")


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no command"),
        pytest.param(["derive-azure", "--pcrs", "p.json"], id="a required option missing"),
        pytest.param(["merge-azure"], id="no set to merge"),
        pytest.param(["frobnicate"], id="unknown command"),
        pytest.param(["check", "--event-log", "a", "--pcrs", "b"], id="no reference values"),
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    assert runner.invoke(app, ["reference-values", *argv]).exit_code == 2
    assert main(argv) == 2


def test_bad_input_exits_2_with_one_error_line(tmp_path: Path, boot: tuple[Path, Path]) -> None:
    log_path, _ = boot
    missing = tmp_path / "missing.json"
    argv = ["derive-azure", "--event-log", str(log_path), "--pcrs", str(missing)]
    result = runner.invoke(app, ["reference-values", *argv, "--image-version", IMAGE_VERSION_ID])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: [Errno 2] No such file or directory")
    bad_provenance = [*_derive_argv(*boot), "--provenance", "no-equals-sign"]
    result = runner.invoke(app, ["reference-values", *bad_provenance])
    assert result.exit_code == 2
    assert result.stderr == "error: --provenance 'no-equals-sign': use KEY=VALUE\n"
    quote_alone = [*_derive_argv(*boot), "--quote", str(log_path)]
    result = runner.invoke(app, ["reference-values", *quote_alone])
    assert result.exit_code == 2
    assert "go together" in result.stderr
    certificate_alone = [*_derive_argv(*boot), "--ak-certificate", str(log_path)]
    assert main(certificate_alone) == 2


def test_schema_prints_the_json_schema() -> None:
    result = runner.invoke(app, ["reference-values", "schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == reference_values_json_schema()


def test_python_dash_m_runs_the_commands(boot: tuple[Path, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aicert.reference_values", *_derive_argv(*boot)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert isinstance(parse_reference_values(result.stdout), AzureReferenceValueSet)


def test_the_console_script(tmp_path: Path, boot: tuple[Path, Path]) -> None:
    script = Path(sys.executable).parent / "aicert-reference-values"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    schema = subprocess.run([script, "schema"], capture_output=True, check=True, timeout=60)
    assert json.loads(schema.stdout) == reference_values_json_schema()
    derived = subprocess.run(
        [script, *_derive_argv(*boot)], capture_output=True, check=True, timeout=60
    )
    assert isinstance(parse_reference_values(derived.stdout), AzureReferenceValueSet)
    log_path, pcrs_path = boot
    missing = tmp_path / "missing.json"
    argv = ["check", "--event-log", str(log_path), "--pcrs", str(pcrs_path)]
    # An unreadable set is a PlatformError, as with `aicert verify`'s library call: exit 1.
    refused = subprocess.run(
        [script, *argv, "--reference-values", str(missing)], capture_output=True, timeout=60
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith(b"error: reference values ")
    usage = subprocess.run([script, "derive-azure"], capture_output=True, timeout=60)
    assert usage.returncode == 2
