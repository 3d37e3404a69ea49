"""Platforms a certification can run on; each behind the ``Provider`` interface."""

from __future__ import annotations

from aicert.flows.providers.base import EnrolledKey, Machine, Provider
from aicert.flows.providers.local import LocalProvider
from aicert.flows.providers.qemu import QemuProvider

PROVIDERS: dict[str, type[Provider]] = {"local": LocalProvider, "qemu": QemuProvider}


def get_provider(name: str | Provider) -> Provider:
    if isinstance(name, Provider):
        return name
    if name == "azure":
        raise ValueError(
            "provider: azure needs its settings: save an AzurePlatform block and pass "
            "platform_block='aicert-azure-platform/<name>'"
        )
    try:
        return PROVIDERS[name]()
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ValueError(f"provider: unknown platform {name!r} (available: {known})") from None


def provider_for_machine(machine: Machine) -> Provider:
    """A provider able to tear ``machine`` down in a process that did not provision it."""
    if machine.provider == "azure":
        from aicert.flows.providers.azure import AzureProvider

        return AzureProvider.for_machine(machine)
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
