"""Wait for the guest's Docker engine: run by /init until it answers GET /_ping on its socket.

One interpreter start (busybox has no HTTP client for unix sockets). Exits non-zero, saying
why, when dockerd exits or the bound passes. Arguments: dockerd's pid, the bound in
seconds, the socket. Copied into the guest as /etc/aicert/wait-for-engine.py; standard
library only (the guest's python3).
"""

import socket
import sys
import time


def engine_answers(path: str) -> bool:
    """Whether the engine on the unix socket ``path`` answers its ping with 200."""
    try:
        with socket.socket(socket.AF_UNIX) as engine:
            engine.settimeout(5)
            engine.connect(path)
            engine.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return engine.recv(64).split(b"\r\n")[0].split()[1:2] == [b"200"]
    except OSError:
        return False


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main() -> None:
    """Wait as the module docstring says; exit 0 once the engine answers."""
    pid, bound, path = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if not running(pid):
            sys.exit("dockerd exited")
        if engine_answers(path):
            sys.exit(0)
        time.sleep(0.2)
    sys.exit(f"no answer on {path} after {bound:.0f} s")


if __name__ == "__main__":
    main()
