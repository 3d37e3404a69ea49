"""AICert's Prefect blocks: Prefect's block standards, save/load, config validation,
registration (CLI and the ``prefect.collections`` entry point), and a flow run configured
entirely from saved blocks."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml
from prefect.blocks.core import Block
from prefect.client.orchestration import SyncPrefectClient
from prefect.testing.standard_test_suites import BlockStandardTestSuite

import aicert
from aicert.flows import AzurePlatform, GcpPlatform
from aicert.flows.blocks import (
    DOCUMENTATION_URL,
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

BLOCKS = [AicertRunConfig, LocalPlatform, QemuPlatform, AzurePlatform, GcpPlatform]
SLUGS = sorted(block.get_block_type_slug() for block in BLOCKS)
DOCS = REPO_ROOT / "docs"


@pytest.mark.parametrize("block", BLOCKS)
class TestBlockStandards(BlockStandardTestSuite):
    """Prefect's own block standards (prefect.testing.standard_test_suites), every block."""

    @pytest.fixture
    def block(self, block: type[Block]) -> type[Block]:
        return block

    def test_has_a_valid_image(self, block: type[Block]) -> None:
        # The inherited check downloads the logo and opens it with Pillow (no network here,
        # and Pillow reads no SVG). The same rules on the file the docs site publishes at
        # that URL: a square between 45 and 1000 px. tests/test_docs.py checks that the
        # built site serves it; tests/deployments/test_ui_blocks.py that the UI shows it.
        logo_url = str(block._logo_url)
        assert logo_url.startswith(f"{DOCUMENTATION_URL}assets/logos/"), logo_url
        svg = ElementTree.parse(DOCS / logo_url.removeprefix(DOCUMENTATION_URL)).getroot()
        assert svg.tag == "{http://www.w3.org/2000/svg}svg"
        width, height = int(svg.get("width", "0")), int(svg.get("height", "0"))
        assert width == height and 1000 > width > 45
        assert svg.get("viewBox") == f"0 0 {width} {height}"

    def test_the_code_example_is_a_fenced_python_block(self, block: type[Block]) -> None:
        # The UI's "paste this snippet" box shows the first ```python block and nothing else.
        example = block.get_code_example()
        assert example is not None
        fenced = re.search(r"```python([\s\S]*?)```", example)
        assert fenced is not None, example
        code = fenced.group(1)
        assert f"from aicert.flows import {block.__name__}" in code
        compile(code, f"{block.__name__} example", "exec")  # valid Python as pasted

    def test_the_documentation_url_is_its_section_of_the_blocks_page(
        self, block: type[Block]
    ) -> None:
        url = str(block._documentation_url)
        assert url == f"{DOCUMENTATION_URL}blocks/#{block.get_block_type_slug()}"
        page = (DOCS / "blocks.md").read_text()
        assert f"{{#{block.get_block_type_slug()}}}" in page  # the anchor exists

    def test_field_titles_are_sentence_case(self, block: type[Block]) -> None:
        # "VM size", "Subnet ID", not the titles pydantic generates ("Vm Size", "Subnet Id").
        for name, field in block.model_json_schema()["properties"].items():
            title = field.get("title", "")
            assert title and not re.search(r"\b(Vm|Id|Os|Vnet|Ssh|Tpm)\b", title), title
            assert "_" not in name or title != name.replace("_", " ").title(), title

    def test_every_field_is_documented_on_the_blocks_page(self, block: type[Block]) -> None:
        page = (DOCS / "blocks.md").read_text()
        section = page.split(f"{{#{block.get_block_type_slug()}}}")[1].split("\n## ")[0]
        for name, field in block.model_json_schema()["properties"].items():
            assert f"| `{name}` | {field['title']} |" in section, name


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
        scratch_gib=12.5,
    ).save(name)
    provider = load_platform_block(f"aicert-qemu-platform/{name}").provider()
    assert isinstance(provider, QemuProvider)
    assert provider.home == (tmp_path / "home").resolve()
    assert provider.image_ref == "qemu-0123456789abcdef"
    assert (provider.accel, provider.memory_mib, provider.smp) == ("tcg", 3072, 2)
    assert provider.boot_timeout_s == 99
    assert provider.agent_start_timeout_s > 99  # the flow outwaits the provider's own bound
    assert provider.scratch_gib == 12.5
    with pytest.raises(ValueError, match="memory_mib"):
        QemuPlatform(memory_mib=64)
    with pytest.raises(ValueError, match="scratch_gib"):
        QemuPlatform(scratch_gib=0)


