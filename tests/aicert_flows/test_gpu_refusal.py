"""A GPU job on a platform that cannot pass GPUs (qemu: no passthrough) is refused before
anything is provisioned, naming ``gpus`` and the platform: by ``aicert run`` with exit code
2, and by the certifying flows themselves (what a deployment or a block runs)."""

from __future__ import annotations

from pathlib import Path

from aicert.flows.flows import certify_training

from .conftest import run_ids_in
from .test_config_refusals import VALID_CONFIG, home, invoke  # noqa: F401 (home: a fixture)

REFUSAL = (
    "gpus: 1 GPUs asked for, but the qemu platform cannot pass GPUs to its machine (its VM "
    "has no GPU passthrough); GPU jobs run on the local platform, on a host with NVIDIA "
    "GPUs and the NVIDIA Container Toolkit"
)


def test_qemu_refuses_gpus_before_provisioning(home: Path, tmp_path: Path) -> None:  # noqa: F811
    config = tmp_path / "aicert.yaml"
    config.write_text(VALID_CONFIG + "gpus: 1\n")
    result = invoke("--config", str(config), "--output-bom", str(tmp_path / "proof.json"),
                    "--provider", "qemu")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert not home.exists(), "something was provisioned for a refused GPU job"
    assert REFUSAL in " ".join(result.stderr.split())


def test_the_flow_refuses_gpus_on_qemu_before_provisioning(
    flow_env: str, aicert_home: Path, tmp_path: Path
) -> None:
    config = tmp_path / "aicert.yaml"
    config.write_text(VALID_CONFIG + "gpus: 1\n")
    state = certify_training(config_path=str(config), provider="qemu", return_state=True)
    assert state.is_failed()
    assert REFUSAL in str(state.message)
    assert run_ids_in(aicert_home) == []
    assert not (aicert_home / "runs").exists()
