"""AICert's Prefect blocks: Prefect's block standards, save/load, config validation,
registration (CLI and the ``prefect.collections`` entry point), and a flow run configured
entirely from saved blocks."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from prefect.blocks.core import Block
from prefect.client.orchestration import SyncPrefectClient
from prefect.testing.standard_test_suites import BlockStandardTestSuite

import aicert
from aicert.flows.blocks import (
    AicertRunConfig,
    LocalPlatform,
    PlatformBlock,
    QemuPlatform,
    load_platform_block,
)
from aicert.flows.flows import certify_training, resolve_platform
from aicert.guest_runtime.config import ConfigError
from aicert.tasks.platforms.local.provider import LocalProvider, platform_ca_certificate_path

from .conftest import (
    REPO_ROOT,
    TRAIN_SCRIPT,
    make_git_repo,
    processes_mentioning,
    run_ids_in,
    subprocess_env,
    training_config,
    unique_project,
)


@pytest.mark.parametrize("block", [AicertRunConfig, LocalPlatform, QemuPlatform])
class TestBlockStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, block: type[Block]) -> type[Block]:
        return block

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        # The inherited check downloads the logo (no network here, and needs Pillow): AICert
        # ships no logo, so the UI shows Prefect's default icon. Assert that, not a skip.
        assert block._logo_url is None


def _name() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def _yaml(**overrides: object) -> str:
    return yaml.safe_dump(
        training_config("from-block", "https://example.invalid/r.git", **overrides)
    )


# -- AicertRunConfig -------------------------------------------------------------------------


def test_run_config_block_round_trip(prefect_api_url: str, tmp_path: Path) -> None:
    name = _name()
    AicertRunConfig(config_yaml=_yaml(), base_dir=str(tmp_path)).save(name)

    loaded = AicertRunConfig.load(name)

    assert loaded.config_yaml == _yaml() and loaded.base_dir == str(tmp_path)
    config = loaded.load_config()
    assert config.project_name() == "from-block"
    assert config.source.git_repo == "https://example.invalid/r.git"  # a URL is left as is
    assert config.limits.timeout_seconds == 120


def test_run_config_resolves_a_relative_repo_against_base_dir(tmp_path: Path) -> None:
    block = AicertRunConfig(
        config_yaml=yaml.safe_dump(training_config("rel", "projects/repo")), base_dir=str(tmp_path)
    )
    assert block.load_config().source.git_repo == str(tmp_path / "projects" / "repo")


@pytest.mark.parametrize(
    ("text", "base_dir", "expected"),
    [
        (_yaml(pythonEntrypoint="x.py"), None, "pythonEntrypoint (line "),
        (_yaml(limits={"timeoutSeconds": 0}), None, "limits.timeoutSeconds"),
        (
            _yaml(resources=[{"url": "ftp://x/y", "destinationPath": "y"}]),
            None,
            "resources[0].url",
        ),
        ("name: [unclosed\n", None, "config_yaml: line 2: invalid YAML"),
        ("- a list\n", None, "config_yaml: the top level must be a mapping"),
        (yaml.safe_dump(training_config("rel", "repo")), None, "source.gitRepo: 'repo'"),
        ("x: " + "y" * 300_000, None, "config_yaml: larger than"),
    ],
)
def test_run_config_errors_name_the_field(text: str, base_dir: str | None, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AicertRunConfig(config_yaml=text, base_dir=base_dir).load_config()
    assert expected in str(caught.value)


# -- LocalPlatform ---------------------------------------------------------------------------


def test_local_platform_round_trip_and_provider(prefect_api_url: str, tmp_path: Path) -> None:
    name = _name()
    LocalPlatform(
        home=str(tmp_path / "home"), agent_start_timeout_seconds=12.5, keep_spare_tpm=False
    ).save(name)

    provider = load_platform_block(name).provider()
    generic = load_platform_block(f"aicert-local-platform/{name}").provider()

    for loaded in (provider, generic):
        assert isinstance(loaded, LocalProvider)
        assert loaded.home == (tmp_path / "home").resolve()
        assert loaded.agent_start_timeout_s == 12.5
        assert loaded.keep_spare_tpm is False
    assert isinstance(resolve_platform("local", name), LocalProvider)
    assert isinstance(LocalPlatform.load(name), PlatformBlock)


def test_local_platform_refuses_a_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match="agent_start_timeout_seconds"):
        LocalPlatform(agent_start_timeout_seconds=0)


def test_qemu_platform_round_trip_and_provider(prefect_api_url: str, tmp_path: Path) -> None:
    from aicert.tasks.platforms.qemu.provider import QemuProvider

    name = _name()
    QemuPlatform(
        home=str(tmp_path / "home"),
        image="qemu-0123456789abcdef",
        accel="tcg",
        memory_mib=3072,
        cpus=2,
        boot_timeout_seconds=99,
    ).save(name)
    provider = load_platform_block(f"aicert-qemu-platform/{name}").provider()
    assert isinstance(provider, QemuProvider)
    assert provider.home == (tmp_path / "home").resolve()
    assert provider.image_ref == "qemu-0123456789abcdef"
    assert (provider.accel, provider.memory_mib, provider.smp) == ("tcg", 3072, 2)
    assert provider.boot_timeout_s == 99
    assert provider.agent_start_timeout_s > 99  # the flow outwaits the provider's own bound
    with pytest.raises(ValueError, match="memory_mib"):
        QemuPlatform(memory_mib=64)


def test_a_run_config_block_is_not_a_platform(prefect_api_url: str) -> None:
    name = _name()
    AicertRunConfig(config_yaml=_yaml()).save(name)
    with pytest.raises(TypeError, match="not a platform"):
        load_platform_block(f"aicert-run-config/{name}")


# -- registration ----------------------------------------------------------------------------


def test_prefect_finds_the_blocks_through_the_collections_entry_point() -> None:
    probe = (
        "from prefect.plugins import load_prefect_collections\n"
        "from prefect.blocks.core import Block\n"
        "from prefect.utilities.dispatch import get_registry_for_type\n"
        "assert 'aicert' in load_prefect_collections()\n"
        "print(sorted(k for k in get_registry_for_type(Block) if k.startswith('aicert')))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == str(
        [
            "aicert-azure-platform",
            "aicert-local-platform",
            "aicert-qemu-platform",
            "aicert-run-config",
        ]
    )


def test_block_register_cli(
    prefect_api_url: str, tmp_path: Path, client: SyncPrefectClient
) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "aicert.flows"],
        env=subprocess_env(prefect_api_url, tmp_path),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Successfully registered 3 blocks" in completed.stdout, completed.stdout
    for slug in ("aicert-run-config", "aicert-local-platform", "aicert-qemu-platform"):
        assert client.read_block_type_by_slug(slug).slug == slug


def test_importing_the_package_for_the_cli_does_not_import_prefect() -> None:
    probe = "import sys, aicert.flows.cli; print('prefect' in sys.modules)"
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout.strip() == "False"


# -- a flow run configured from saved blocks --------------------------------------------------


def test_flow_runs_from_saved_blocks(
    flow_env: str, aicert_home: Path, tmp_path: Path, client: SyncPrefectClient
) -> None:
    project = unique_project("blocks")
    make_git_repo(tmp_path / "base" / "repo", {"train.py": TRAIN_SCRIPT})
    config_name, platform_name = _name(), _name()
    AicertRunConfig(
        config_yaml=yaml.safe_dump(training_config(project, "repo")),
        base_dir=str(tmp_path / "base"),
    ).save(config_name)
    platform_home = tmp_path / "platform-home"
    LocalPlatform(home=str(platform_home)).save(platform_name)
    bom = tmp_path / "proof.json"

    state = certify_training(
        config_block=config_name,
        platform_block=platform_name,
        output_bom=str(bom),
        return_state=True,
    )

    assert state.is_completed(), state.message
    result = state.result()
    # The platform block's home holds the run; $AICERT_HOME only the (finished) run records.
    assert run_ids_in(platform_home) == [result["run_id"]]
    assert run_ids_in(aicert_home) == []
    assert processes_mentioning(str(platform_home)) == []
    report = aicert.load(bom).verify(
        trusted_roots=[platform_ca_certificate_path(platform_home)], allow_dev_platform=True
    )
    assert report.project == project and report.exit_code == 0
    assert {o.path for o in report.outputs} == {"model.json", "metrics/loss.txt"}
    flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert flow_run.parameters["config_block"] == config_name
    assert flow_run.parameters["platform_block"] == platform_name
