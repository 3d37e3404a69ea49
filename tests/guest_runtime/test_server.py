"""The agent's event-loop watchdog: a loop that stops turning gets every thread's stack on
stderr (what diagnoses a VM whose agent stopped answering), and a turning loop gets none."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, time
    from aicert.guest_runtime.server import _event_loop_watchdog

    def blocking_step_in_the_loop():
        time.sleep(float(sys.argv[1]))

    async def main():
        async with _event_loop_watchdog(0.5):
            await asyncio.sleep(1.0)  # turning: nothing dumped
            print("turning-done", file=sys.stderr, flush=True)
            blocking_step_in_the_loop()  # not turning
            await asyncio.sleep(1.0)  # turning again, then the timer is cancelled on exit
        time.sleep(1.0)  # after the watchdog: nothing more

    asyncio.run(main())
    """
)


def _stderr(block_s: float) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(block_s)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr


def test_a_blocked_event_loop_dumps_every_threads_stack() -> None:
    stderr = _stderr(1.6)
    before, _, after = stderr.partition("turning-done")
    assert "Thread 0x" not in before  # a turning loop dumps nothing
    assert "Timeout (0:00:00.500000)!" in after
    # The dump names where the loop is stuck.
    assert "blocking_step_in_the_loop" in after
    # repeat=True: a longer stall keeps reporting; exit cancels it.
    assert after.count("Timeout (0:00:00.500000)!") >= 2


def test_a_turning_event_loop_dumps_nothing() -> None:
    assert "Timeout" not in _stderr(0.0)
