"""Prefect tasks of AICert: one per certification step, plus verification for downstream flows.

The tasks are imported on first access (PEP 562), so that importing the Prefect-free
``aicert.tasks.platforms`` below does not import Prefect.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

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


# Any: the names are tasks of several signatures and exception classes; a type checker
# resolving ``from aicert.tasks import x`` through this hook should not narrow them.
def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = sorted(_EXPORTS)
