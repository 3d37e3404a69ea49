"""The ``AzurePlatform`` block (``aicert.flows.azure_platform``): the provider it gives, its
fields (one definition shared with ``AzureSettings``), and a save/load round trip on a
Prefect server."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect_azure.credentials import AzureContainerInstanceCredentials
from pydantic import ValidationError

from aicert.flows.azure_platform import AzurePlatform
from aicert.flows.blocks import PlatformBlock, load_platform_block
from aicert.tasks.platforms.azure import AzureProvider, AzureSettings, AzureVmFields
from tests.tasks.platforms.azure.fake_arm import (
    TEST_IMAGE_ID,
    TEST_ORCHESTRATOR,
    TEST_RESOURCE_GROUP,
    TEST_SSH_KEY,
)
from tests.tasks.platforms.azure.guest import derived_reference_values

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"


def _block(**overrides: Any) -> AzurePlatform:
    values: dict[str, Any] = {
        "subscription_id": SUBSCRIPTION,
        "resource_group": TEST_RESOURCE_GROUP,
        "location": "westeurope",
        "image_id": TEST_IMAGE_ID,
        "orchestrator_cidr": TEST_ORCHESTRATOR,
        "ssh_public_key": TEST_SSH_KEY,
    }
    values.update(overrides)
    return AzurePlatform(**values)


def test_platform_block_gives_a_configured_provider(tmp_path: Path) -> None:
    reference_values = derived_reference_values(
        tmp_path, TEST_IMAGE_ID, "aicert-guest-cvm-1.0.0", security_type="ConfidentialVM"
    )
    block = _block(
        security_type="ConfidentialVM",
        reference_values=str(reference_values),
        credentials=AzureContainerInstanceCredentials(),  # empty: DefaultAzureCredential
    )
    provider = block.provider()
    assert isinstance(provider, AzureProvider)
    assert provider.kind == "azure"
    assert provider.settings.security_type == "ConfidentialVM"
    assert provider.settings.orchestrator_cidr == f"{TEST_ORCHESTRATOR}/32"
    assert provider.reference_values() == "aicert-guest-cvm-1.0.0"
    assert provider.agent_start_timeout_s == block.agent_start_timeout_seconds
    assert type(provider.credential).__name__ == "DefaultAzureCredential"
    assert AzurePlatform.get_block_capabilities() == {"aicert-platform"}
    assert isinstance(block, PlatformBlock)


def test_settings_carry_every_shared_field_and_the_renamed_durations() -> None:
    block = _block(
        vm_size="Standard_DC4as_v5",
        agent_port=9443,
        admin_username="operator",
        arm_endpoint="https://management.example.com/",
        agent_start_timeout_seconds=42,
        polling_interval_seconds=3,
    )
    settings = block.settings()
    for name in AzureVmFields.model_fields:
        assert getattr(settings, name) == getattr(block, name), name
    assert settings.arm_endpoint == "https://management.example.com"
    assert (settings.agent_start_timeout_s, settings.polling_interval_s) == (42, 3)
    assert settings.credentials_block is None
    # The provider-only tuning keeps its defaults.
    assert settings.lro_attempts == AzureSettings.model_fields["lro_attempts"].default


# The block's own presentation in the Prefect UI: its field order, and sentence-case titles
# (PlatformBlock), which the provider's settings model does not need.
BLOCK_ONLY_KEYS = {"position", "title"}


def test_block_and_settings_share_each_field_definition() -> None:
    block_schema = AzurePlatform.model_json_schema()["properties"]
    settings_schema = AzureSettings.model_json_schema()["properties"]
    renamed = {name: name for name in AzureVmFields.model_fields}
    renamed["agent_start_timeout_seconds"] = "agent_start_timeout_s"
    renamed["polling_interval_seconds"] = "polling_interval_s"
    for block_name, settings_name in renamed.items():
        block_field = block_schema[block_name]
        settings_field = {
            k: v for k, v in settings_schema[settings_name].items() if k not in BLOCK_ONLY_KEYS
        }
        assert {k: v for k, v in block_field.items() if k not in BLOCK_ONLY_KEYS} == (
            settings_field
        ), block_name
        assert block_field["title"][0].isupper(), block_name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("orchestrator_cidr", "0.0.0.0/0"),
        ("arm_endpoint", "http://management.example.com"),
        ("image_id", "Canonical:ubuntu-24_04-lts:server:latest"),
        ("admin_username", "root"),
        ("agent_start_timeout_seconds", 0),
        ("polling_interval_seconds", 600),
    ],
)
def test_the_block_refuses_what_the_settings_refuse(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        _block(**{field: value})


def test_round_trip_through_the_prefect_server(prefect_api_url: str, tmp_path: Path) -> None:
    name = f"test-{uuid.uuid4().hex[:10]}"
    saved = _block(
        security_type="ConfidentialVM",
        subnet_id=(
            f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-net/providers/"
            "Microsoft.Network/virtualNetworks/vnet/subnets/runs"
        ),
        agent_start_timeout_seconds=123,
        polling_interval_seconds=4.5,
    )
    saved.save(name)
    loaded = load_platform_block(f"aicert-azure-platform/{name}")
    assert isinstance(loaded, AzurePlatform)
    assert loaded.settings() == saved.settings()
    provider = loaded.provider()
    assert isinstance(provider, AzureProvider)
    assert provider.agent_start_timeout_s == 123
