"""The ``local`` platform: a per-run software TPM (swtpm) and the host's Docker engine."""

from aicert.tasks.platforms.local.provider import LocalProvider, platform_ca_certificate_path

__all__ = ["LocalProvider", "platform_ca_certificate_path"]
