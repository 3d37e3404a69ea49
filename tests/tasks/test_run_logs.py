"""The platform modules' stdlib log records reach the Prefect run that caused them, once.

``aicert.tasks.platforms`` logs through ``logging`` (it imports no Prefect); ``run_logs``
forwards those records to the current run's logger. Inside a real flow run (the session's
Prefect test server) the line is read back from that run's logs through the API, under the
task run that logged it; outside a run it reaches the root logger's handlers as any record.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import Log

from aicert.tasks.run_logs import PLATFORM_LOGGER, RunLogForwarder, forward_platform_logs
from tests.aicert_flows.conftest import flow_run_logs, flush_prefect_workers, task_runs_of, wait_for

PLATFORM_MODULE_LOGGER = f"{PLATFORM_LOGGER}.x"


@pytest.fixture(autouse=True)
def forwarding() -> Iterator[logging.Logger]:
    """The forwarder installed (as importing ``aicert.tasks.certification`` does)."""
    forward_platform_logs()
    yield logging.getLogger(PLATFORM_LOGGER)


@task(name="log-like-a-platform-module")
def log_like_a_platform_module(marker: str) -> None:
    logging.getLogger(PLATFORM_MODULE_LOGGER).info("platform says %s", marker)


@flow(name="platform-logs")
def platform_logs_flow(marker: str) -> None:
    log_like_a_platform_module(marker)


def _lines_with(logs: list[Log], marker: str) -> list[Log]:
    return [log for log in logs if marker in log.message]


def test_a_platform_record_lands_once_in_the_task_runs_logs(prefect_api_url: str) -> None:
    marker = f"marker-{uuid.uuid4().hex}"

    state = platform_logs_flow(marker, return_state=True)
    flush_prefect_workers()

    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        wait_for(
            lambda: _lines_with(flow_run_logs(client, flow_run_id), marker),
            timeout_s=30,
            what=f"the line {marker} in the flow run's logs",
        )
        # Give a duplicate sent in another batch the time to arrive too.
        flush_prefect_workers()
        found = _lines_with(flow_run_logs(client, flow_run_id), marker)
        task_runs = task_runs_of(client, flow_run_id)
    assert [log.message for log in found] == [f"platform says {marker}"]
    assert found[0].level == logging.INFO
    logged_by = next(run for run in task_runs if run.id == found[0].task_run_id)
    assert logged_by.name.startswith("log-like-a-platform-module")


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_outside_a_run_the_record_reaches_the_root_handlers_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    root = logging.getLogger()
    at_root = _Collector()
    root.addHandler(at_root)
    try:
        with caplog.at_level(logging.INFO):
            logging.getLogger(PLATFORM_MODULE_LOGGER).info("platform says %s", marker)
    finally:
        root.removeHandler(at_root)

    delivered = [(r.name, r.getMessage()) for r in at_root.records if marker in r.getMessage()]
    assert delivered == [(PLATFORM_MODULE_LOGGER, f"platform says {marker}")]
    # caplog sees it too. (pytest >= 9 also hangs its capture handler on every logger that
    # does not propagate, this one included, so caplog alone cannot count root deliveries.)
    assert any(marker in record.getMessage() for record in caplog.records)


def test_forwarding_is_installed_once(forwarding: logging.Logger) -> None:
    forward_platform_logs()
    forward_platform_logs()

    forwarders = [h for h in forwarding.handlers if isinstance(h, RunLogForwarder)]
    assert len(forwarders) == 1
    # The forwarder delivers every record itself: propagating would deliver it twice.
    assert forwarding.propagate is False
    assert forwarding.getEffectiveLevel() <= logging.INFO
