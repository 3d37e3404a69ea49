"""The qemu guest's scripts: package data, shipped in the wheel, clean under shellcheck.

``/init`` is ``guest/init.sh`` filled in with the recipe's values; the engine wait is
``guest/wait_for_engine.py``; the kernel download is a shell command given to mmdebstrap.
Every shell text is checked as it runs (filled in), and shellcheck's findings, of any
severity, fail the test. shellcheck comes from Debian (``deployments/setup-host.sh``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from aicert.tasks.platforms.qemu.debian import kernel_download_hook
from aicert.tasks.platforms.qemu.initramfs import (
    GUEST_FILES,
    INIT_TEMPLATE,
    WAIT_FOR_ENGINE_SOURCE,
    guest_file,
    init_script,
)
from aicert.tasks.platforms.qemu.recipe import AGENT_PORT, GUEST_ADDRESS
from tests import REPO_ROOT

SHELLCHECK = shutil.which("shellcheck")
needs_shellcheck = pytest.mark.skipif(
    SHELLCHECK is None, reason="shellcheck is not installed (deployments/setup-host.sh)"
)
PACKAGE_FOLDER = "aicert/tasks/platforms/qemu"


def _shellcheck(script: str) -> str:
    """shellcheck's findings on ``script`` (a POSIX sh script), empty when there are none."""
    assert SHELLCHECK is not None
    completed = subprocess.run(
        [SHELLCHECK, "--shell=sh", "--severity=style", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return completed.stdout + completed.stderr


@needs_shellcheck
def test_init_is_clean_under_shellcheck() -> None:
    assert _shellcheck(init_script()) == ""


@needs_shellcheck
def test_kernel_download_hook_is_clean_under_shellcheck(tmp_path: Path) -> None:
    assert _shellcheck(kernel_download_hook(tmp_path / "kernel dir") + "\n") == ""


@needs_shellcheck
def test_shellcheck_reports_a_finding() -> None:
    """The check is live: an unquoted expansion is a finding."""
    assert "SC2086" in _shellcheck("#!/bin/sh\nrm $1\n")


def test_init_is_filled_in() -> None:
    script = init_script()
    assert script.startswith("#!/bin/sh\n")
    assert f"busybox ip addr add {GUEST_ADDRESS} dev eth0" in script
    assert f"--port {AGENT_PORT}" in script
    assert "@" not in script.replace("$@", "")


def test_engine_wait_is_valid_python() -> None:
    compile(guest_file(WAIT_FOR_ENGINE_SOURCE), WAIT_FOR_ENGINE_SOURCE, "exec")


def test_the_wheel_ships_the_guest_scripts(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(REPO_ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("aicert-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in (INIT_TEMPLATE, WAIT_FOR_ENGINE_SOURCE):
            path = f"{PACKAGE_FOLDER}/{GUEST_FILES}/{name}"
            assert path in names
            assert archive.read(path).decode() == guest_file(name)
