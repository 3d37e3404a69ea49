"""Machine capacity as Prefect global concurrency limits.

A certification holds one slot of ``aicert-machines`` (every machine AICert runs, whatever the
platform) and one of ``aicert-machines-<platform>`` (``local``: swtpm + Docker on the worker
host, ``qemu``: VMs on it, ``azure``: the subscription's quota) from before its machine is
provisioned until it is torn down. With ``prefect gcl create aicert-machines --limit 2`` a
third certification waits for a slot (its ``certify-training`` run stays Running, the flow's
log says it waits) and starts once another run's machine is gone. A limit that does not exist
takes no slot: without limits nothing waits, as before.

Slots are leases: a run whose process dies stops renewing its lease and the server frees the
slot after ``LEASE_S``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from aicert.model import PLATFORM_KINDS, PlatformKind

MACHINES_LIMIT = "aicert-machines"
LEASE_S = 300.0


def machine_limit_names(kind: PlatformKind) -> list[str]:
    """The global concurrency limits a machine of ``kind`` takes one slot of.

    Args:
        kind: The platform (``local``, ``qemu`` or ``azure``).

    Returns:
        ``["aicert-machines", "aicert-machines-<kind>"]``.
    """
    return [MACHINES_LIMIT, f"{MACHINES_LIMIT}-{kind}"]


def all_machine_limit_names() -> list[str]:
    """Every limit name of :func:`machine_limit_names`, for every platform."""
    return [MACHINES_LIMIT, *(f"{MACHINES_LIMIT}-{kind}" for kind in PLATFORM_KINDS)]


def existing_limits(names: list[str]) -> list[str]:
    """Those of ``names`` that exist as global concurrency limits on the server."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                continue
            found.append(name)
    return found


@contextmanager
def machine_slot(kind: PlatformKind, timeout_s: float | None = None) -> Iterator[None]:
    """Hold one slot of each machine limit while the block runs (waiting for it first).

    Only the limits that exist are asked for: Prefect would log a warning on every run of
    a server where nobody configured machine limits (the default: nothing waits).

    Args:
        kind: The platform of the machine about to be provisioned.
        timeout_s: How long to wait for the slots (``None``: as long as it takes).

    Raises:
        TimeoutError: No slot was free within ``timeout_s``.
    """
    names = existing_limits(machine_limit_names(kind))
    if not names:
        yield
        return
    try:
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = get_run_logger()
    except MissingContextError:  # outside a flow run (a script holding a slot)
        logger = logging.getLogger(__name__)
    logger.info("waiting for a machine slot of %s", ", ".join(names))
    with concurrency(names, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_S):
        logger.info("machine slot taken")
        yield
