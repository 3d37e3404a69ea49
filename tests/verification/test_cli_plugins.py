"""The ``aicert`` command's plugins (entry-point group ``aicert.cli``): the installed ones add
their commands, and one that cannot be imported leaves the verifier's commands working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from aicert.cli import CLI_PLUGIN_GROUP


def _aicert(args: list[str], extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", "from aicert.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _broken_plugin(root: Path) -> Path:
    """A distribution whose ``aicert.cli`` entry point names a module that does not exist, as
    a plugin installed without its dependencies looks."""
    dist_info = root / "broken_plugin-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[{CLI_PLUGIN_GROUP}]\nbroken = no_such_module_for_aicert:register\n"
    )
    return root


def test_installed_plugins_add_their_commands() -> None:
    completed = _aicert(["--help"])
    assert completed.returncode == 0, completed.stderr
    for command in ("verify", "inspect", "run", "export", "reference-values"):
        assert command in completed.stdout


def test_a_broken_plugin_leaves_verify_working_and_quiet(tmp_path: Path) -> None:
    path = _broken_plugin(tmp_path)
    completed = _aicert(["verify", "--help"], extra_path=path)
    assert completed.returncode == 0, completed.stderr
    assert "no_such_module_for_aicert" not in completed.stderr


def test_an_unknown_command_says_which_plugin_failed(tmp_path: Path) -> None:
    path = _broken_plugin(tmp_path)
    completed = _aicert(["frobnicate"], extra_path=path)
    assert completed.returncode == 2
    assert "'broken' commands (no_such_module_for_aicert:register) are unavailable" in (
        completed.stderr.replace("\n", " ")
    )
