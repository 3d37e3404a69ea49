"""Prefect tasks of AICert: one per certification step, plus verification for downstream flows."""

from aicert.tasks.certification import (
    MachineFailed,
    TrainingFailed,
    attest_machine_before_run,
    build_image,
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

__all__ = [
    "MachineFailed",
    "TrainingFailed",
    "attest_machine_before_run",
    "build_image",
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
