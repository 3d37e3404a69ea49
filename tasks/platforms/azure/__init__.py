"""The ``azure`` platform: a Trusted Launch or Confidential VM with a vTPM, made per run.

Importing this package needs the ``azure`` extra (azure-mgmt-*, azure-identity).
"""

from aicert.tasks.platforms.azure.provider import AzureProvider, AzureSettings

__all__ = ["AzureProvider", "AzureSettings"]
