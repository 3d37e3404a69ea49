"""``aicert run`` refuses a GPU job on a platform that cannot pass GPUs (qemu: no
passthrough) with exit code 2, naming ``gpus`` and the platform, before anything is
provisioned; the same config passes this check on the local platform."""

from __future__ import annotations

from pathlib import Path

from .test_config_refusals import VALID_CONFIG, home, invoke  # noqa: F401 (home: a fixture)


def test_qemu_refuses_gpus_before_provisioning(home: Path, tmp_path: Path) -> None:  # noqa: F811
    config = tmp_path / "aicert.yaml"
    config.write_text(VALID_CONFIG + "gpus: 1\n")
    result = invoke("--config", str(config), "--output-bom", str(tmp_path / "proof.json"),
                    "--provider", "qemu")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert not home.exists(), "something was provisioned for a refused GPU job"
    assert (
        "gpus: 1 GPUs asked for, but the qemu platform cannot pass GPUs to its machine (its VM "
        "has no GPU passthrough); GPU jobs run on the local platform, on a host with NVIDIA "
        "GPUs and the NVIDIA Container Toolkit"
    ) in " ".join(result.stderr.split())
