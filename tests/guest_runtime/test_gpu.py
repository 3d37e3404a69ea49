"""GPU jobs on the agent's side: the ``gpus`` field, the platforms that cannot pass GPUs, and
what ``nvidia-smi`` reports turned into the ``aicert.input.gpus`` event, bounded and checked.

``nvidia-smi`` here is ``fake_nvidia_smi``: a double for hardware this machine does not have,
printing the real format."""

from __future__ import annotations

from pathlib import Path

import pytest

from aicert.gpus import GpuDevice, GpuEvent
from aicert.guest_runtime import gpu
from aicert.guest_runtime.config import ConfigError, load_config, parse_config
from aicert.guest_runtime.gpu import GpuError, query_gpus, refuse_gpus_on_platform

from .fake_nvidia_smi import (
    COMPUTE_HEADER,
    GPU_LIST,
    H100_UUIDS,
    install_fake_nvidia_smi,
    path_with,
)

CONFIG = "kind: python\nsource:\n  gitRepo: https://example.org/r.git\n  tag: v1\n"


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", path_with(folder))
    return folder


def config_problem(tmp_path: Path, extra: str) -> str:
    path = tmp_path / "aicert.yaml"
    path.write_text(CONFIG + extra)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    (problem,) = refused.value.problems
    return problem


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "gpus: all\n",
            "gpus (line 5): 'all' is not accepted: give how many GPUs the job gets (0 to 32), "
            "so that the certificate says how many it was meant to have",
        ),
        ("gpus: '2'\n", "gpus (line 5): '2' is text: give a whole number of GPUs, 0 to 32"),
        ("gpus: yes\n", "gpus (line 5): YAML read yes as a true/false value, not a number"),
        ("gpus: 1.5\n", "gpus (line 5): expected a whole number, got 1.5"),
        ("gpus: 33\n", "gpus (line 5): 33 is out of range: allowed 0 to 32 GPUs"),
    ],
    ids=["all", "quoted", "yaml-bool", "fraction", "too-many"],
)
def test_gpus_is_a_bounded_count(tmp_path: Path, extra: str, expected: str) -> None:
    assert config_problem(tmp_path, extra) == expected


def test_a_gpu_count_is_measured_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "aicert.yaml"
    path.write_text(CONFIG + "gpus: 2\n")
    assert load_config(path).measured_form()["gpus"] == 2


@pytest.mark.parametrize("platform", ["qemu", "azure", "gcp"])
def test_platforms_that_cannot_pass_gpus_refuse_them(platform: str) -> None:
    config = parse_config({"source": {"gitRepo": "x", "tag": "v1"}, "gpus": 2})
    with pytest.raises(GpuError) as refused:
        refuse_gpus_on_platform(config, platform)
    assert str(refused.value) == (
        f"config: gpus: 2 GPUs asked for, but the {platform} platform cannot pass GPUs to its "
        f"machine ({gpu.NO_GPU_PLATFORMS[platform]}); GPU jobs run on the local platform, "
        "on a host with NVIDIA GPUs and the NVIDIA Container Toolkit"
    )
    refuse_gpus_on_platform(config, "local")
    refuse_gpus_on_platform(config.model_copy(update={"gpus": 0}), platform)


def test_nvidia_smi_facts_of_the_gpus_passed(fake_bin: Path) -> None:
    install_fake_nvidia_smi(fake_bin)
    assert query_gpus(1) == GpuEvent(
        driver_version="550.54.15",
        cuda_version="12.4",
        devices=[
            GpuDevice(
                index=0, name="NVIDIA H100 80GB HBM3", uuid=H100_UUIDS[0], memory_total_mib=81559
            )
        ],
    )
    assert [device.uuid for device in query_gpus(2).devices] == list(H100_UUIDS)


def test_the_devices_passed_are_0_to_n_whatever_the_listing_order(fake_bin: Path) -> None:
    reversed_list = "".join(reversed(GPU_LIST.splitlines(keepends=True)))
    install_fake_nvidia_smi(fake_bin, gpu_list=reversed_list)
    assert [device.index for device in query_gpus(2).devices] == [0, 1]