def _service_account_info() -> dict[str, str]:
    """A service account key of Google's JSON shape, with a key made here (never used
    against Google: the credentials are only built and compared)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": "aicert-tests",
        "private_key_id": "0",
        "private_key": pem,
        "client_email": "aicert-runner@aicert-tests.iam.gserviceaccount.com",
        "client_id": "0",
        "token_uri": "https://oauth2.googleapis.com/token",
    }


def test_gcp_platform_round_trip_and_provider(prefect_api_url: str, tmp_path: Path) -> None:
    """The credentials travel by their saved block's name: a crash hook in another process
    loads them for the teardown (``gcp_provider_for_machine``)."""
    from prefect_gcp import GcpCredentials

    from aicert.flows.gcp_platform import gcp_provider_for_machine
    from aicert.tasks.platforms.base import Machine
    from aicert.tasks.platforms.gcp import GcpProvider

    credentials_name, name = _name(), _name()
    GcpCredentials(service_account_info=_service_account_info()).save(credentials_name)
    GcpPlatform(
        project="aicert-tests",
        zone="europe-west4-a",
        image="projects/aicert-images/global/images/aicert-guest-1-0-0",
        orchestrator_cidr="203.0.113.7/32",
        agent_start_timeout_s=33,
        credentials=GcpCredentials.load(credentials_name),
    ).save(name)
    block = load_platform_block(f"aicert-gcp-platform/{name}")
    assert isinstance(block, GcpPlatform)
    settings = block.settings()
    assert settings.credentials_block == credentials_name and settings.zone == "europe-west4-a"
    provider = block.provider()
    assert provider.agent_start_timeout_s == 33
    machine = Machine(
        provider="gcp",
        run_id="r",
        agent_url="",
        state_dir=str(tmp_path / "runs" / "r"),
        details={"gcp": settings.model_dump(mode="json")},
    )
    rebuilt = gcp_provider_for_machine(machine)
    assert isinstance(rebuilt, GcpProvider) and rebuilt.settings == settings
    email = "aicert-runner@aicert-tests.iam.gserviceaccount.com"
    assert rebuilt.credentials.service_account_email == email  # type: ignore[attr-defined]
    assert provider.credentials.service_account_email == email  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="orchestrator_cidr"):
        GcpPlatform(
            project="aicert-tests",
            zone="z",
            image="projects/aicert-images/global/images/i",
            orchestrator_cidr="0.0.0.0/0",
        )


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
    assert completed.stdout.strip().splitlines()[-1] == str(SLUGS)


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
    assert "Successfully registered 5 blocks" in completed.stdout, completed.stdout
    # What the server holds now, read back: the UI shows exactly this.
    for block in BLOCKS:
        stored = client.read_block_type_by_slug(block.get_block_type_slug())
        assert stored.name == block.get_block_type_name()
        assert str(stored.logo_url) == block._logo_url
        assert str(stored.documentation_url) == block._documentation_url
        assert stored.code_example is not None and "```python" in stored.code_example
        schema = client.get_most_recent_block_schema_for_block_type(stored.id)
        assert schema is not None
        assert schema.fields["properties"] == block.model_json_schema()["properties"]


@pytest.mark.parametrize(
    ("extra_module", "absent"), [("prefect_azure", "AzurePlatform"), ("prefect_gcp", "GcpPlatform")]
)
def test_block_register_without_a_cloud_extra_registers_the_other_four(
    extra_module: str, absent: str, prefect_api_url: str, tmp_path: Path
) -> None:
    # The extra's Prefect collection made unimportable (a None entry in sys.modules): its
    # block is then absent from aicert.flows, not an error that stops the registration of
    # the others.
    script = (
        f"import sys; sys.modules[{extra_module!r}] = None\n"
        "import aicert.flows\n"
        f"assert {absent!r} not in dir(aicert.flows)\n"
        "from prefect.cli import app\n"
        "sys.argv = ['prefect', 'block', 'register', '-m', 'aicert.flows']\n"
        "app()\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(prefect_api_url, tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Successfully registered 4 blocks" in completed.stdout, (
        completed.stdout + completed.stderr
    )


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
