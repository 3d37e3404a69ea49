"""The ``azure`` platform: a Trusted Launch or Confidential VM with a vTPM, made per run.

Modules: ``settings`` (the settings, each field defined once), ``arm`` (Resource Manager
sessions, resource names and tags, deletion in dependency order), ``resources`` (the run's
resources and their request bodies), ``ak_chain`` (completing the VM's AK certificate
chain by shipped intermediates and AIA), ``provider`` (``AzureProvider``: provision, enrol,
teardown), ``errors``. Importing this package needs the ``azure`` extra (azure-mgmt-*,
azure-identity) only when a provider talks to Azure: the SDKs are imported where used.
"""

from aicert.tasks.platforms.azure.ak_chain import (
    AiaLimits,
    AiaLoopError,
    AiaResponseError,
    AiaResponseTooLargeError,
    AiaTimeoutError,
    AkChainCompleter,
    AkChainIncompleteError,
)
from aicert.tasks.platforms.azure.arm import (
    AICERT_CREATED_TAG,
    AICERT_RUN_TAG,
    ArmSession,
    AzureResourceNames,
    ProgressCallback,
    TaggedResource,
    delete_in_order,
    log_progress,
    target_label,
)
from aicert.tasks.platforms.azure.errors import (
    AzureEnrollmentError,
    AzureOperationError,
    AzureProviderError,
    AzureProvisioningError,
    AzureReferenceValuesError,
    AzureTeardownError,
)
from aicert.tasks.platforms.azure.provider import AzureProvider, check_azure_ak_chain
from aicert.tasks.platforms.azure.settings import (
    ArmSessionSettings,
    AzureSettings,
    AzureVmFields,
)

__all__ = [
    "AICERT_CREATED_TAG",
    "AICERT_RUN_TAG",
    "AiaLimits",
    "AiaLoopError",
    "AiaResponseError",
    "AiaResponseTooLargeError",
    "AiaTimeoutError",
    "AkChainCompleter",
    "AkChainIncompleteError",
    "ArmSession",
    "ArmSessionSettings",
    "AzureEnrollmentError",
    "AzureOperationError",
    "AzureProvider",
    "AzureProviderError",
    "AzureProvisioningError",
    "AzureReferenceValuesError",
    "AzureResourceNames",
    "AzureSettings",
    "AzureTeardownError",
    "AzureVmFields",
    "ProgressCallback",
    "TaggedResource",
    "check_azure_ak_chain",
    "delete_in_order",
    "log_progress",
    "target_label",
]
