"""The ``gcp`` platform: a Compute Engine Shielded VM with a vTPM, made per run.

Modules: ``settings`` (the settings, each field defined once), ``compute`` (the run's
resource names and labels, and the Compute Engine requests through google-cloud-compute),
``provider`` (``GcpProvider``: provision, enrol GCE's AK, teardown), ``errors``. The verifier
side (Google's pinned roots and shipped intermediates, gcp reference values) is in
``aicert.chain`` and ``aicert.gcp_reference``; the guest side (the AK GCE provisions as an NV
template) in ``aicert.guest_runtime.gce_ak``. Importing this package needs no extra: the
client library is imported where a session is made (the ``gcp`` extra).
"""

from aicert.tasks.platforms.gcp.compute import (
    AICERT_CREATED_LABEL,
    AICERT_RUN_LABEL,
    ComputeSession,
    GcpOperationError,
    RunResources,
    run_label,
)
from aicert.tasks.platforms.gcp.errors import (
    GcpEnrollmentError,
    GcpProviderError,
    GcpProvisioningError,
    GcpReferenceValuesError,
    GcpTeardownError,
)
from aicert.tasks.platforms.gcp.provider import GcpProvider, check_gcp_ak_chain
from aicert.tasks.platforms.gcp.settings import GcpSettings, GcpVmFields

__all__ = [
    "AICERT_CREATED_LABEL",
    "AICERT_RUN_LABEL",
    "ComputeSession",
    "GcpEnrollmentError",
    "GcpOperationError",
    "GcpProvider",
    "GcpProviderError",
    "GcpProvisioningError",
    "GcpReferenceValuesError",
    "GcpSettings",
    "GcpTeardownError",
    "GcpVmFields",
    "RunResources",
    "check_gcp_ak_chain",
    "run_label",
]
