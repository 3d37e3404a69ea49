"""A stand-in ``nvidia-smi`` for machines without an NVIDIA GPU (this one, CI).

It is a double for hardware that cannot run here: a script put first on ``PATH`` that prints
what the real ``nvidia-smi`` prints for the two queries the agent makes, in the real format
(``--query-gpu=... --format=csv,noheader,nounits``: ``0, NVIDIA H100 80GB HBM3, GPU-<uuid>,
550.54.15, 81559``; ``-q -d COMPUTE``: the NVSMI LOG header with ``CUDA Version : 12.4``), as
recorded from real drivers. A test can make it print something else, fail, or hang.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

H100_UUIDS = (
    "GPU-14ac2834-0d81-0508-69eb-e25264c08d21",
    "GPU-3c3e6e2e-5b1f-4d2a-9e0f-8a7b6c5d4e3f",
)
DRIVER = "550.54.15"
CUDA = "12.4"
GPU_LIST = "".join(
    f"{i}, NVIDIA H100 80GB HBM3, {uuid}, {DRIVER}, 81559\n" for i, uuid in enumerate(H100_UUIDS)
)
COMPUTE_HEADER = f"""
==============NVSMI LOG==============

Timestamp                                 : Thu Nov 14 15:35:07 2024
Driver Version                            : {DRIVER}
CUDA Version                              : {CUDA}

Attached GPUs                             : {len(H100_UUIDS)}
GPU 00000000:AD:00.0
    Compute Mode                          : Default

GPU 00000000:AE:00.0
    Compute Mode                          : Default

"""


def install_fake_nvidia_smi(
    folder: Path,
    *,
    gpu_list: str = GPU_LIST,
    header: str = COMPUTE_HEADER,
    exit_code: int = 0,
    sleep_s: float = 0.0,
) -> Path:
    """Write ``nvidia-smi`` into ``folder`` (put it first on PATH); returns its path. It
    prints ``gpu_list`` for ``--query-gpu``, ``header`` for ``-q``, after ``sleep_s``, and
    exits ``exit_code``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_list.txt").write_text(gpu_list)
    (folder / "header.txt").write_text(header)
    script = folder / "nvidia-smi"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, time\n"
        "from pathlib import Path\n"
        f"time.sleep({sleep_s!r})\n"
        "here = Path(__file__).parent\n"
        "if any(a.startswith('--query-gpu=') for a in sys.argv[1:]):\n"
        "    sys.stdout.write((here / 'gpu_list.txt').read_text())\n"
        "elif '-q' in sys.argv[1:]:\n"
        "    sys.stdout.write((here / 'header.txt').read_text())\n"
        "else:\n"
        "    sys.exit('unexpected arguments: ' + ' '.join(sys.argv[1:]))\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def path_with(folder: Path) -> str:
    """``PATH`` with ``folder`` first."""
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
