"""``aicert verify`` and ``aicert inspect``, run as a user runs them: the installed console
script in a subprocess, on real certificates.

Exit codes: 0 verified, 1 not verified (the error type is printed), 2 bad input.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .factory import (
    DEFAULT_OUTPUTS,
    RESOURCE_CONTENT,
    RESOURCE_DESTINATION,
    MadeCertificate,
    flip_bit_b64,
    sha256_hex,
    tampered,
)

AICERT = Path(sys.executable).parent / "aicert"


@dataclass(frozen=True)
class Files:
    proof: Path
    root: Path
    folder: Path


@pytest.fixture
def files(base: MadeCertificate, tmp_path: Path) -> Files:
    proof = base.certificate.write(tmp_path / "proof.json")
    root = tmp_path / "platform-ca.pem"
    root.write_text(base.trust_root_pem)
    folder = tmp_path / "outputs"
    for relative, content in DEFAULT_OUTPUTS.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    return Files(proof, root, folder)


def aicert_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert AICERT.is_file(), f"the console script {AICERT} is not installed"
    return subprocess.run(
        [str(AICERT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        # A wide terminal: rich would otherwise fold long digests across lines.
        env={"PATH": str(AICERT.parent), "COLUMNS": "250", "NO_COLOR": "1"},
    )


def test_verify_succeeds_with_trust_root_and_dev_platform(
    files: Files, base: MadeCertificate
) -> None:
    result = aicert_cli("verify", files.proof, "--trust-root", files.root, "--allow-dev-platform")
    assert result.returncode == 0, result.stderr
    assert "VERIFIED" in result.stdout
    assert base.params.run_id in result.stdout
    for check in ("ak-certificate-chain", "ak-public-key", "quote", "event-log", "platform"):
        assert check in result.stdout
    # The human table shortens digests (--json has them whole): the prefix is enough here.
    assert sha256_hex(DEFAULT_OUTPUTS["metrics.json"])[:16] in result.stdout


def test_verify_refuses_a_local_certificate_without_dev_platform_flag(files: Files) -> None:
    result = aicert_cli("verify", files.proof, "--trust-root", files.root)
    assert result.returncode == 1
    assert "NOT VERIFIED" in result.stderr and "PlatformError" in result.stderr


def test_verify_refuses_without_trust_root(files: Files) -> None:
    result = aicert_cli("verify", files.proof, "--allow-dev-platform")
    assert result.returncode == 1
    assert "CertificateChainError" in result.stderr


def test_verify_refuses_a_tampered_certificate(
    files: Files, base: MadeCertificate, tmp_path: Path
) -> None:
    def mutate(document: dict[str, Any]) -> None:
        quote = document["attestation"]["quote"]
        quote["signature"] = flip_bit_b64(quote["signature"], -1)

    bad = tampered(base, mutate).certificate.write(tmp_path / "tampered.json")
    result = aicert_cli("verify", bad, "--trust-root", files.root, "--allow-dev-platform")
    assert result.returncode == 1
    assert "NOT VERIFIED" in result.stderr
    assert "QuoteSignatureError" in result.stderr


@pytest.mark.parametrize(
    "content", [b"{not json", b"", b'{"format": "aicert/v1"}'], ids=["syntax", "empty", "schema"]
)
def test_verify_reports_a_malformed_file_with_exit_code_2(
    files: Files, tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    result = aicert_cli("verify", path, "--trust-root", files.root, "--allow-dev-platform")
    assert result.returncode == 2
    assert "MalformedCertificateError" in result.stderr


def test_verify_reports_a_missing_file_with_exit_code_2(files: Files, tmp_path: Path) -> None:
    result = aicert_cli("verify", tmp_path / "absent.json", "--trust-root", files.root)
    assert result.returncode == 2


def test_verify_json_output(files: Files, base: MadeCertificate) -> None:
    result = aicert_cli(
        "verify", files.proof, "--trust-root", files.root, "--allow-dev-platform", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verified"] is True
    assert report["run_id"] == base.params.run_id
    assert report["boot_chain_attested"] is False
    assert [o["path"] for o in report["outputs"]] == sorted(DEFAULT_OUTPUTS)
    assert [o["digest"]["sha256"] for o in report["outputs"]] == [
        sha256_hex(content) for _, content in sorted(DEFAULT_OUTPUTS.items())
    ]


def test_verify_json_output_on_failure(files: Files) -> None:
    result = aicert_cli("verify", files.proof, "--trust-root", files.root, "--json")
    assert result.returncode == 1
    outcome = json.loads(result.stdout)
    assert outcome == {
        "verified": False,
        "error": "PlatformError",
        "message": outcome["message"],
    }
    assert "allow_dev_platform" in outcome["message"]


def test_verify_model_folder_and_file(files: Files) -> None:
    common = ("--trust-root", files.root, "--allow-dev-platform", "--json")
    folder = aicert_cli("verify", files.proof, *common, "--model", files.folder)
    assert folder.returncode == 0, folder.stdout
    assert json.loads(folder.stdout)["checks"][-1]["name"] == "model"

    weights = files.folder / "model" / "weights.bin"
    weights.write_bytes(weights.read_bytes() + b"backdoor")
    altered = aicert_cli("verify", files.proof, *common, "--model", weights)
    assert altered.returncode == 1
    assert json.loads(altered.stdout)["error"] == "ArtifactMismatchError"


def test_verify_expect_input(files: Files) -> None:
    common = ("--trust-root", files.root, "--allow-dev-platform", "--json")
    good = f"{RESOURCE_DESTINATION}={sha256_hex(RESOURCE_CONTENT)}"
    result = aicert_cli("verify", files.proof, *common, "--expect", good)
    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["checks"][-1]["name"] == "expected-inputs"

    wrong = f"{RESOURCE_DESTINATION}={sha256_hex(b'other data')}"
    result = aicert_cli("verify", files.proof, *common, "--expect", wrong)
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"] == "ExpectationError"

    result = aicert_cli("verify", files.proof, *common, "--expect", "no-equals-sign")
    assert result.returncode == 2


def test_inspect_shows_the_claimed_run(files: Files, base: MadeCertificate) -> None:
    result = aicert_cli("inspect", files.proof)
    assert result.returncode == 0, result.stderr
    assert base.params.run_id in result.stdout
    assert "not verified" in result.stdout
    assert RESOURCE_DESTINATION in result.stdout
    assert sha256_hex(DEFAULT_OUTPUTS["metrics.json"])[:16] in result.stdout


def test_inspect_reports_a_malformed_file_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_bytes(b"[]")
    assert aicert_cli("inspect", path).returncode == 2
