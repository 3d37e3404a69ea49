"""Prefect tasks of AICert: one per certification step, plus verification for downstream flows.

The tasks are imported on first access (PEP 562), so that importing the Prefect-free
``aicert.tasks.platforms`` below does not import Prefect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aicert.guest_runtime import lazy_exports

if TYPE_CHECKING:
    from aicert.tasks.certification import (
        MachineFailed,
        TrainingFailed,
        attest_machine_before_run,
        build_image,
        check_tpm,
        collect_outputs,
        collect_quote,
        establish_attestation_key,
        load_run_config,
        measure_inputs,
        measure_outputs,
        provision_machine,
        run_training,
        stage_inputs,
        start_run,
        teardown_machine,
        wait_for_agent,
    )
    from aicert.tasks.verification import verify_certificate

_EXPORTS = {
    "MachineFailed": "certification",
    "TrainingFailed": "certification",
    "attest_machine_before_run": "certification",
    "build_image": "certification",
    "check_tpm": "certification",
    "collect_outputs": "certification",
    "collect_quote": "certification",
    "establish_attestation_key": "certification",
    "load_run_config": "certification",
    "measure_inputs": "certification",
    "measure_outputs": "certification",
    "provision_machine": "certification",
    "run_training": "certification",
    "stage_inputs": "certification",
    "start_run": "certification",
    "teardown_machine": "certification",
    "wait_for_agent": "certification",
    "verify_certificate": "verification",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "MachineFailed",
    "TrainingFailed",
    "attest_machine_before_run",
    "build_image",
    "check_tpm",
    "collect_outputs",
    "collect_quote",
    "establish_attestation_key",
    "load_run_config",
    "measure_inputs",
    "measure_outputs",
    "provision_machine",
    "run_training",
    "stage_inputs",
    "start_run",
    "teardown_machine",
    "verify_certificate",
    "wait_for_agent",
]