def test_more_gpus_than_the_machine_has(fake_bin: Path) -> None:
    install_fake_nvidia_smi(fake_bin)
    with pytest.raises(GpuError, match=r"^config: gpus: 3 GPUs asked for, but nvidia-smi lists 2 "):
        query_gpus(3)


def test_no_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GpuError) as refused:
        query_gpus(1)
    assert str(refused.value) == (
        "config: gpus: nvidia-smi is not on this machine's PATH: no NVIDIA driver to ask which "
        "GPUs the job gets (install the NVIDIA driver and the NVIDIA Container Toolkit)"
    )


@pytest.mark.parametrize(
    ("gpu_list", "header", "expected"),
    [
        (
            "0, NVIDIA H100, GPU-14ac2834-0d81-0508-69eb-e25264c08d21, 550.54.15\n",
            COMPUTE_HEADER,
            "nvidia-smi line 1 is not '<index>, <name>, <uuid>, <driver>, <memory MiB>'",
        ),
        (
            GPU_LIST.replace("81559", "81559 MiB"),
            COMPUTE_HEADER,
            "nvidia-smi line 1 is not '<index>, <name>, <uuid>, <driver>, <memory MiB>'",
        ),
        (
            GPU_LIST.replace(H100_UUIDS[0], "GPU-xyz"),
            COMPUTE_HEADER,
            "nvidia-smi line 1 ('0, NVIDIA H100 80GB HBM3, GPU-xyz, 550.54.15, 81559'): ",
        ),
        (
            GPU_LIST.replace("550.54.15", "550.54.14", 1),
            COMPUTE_HEADER,
            "nvidia-smi reports several driver versions: ['550.54.14', '550.54.15']",
        ),
        (GPU_LIST, "Driver Version : 550.54.15\n", "nvidia-smi -q gave 0 'CUDA Version' lines"),
        (
            GPU_LIST,
            COMPUTE_HEADER.replace("12.4", "twelve"),
            "nvidia-smi's answer is not a GPU description: ",
        ),
        ("0, GPU, x, 1, 2\n" * 200, COMPUTE_HEADER, "nvidia-smi listed 200 GPUs"),
    ],
    ids=[
        "four-fields",
        "units",
        "bad-uuid",
        "two-drivers",
        "no-cuda",
        "bad-cuda",
        "too-many-lines",
    ],
)
def test_malformed_nvidia_smi_answers_are_refused(
    fake_bin: Path, gpu_list: str, header: str, expected: str
) -> None:
    install_fake_nvidia_smi(fake_bin, gpu_list=gpu_list, header=header)
    with pytest.raises(GpuError) as refused:
        query_gpus(1)
    assert str(refused.value).startswith("config: gpus: " + expected), str(refused.value)


def test_nvidia_smi_failing_is_reported_with_its_output(fake_bin: Path) -> None:
    install_fake_nvidia_smi(
        fake_bin, gpu_list="NVIDIA-SMI has failed because it couldn't communicate\n", exit_code=9
    )
    with pytest.raises(GpuError) as refused:
        query_gpus(1)
    assert str(refused.value) == (
        "config: gpus: nvidia-smi --query-gpu=index,name,uuid,driver_version,memory.total "
        "--format=csv,noheader,nounits failed (exit code 9): NVIDIA-SMI has failed because it "
        "couldn't communicate"
    )


def test_a_hung_nvidia_smi_is_killed_at_the_timeout(fake_bin: Path) -> None:
    install_fake_nvidia_smi(fake_bin, sleep_s=60)
    with pytest.raises(GpuError, match=r"did not answer within 0\.5 s and was killed$"):
        gpu.run_nvidia_smi(["-q", "-d", "COMPUTE"], timeout_s=0.5)


def test_an_endless_nvidia_smi_answer_is_cut(fake_bin: Path) -> None:
    install_fake_nvidia_smi(fake_bin, header="x" * (gpu.MAX_NVIDIA_SMI_OUTPUT_BYTES + 10))
    with pytest.raises(GpuError, match=f"wrote more than {gpu.MAX_NVIDIA_SMI_OUTPUT_BYTES} bytes"):
        gpu.run_nvidia_smi(["-q", "-d", "COMPUTE"])
