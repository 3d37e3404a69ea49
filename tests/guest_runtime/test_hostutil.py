"""The host helpers: ``StartStop``'s with-block protocol."""

from __future__ import annotations

import pytest

from aicert.guest_runtime.hostutil import StartStop


class Recorder(StartStop):
    def __init__(self, fail_stop: bool = False) -> None:
        self.calls: list[str] = []
        self.fail_stop = fail_stop

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")
        if self.fail_stop:
            raise RuntimeError("stop failed")


def test_a_with_block_starts_and_stops() -> None:
    with Recorder() as recorder:
        assert recorder.calls == ["start"]
    assert recorder.calls == ["start", "stop"]


def test_a_failing_stop_is_raised_after_a_clean_block() -> None:
    with pytest.raises(RuntimeError, match="stop failed"), Recorder(fail_stop=True):
        pass


def test_a_failing_stop_does_not_hide_the_blocks_error(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(fail_stop=True)
    with pytest.raises(ValueError, match="the real error"), recorder:
        raise ValueError("the real error")
    assert recorder.calls == ["start", "stop"]
    assert "stopping Recorder after an error also failed: stop failed" in caplog.text
