"""Platforms a certification can run on; each behind the ``Provider`` interface."""

from __future__ import annotations

from aicert.flows.providers.base import EnrolledKey, Machine, Provider
from aicert.flows.providers.local import LocalProvider

PROVIDERS: dict[str, type[Provider]] = {"local": LocalProvider}


def get_provider(name: str | Provider) -> Provider:
    if isinstance(name, Provider):
        return name
    try:
        return PROVIDERS[name]()
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ValueError(f"provider: unknown platform {name!r} (available: {known})") from None


__all__ = ["PROVIDERS", "EnrolledKey", "LocalProvider", "Machine", "Provider", "get_provider"]
