"""The platform modules' log records, forwarded into the Prefect run that caused them.

``aicert.tasks.platforms`` imports no Prefect: its modules log through the standard library
(a VM's boot progress, an Azure operation's polling). Inside a flow or task run this handler
hands each record to that run's logger, so it shows in the Prefect UI beside the step that
caused it; outside a run (a crash hook, ``aicert azure cleanup``) the record goes on to the
root logger's handlers as usual. Installed once, when ``aicert.tasks`` is imported.
"""

from __future__ import annotations

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

PLATFORM_LOGGER = "aicert.tasks.platforms"


class RunLogForwarder(logging.Handler):
    """Sends a record to the current Prefect run's log, or to the root logger's handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        """Log ``record`` to the current run (as its message), else hand it to the root."""
        try:
            run_logger = get_run_logger()
        except MissingContextError:
            logging.getLogger().handle(record)
            return
        run_logger.log(record.levelno, "%s", record.getMessage(), exc_info=record.exc_info)


def forward_platform_logs() -> None:
    """Attach the forwarder to the platform modules' logger (idempotent)."""
    logger = logging.getLogger(PLATFORM_LOGGER)
    if any(isinstance(handler, RunLogForwarder) for handler in logger.handlers):
        return
    logger.addHandler(RunLogForwarder())
    # Progress is INFO; without a level of its own the logger would inherit the root's.
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    # The forwarder already delivered the record (to the run or to the root's handlers).
    logger.propagate = False
