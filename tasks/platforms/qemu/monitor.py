"""The qemu human monitor of a ``qemu`` platform VM: one command, one answer.

For an operator diagnosing a VM that stopped answering ("info registers -a", "info irq"),
and for the provider, which asks the run state of a VM that may have died of KVM.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

MONITOR_ANSWER_BYTES = 1 << 20


def ask_monitor(path: Path, command: str, timeout_s: float = 10.0) -> str:
    """Send one command to the qemu human monitor listening on ``path``; return its answer.

    Waits up to ``timeout_s`` for the socket (qemu makes it as it starts) and as long for
    each answer. Raises OSError (TimeoutError included) when the monitor does not answer."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with socket.socket(socket.AF_UNIX) as monitor:
        monitor.settimeout(timeout_s)
        monitor.connect(str(path))
        _read_until_prompt(monitor)  # the greeting
        monitor.sendall(command.encode() + b"\n")
        return _read_until_prompt(monitor).decode(errors="replace")


def _read_until_prompt(monitor: socket.socket) -> bytes:
    """Read up to the monitor's prompt; raise OSError when it closes or says too much."""
    answer = b""
    while not answer.endswith(b"(qemu) "):
        chunk = monitor.recv(4096)
        if not chunk or len(answer) > MONITOR_ANSWER_BYTES:
            raise OSError("the qemu monitor closed or answered too much")
        answer += chunk
    return answer
