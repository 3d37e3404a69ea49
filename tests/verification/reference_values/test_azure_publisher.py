"""The image publisher's procedure (deployments/azure/README.md, section 3), end to end with
real tools: a swtpm dressed as an Azure vTPM (AK persisted at 0x81000003 by tpm2-tools, its
certificate zero padded in NV 0x01C101D0, under a root shaped like Microsoft's), PCR 0-9
extended by ``tpm2_pcrextend`` with a real boot log's digests, then
``deployments/azure/collect-boot-evidence.sh`` as on the VM, then ``derive-azure`` checking
the AK certificate and the quote before it derives, then ``check``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aicert.reference_values import load_reference_values, main, parse_pcr_values
from aicert.tasks.platforms.swtpm import LocalSwtpm
from aicert.tcg_eventlog import parse_event_log
from tests import REPO_ROOT
from tests.tasks.platforms.azure.guest import (
    AzureLikeChain,
    azure_like_chain,
    install_azure_ak,
    install_nv_certificate,
    tpm2,
)

from .eventlogs import IMAGE_VERSION_ID, REFERENCE_ID, read_log, replayed_pcrs

pytestmark = [pytest.mark.swtpm]
COLLECT = REPO_ROOT / "deployments" / "azure" / "collect-boot-evidence.sh"
EV_NO_ACTION = 0x3


@dataclass(frozen=True)
class Collected:
    folder: Path
    nonce: str
    chain: AzureLikeChain
    intermediates: Path
    root: Path


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collected]:
    workdir = tmp_path_factory.mktemp("azure-vm")
    swtpm = LocalSwtpm.create(workdir / "tpm", workdir / "ek-ca")
    swtpm.start()
    try:
        ak_public = install_azure_ak(swtpm.tcti, workdir / "tools")
        chain = azure_like_chain(ak_public)
        install_nv_certificate(swtpm.tcti, workdir / "tools", chain.leaf_der)
        # What the firmware, shim and GRUB extended during the boot this log records.
        specs = [
            f"{event.pcr}:sha256={event.digests['sha256'].hex()}"
            for event in parse_event_log(read_log()).events
            if event.event_type != EV_NO_ACTION and event.pcr < 10
        ]
        for start in range(0, len(specs), 16):
            tpm2(swtpm.tcti, "tpm2_pcrextend", *specs[start : start + 16], cwd=workdir)
        (workdir / "binary_bios_measurements").write_bytes(read_log())
        nonce = secrets.token_hex(32)
        subprocess.run(
            ["sh", str(COLLECT), str(workdir / "evidence"), nonce],
            env={
                **os.environ,
                "TPM2TOOLS_TCTI": swtpm.tcti,
                "AICERT_BOOT_EVENT_LOG": str(workdir / "binary_bios_measurements"),
            },
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        swtpm.stop()
    (workdir / "intermediates.pem").write_text(chain.intermediate.pem)
    (workdir / "root.pem").write_text(chain.root.pem)
    yield Collected(
        workdir / "evidence", nonce, chain, workdir / "intermediates.pem", workdir / "root.pem"
    )


def _derive_argv(collected: Collected, output: Path) -> list[str]:
    folder = collected.folder
    return [
        "derive-azure",
        "--event-log", str(folder / "binary_bios_measurements"),
        "--pcrs", str(folder / "pcrs.txt"),
        "--image-version", IMAGE_VERSION_ID,
        "--id", REFERENCE_ID,
        "--quote", str(folder / "quote.msg"),
        "--signature", str(folder / "quote.sig"),
        "--ak-public", str(folder / "ak.pub"),
        "--nonce", collected.nonce,
        "--ak-certificate", str(folder / "ak-cert.bin"),
        "--intermediates", str(collected.intermediates),
        "--output", str(output),
    ]  # fmt: skip


def test_collection_script_gathers_the_evidence(collected: Collected) -> None:
    names = {path.name for path in collected.folder.iterdir()}
    assert {"binary_bios_measurements", "pcrs.txt", "quote.msg", "quote.sig", "ak.pub"} <= names
    assert "ak-cert.bin" in names
    assert collected.folder.with_suffix(".tar.gz").is_file()
    # tpm2_pcrread's output is what the log replays to.
    pcrs = parse_pcr_values((collected.folder / "pcrs.txt").read_text())
    assert pcrs == replayed_pcrs(read_log())


def test_derive_checks_ak_certificate_and_quote_then_derives(
    collected: Collected, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "reference-values.json"
    argv = _derive_argv(collected, output)
    assert main([*argv, "--trust-root", str(collected.root)]) == 0, capsys.readouterr().err
    reference = load_reference_values(output, platform="azure")
    assert reference.provenance["quote_verified"] is True
    assert "Azure Virtual TPM Root" in reference.provenance["ak_root"]
    check = ["check", "--event-log", str(collected.folder / "binary_bios_measurements")]
    check += ["--pcrs", str(collected.folder / "pcrs.txt"), "--reference-values", str(output)]
    assert main(check) == 0
    assert f"matches Azure reference values {REFERENCE_ID}" in capsys.readouterr().out


def test_derive_trusts_only_microsofts_root_by_default(
    collected: Collected, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The test root is shaped like Microsoft's but is not the pinned one."""
    output = tmp_path / "reference-values.json"
    assert main(_derive_argv(collected, output)) == 1
    assert "error: " in capsys.readouterr().err
    assert not output.exists()


def test_derive_refuses_a_stale_nonce_or_other_pcrs(
    collected: Collected, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "reference-values.json"
    argv = [*_derive_argv(collected, output), "--trust-root", str(collected.root)]
    stale = argv.copy()
    stale[stale.index("--nonce") + 1] = secrets.token_hex(32)
    assert main(stale) == 1
    assert "nonce" in capsys.readouterr().err.lower()
    other = tmp_path / "pcrs.json"
    other.write_text("{" + ", ".join(f'"{i}": "{"ab" * 32}"' for i in range(10)) + "}")
    edited = argv.copy()
    edited[edited.index("--pcrs") + 1] = str(other)
    assert main(edited) == 1
    without_key = argv.copy()
    del without_key[without_key.index("--ak-public") : without_key.index("--ak-public") + 2]
    assert main(without_key) == 2
    assert "go together" in capsys.readouterr().err
    assert not output.exists()


def test_derive_refuses_a_certificate_for_another_key(
    collected: Collected, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other_chain = azure_like_chain(collected.chain.intermediate.private_key.public_key())
    other = tmp_path / "other-ak-cert.bin"
    other.write_bytes(other_chain.leaf_der + bytes(64))
    (tmp_path / "other-intermediate.pem").write_text(other_chain.intermediate.pem)
    (tmp_path / "other-root.pem").write_text(other_chain.root.pem)
    argv = _derive_argv(collected, tmp_path / "rv.json")
    argv[argv.index("--ak-certificate") + 1] = str(other)
    argv[argv.index("--intermediates") + 1] = str(tmp_path / "other-intermediate.pem")
    assert main([*argv, "--trust-root", str(tmp_path / "other-root.pem")]) == 1
    assert "is not the key of the AK certificate" in capsys.readouterr().err
