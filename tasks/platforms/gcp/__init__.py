"""The ``gcp`` platform: a Compute Engine Shielded VM with a vTPM, made per run.

Modules: ``compute`` (the settings, the run's resource names and labels, and the Compute
Engine requests through google-cloud-compute). The verifier side (Google's pinned roots and
shipped intermediates, gcp reference values) is in ``aicert.chain`` and
``aicert.gcp_reference``; the guest side (the AK GCE provisions as an NV template) in
``aicert.guest_runtime.gce_ak``. Importing this package needs no extra: the client library
is imported where a session is made (the ``gcp`` extra).
"""

from aicert.tasks.platforms.gcp.compute import (
    AICERT_CREATED_LABEL,
    AICERT_RUN_LABEL,
    ComputeSession,
    GcpOperationError,
    GcpSettings,
    RunResources,
    run_label,
)

__all__ = [
    "AICERT_CREATED_LABEL",
    "AICERT_RUN_LABEL",
    "ComputeSession",
    "GcpOperationError",
    "GcpSettings",
    "RunResources",
    "run_label",
]
