"""Prefect tasks of AICert: one per certification step, plus verification for downstream flows."""

from aicert.tasks.certification import (
    MachineFailed,
    TrainingFailed,
    build_image,
    collect_quote,
    establish_attestation_key,
    load_run_config,
    measure_inputs,
    measure_outputs,
    provision_machine,
    run_training,
    teardown_machine,
    wait_for_agent,
)
from aicert.tasks.verification import verify_certificate

__all__ = [
    "MachineFailed",
    "TrainingFailed",
    "build_image",
    "collect_quote",
    "establish_attestation_key",
    "load_run_config",
    "measure_inputs",
    "measure_outputs",
    "provision_machine",
    "run_training",
    "teardown_machine",
    "verify_certificate",
    "wait_for_agent",
]
