"""A measuring call is bounded by the progress the agent shows, not by its length
(tasks/certification.py ``_call_with_progress``).

The agent here is a stand-in HTTP server answering ``GET /v1/progress`` only: what is tested
is the orchestrator's side, a call that stays open while the agent's progress report changes
or stops changing, which a real agent cannot be made to do on cue. The real agent's progress
reports are covered by tests/aicert_flows/test_progress.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from prefect import flow

from aicert.guest_runtime.api_models import API_PREFIX
from aicert.tasks.certification import AgentStalled, _call_with_progress
from aicert.tasks.platforms.base import Machine
from tests.loopback import serve

MiB = 1024 * 1024


class _Agent:
    """Reports ``done_bytes`` growing by 1 MiB per request until ``frozen`` is set."""

    def __init__(self) -> None:
        self.done_bytes = 0
        self.frozen = threading.Event()
        self.requests = 0

    def report(self) -> dict[str, object]:
        self.requests += 1
        if not self.frozen.is_set():
            self.done_bytes += MiB
        return {
            "phase": "downloading base-model",
            "done_bytes": self.done_bytes,
            "total_bytes": 10_000 * MiB,
            "message": "downloading base-model",
        }


@pytest.fixture
def agent() -> Iterator[tuple[_Agent, str]]:
    state = _Agent()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != f"{API_PREFIX}/progress":
                self.send_error(404)
                return
            body = json.dumps(state.report()).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    with serve(Handler) as url:
        yield state, url


def _machine(url: str, tmp_path: Path) -> Machine:
    return Machine(provider="local", run_id="stall-test", agent_url=url, state_dir=str(tmp_path))


@pytest.fixture(autouse=True)
def _fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AICERT_PROGRESS_POLL_S", "0.02")
    monkeypatch.setenv("AICERT_AGENT_STALL_TIMEOUT_S", "1")


def test_a_call_longer_than_the_stall_timeout_completes_while_progress_changes(
    agent: tuple[_Agent, str], tmp_path: Path, prefect_api_url: str
) -> None:
    state, url = agent

    def long_call() -> str:
        time.sleep(3)  # three stall timeouts, with progress all along
        return "measured"

    @flow
    def measuring() -> str:
        return _call_with_progress(_machine(url, tmp_path), "stall-ok", long_call)

    assert measuring() == "measured"
    assert state.requests > 10


def test_a_call_whose_progress_stops_fails_naming_what_was_seen_last(
    agent: tuple[_Agent, str], tmp_path: Path, prefect_api_url: str
) -> None:
    state, url = agent
    release = threading.Event()

    def hung_call() -> str:
        time.sleep(1.5)  # progress for longer than one stall timeout ...
        state.frozen.set()  # ... then none
        release.wait(60)
        return "never used"

    @flow
    def measuring() -> str:
        return _call_with_progress(_machine(url, tmp_path), "stall-hung", hung_call)

    try:
        with pytest.raises(AgentStalled) as raised:
            measuring()
    finally:
        release.set()
    message = str(raised.value)
    assert "stall-hung: the agent showed no progress for 1 s" in message
    assert f"downloading base-model, {state.done_bytes} bytes done" in message
    assert state.done_bytes > 10 * MiB  # it waited while the bytes grew
    assert "AICERT_AGENT_STALL_TIMEOUT_S" in message


def test_an_agent_that_never_answers_is_a_stall(tmp_path: Path, prefect_api_url: str) -> None:
    release = threading.Event()

    def hung_call() -> str:
        release.wait(60)
        return "never used"

    @flow
    def measuring() -> str:
        # Nothing listens on port 9 (discard) here: every progress request fails.
        return _call_with_progress(_machine("http://127.0.0.1:9", tmp_path), "gone", hung_call)

    try:
        with pytest.raises(AgentStalled, match="no answer to a progress request"):
            measuring()
    finally:
        release.set()


@pytest.mark.parametrize("step", ["measure_inputs", "measure_outputs"])
def test_the_measuring_calls_read_with_the_backstop_timeout_not_the_default(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api_url: str
) -> None:
    from aicert.tasks import certification

    timeouts: list[float] = []
    real_client = Machine.client

    def recording_client(self: Machine, timeout_s: float = 900.0) -> object:
        timeouts.append(timeout_s)
        return real_client(self, timeout_s=timeout_s)

    monkeypatch.setattr(Machine, "client", recording_client)
    monkeypatch.setattr(certification, "_call_with_progress", lambda *_: [])

    @flow
    def measuring() -> object:
        return getattr(certification, step).fn(_machine("http://127.0.0.1:9", tmp_path), "r", "p")

    assert measuring() == []
    assert timeouts == [certification.MEASURING_CALL_TIMEOUT_S]
    assert certification.MEASURING_CALL_TIMEOUT_S >= 24 * 3600
