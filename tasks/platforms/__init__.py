"""Platforms a certification can run on, each behind the ``Provider`` interface.

One subpackage per platform (``local``, ``qemu``, ``azure``, ``gcp``) beside what they share: the
interface (``base``), machine attestation before the run (``attestation``), AK enrolment with
the project's platform CA (``enrollment``, ``platform_ca``, ``swtpm``), input staging for
machines without network (``staging``), the agent's client (``agent_client``) and the offline
base image (``base_image``). Nothing here imports Prefect: the blocks that configure a
platform live in ``aicert.flows``, and ``aicert.tasks`` forwards these modules' log records
into the Prefect run. Adding a platform: docs/adding-a-platform.md.
"""

from __future__ import annotations

from aicert.tasks.platforms.base import EnrolledKey, Machine, Provider
from aicert.tasks.platforms.local.provider import LocalProvider
from aicert.tasks.platforms.qemu.provider import QemuProvider

PROVIDERS: dict[str, type[Provider]] = {"local": LocalProvider, "qemu": QemuProvider}


def get_provider(name: str | Provider) -> Provider:
    if isinstance(name, Provider):
        return name
    if name == "azure":
        raise ValueError(
            "provider: azure needs its settings: save an AzurePlatform block and pass "
            "platform_block='aicert-azure-platform/<name>'"
        )
    if name == "gcp":
        raise ValueError(
            "provider: gcp needs its settings: save a GcpPlatform block and pass "
            "platform_block='aicert-gcp-platform/<name>'"
        )
    try:
        return PROVIDERS[name]()
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ValueError(f"provider: unknown platform {name!r} (available: {known})") from None


def provider_for_machine(machine: Machine) -> Provider:
    """A provider able to tear ``machine`` down in a process that did not provision it.

    An ``azure`` or ``gcp`` machine also needs its credentials:
    ``aicert.flows.azure_platform.azure_provider_for_machine`` and
    ``aicert.flows.gcp_platform.gcp_provider_for_machine`` resolve the credentials block
    its settings name (without one, the default chain is used here).
    """
    if machine.provider == "azure":
        from aicert.tasks.platforms.azure import AzureProvider

        return AzureProvider.for_machine(machine)
    if machine.provider == "gcp":
        from aicert.tasks.platforms.gcp import GcpProvider

        return GcpProvider.for_machine(machine)
    return get_provider(machine.provider)


__all__ = [
    "PROVIDERS",
    "EnrolledKey",
    "LocalProvider",
    "Machine",
    "Provider",
    "QemuProvider",
    "get_provider",
    "provider_for_machine",
]
