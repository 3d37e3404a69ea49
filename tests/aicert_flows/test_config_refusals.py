"""``aicert run`` refuses bad input at once with exit code 2, naming what and why: an invalid
config (an alias bomb, a bad image reference, a number out of bounds) and a certificate target
that could not be written (a folder, a read-only or immutable file, a read-only folder or
mount). Nothing is provisioned for them. Two real runs on the local platform: a run short of
its required outputs fails (exit 1), and a target that became unwritable during the run fails
the run at its end with a message that points at the verified certificate kept with the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from click.testing import Result
from prefect.client.orchestration import SyncPrefectClient
from typer.testing import CliRunner

import aicert
from aicert.flows.blocks import AicertRunConfig
from aicert.flows.cli import run
from aicert.flows.flows import certify_training
from aicert.flows.output_target import OutputTargetError, check_output_target
from aicert.guest_runtime.config import ConfigError
from aicert.tasks.platforms.local.provider import platform_ca_certificate_path

from .conftest import (
    TRAIN_SCRIPT,
    flow_run_logs,
    flush_prefect_workers,
    make_git_repo,
    run_ids_in,
    running_training_container,
    training_config,
    unique_project,
    wait_for,
    write_config,
)
from .test_flow_failures import _assert_torn_down

VALID_CONFIG = """\
kind: python
name: refusals
source:
  gitRepo: https://example.invalid/project.git
  tag: v1.0
pythonEntryPoint: train.py
"""


def invoke(*arguments: str) -> Result:
    """``aicert run`` in this process (as the console script runs it)."""
    app = typer.Typer()
    app.command(name="run")(run)
    app.command(name="version")(lambda: None)  # two commands: ``run`` stays a subcommand
    return CliRunner().invoke(app, ["run", *arguments], env={"COLUMNS": "300", "NO_COLOR": "1"})


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """AICERT_HOME for a run that must not provision anything (it must stay absent)."""
    path = tmp_path / "aicert-home"
    monkeypatch.setenv("AICERT_HOME", str(path))
    return path


def refused(home: Path, config: Path, bom: Path) -> Result:
    result = invoke("--config", str(config), "--output-bom", str(bom))
    assert result.exit_code == 2, result.output
    assert not home.exists(), "something was provisioned for refused input"
    return result


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- the config -------------------------------------------------------------------------------


def test_an_alias_bomb_exits_2_at_once(home: Path, tmp_path: Path) -> None:
    levels = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 9)]
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(levels) + "\n")
    started = time.monotonic()
    result = refused(home, config, tmp_path / "proof.json")
    assert time.monotonic() - started < 0.5
    assert "line 1: YAML anchors and aliases (&name, *name) are not allowed" in result.stderr


def test_a_config_block_refuses_aliases_and_duplicate_keys_too() -> None:
    with pytest.raises(ConfigError) as caught:
        AicertRunConfig(config_yaml=VALID_CONFIG + "env: &e {A: b}\nx: *e\n").load_config()
    assert caught.value.problems == [
        "config_yaml: line 7: invalid YAML: YAML anchors and aliases (&name, *name) are not "
        "allowed: a training config has no need for them, and aliases can expand exponentially"
    ]
    with pytest.raises(ConfigError) as caught:
        AicertRunConfig(config_yaml=VALID_CONFIG + "name: other\n").load_config()
    assert caught.value.problems == [
        "config_yaml: line 7: invalid YAML: duplicate key 'name' (first given on line 2): a "
        "repeated key would silently replace the first"
    ]


def test_a_bad_image_reference_exits_2_naming_the_field(home: Path, tmp_path: Path) -> None:
    config = tmp_path / "aicert.yaml"
    config.write_text(VALID_CONFIG + "image: 'python:3; touch /tmp/pwn'\n")
    result = refused(home, config, tmp_path / "proof.json")
    # Printed with markup off: rich would have taken "[:port]" and "[:tag]" for style tags.
    assert (
        "image (line 7): 'python:3; touch /tmp/pwn' is not a Docker image reference "
        "([registry[:port]/]name[:tag][@sha256:digest]; lowercase name components)"
    ) in result.stderr


def test_bracketed_values_are_printed_as_written(home: Path, tmp_path: Path) -> None:
    config = tmp_path / "aicert.yaml"
    config.write_text(VALID_CONFIG.replace("tag: v1.0", "tag: '[bold]v1'"))
    result = refused(home, config, tmp_path / "proof.json")
    assert "source.tag (line 5): '[bold]v1' is not a valid git ref name" in result.stderr


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("limits:\n  timeoutSeconds: 99999999999999999999\n", "limits.timeoutSeconds (line 8)"),
        ("limits:\n  pids: 999999999999\n", "limits.pids (line 8): 999999999999 is out of range"),
        ("gpus: 1000\n", "gpus (line 7): 1000 is out of range: allowed 0 to 32 GPUs"),
        ("source:\n  gitRepo: x\n", "line 7: duplicate key 'source' (first given on line 3)"),
    ],
)
def test_config_refusals_exit_2_naming_the_field(
    home: Path, tmp_path: Path, extra: str, expected: str
) -> None:
    config = tmp_path / "aicert.yaml"
    config.write_text(VALID_CONFIG + extra)
    assert expected in refused(home, config, tmp_path / "proof.json").stderr


# -- the certificate's target (--output-bom) ------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "aicert.yaml"
    path.write_text(VALID_CONFIG)
    return path


def test_an_existing_folder_is_refused(home: Path, config: Path, tmp_path: Path) -> None:
    folder = tmp_path / "proofs"
    folder.mkdir()
    result = refused(home, config, folder)
    assert one_line(result.stderr) == (
        f"invalid --output-bom {folder}: is a folder; give a file path such as proof.json"
    )


def test_a_read_only_file_is_refused_not_replaced(home: Path, config: Path, tmp_path: Path) -> None:
    bom = tmp_path / "proof.json"
    bom.write_text("an earlier certificate")
    bom.chmod(0o444)
    result = refused(home, config, bom)
    assert one_line(result.stderr) == (
        f"invalid --output-bom {bom}: the existing file is read-only (mode 0444): refused "
        "rather than replaced"
    )
    assert bom.read_text() == "an earlier certificate"


def test_a_read_only_folder_is_refused(home: Path, config: Path, tmp_path: Path) -> None:
    folder = tmp_path / "kept"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = refused(home, config, folder / "sub" / "proof.json")
    finally:
        folder.chmod(0o755)
    assert one_line(result.stderr) == (
        f"invalid --output-bom {folder / 'sub' / 'proof.json'}: its folder {folder} is "
        "read-only (mode 0555)"
    )
    assert list(folder.iterdir()) == []


def test_a_special_file_is_refused(home: Path, config: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    result = refused(home, config, fifo)
    assert f"{fifo}: exists and is not a regular file" in result.stderr


def test_a_symlink_is_checked_where_it_points(home: Path, config: Path, tmp_path: Path) -> None:
    folder = tmp_path / "proofs"
    folder.mkdir()
    (tmp_path / "link.json").symlink_to(folder)
    result = refused(home, config, tmp_path / "link.json")
    assert f"{folder}: is a folder" in result.stderr


def test_a_writable_target_is_accepted_and_left_untouched(tmp_path: Path) -> None:
    existing = tmp_path / "proof.json"
    existing.write_text("an earlier certificate")
    assert check_output_target(existing) == existing
    assert check_output_target(tmp_path / "new" / "deeper" / "proof.json") == (
        tmp_path / "new" / "deeper" / "proof.json"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proof.json"]  # no probe left behind
    assert existing.read_text() == "an earlier certificate"


def _chattr(flag: str, path: Path) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


@pytest.fixture
def immutable_file(tmp_path: Path) -> Iterator[Path]:
    """A certificate file made immutable (``chattr +i``; this needs root)."""
    path = tmp_path / "immutable.json"
    path.write_text("an earlier certificate")
    _chattr("+i", path)
    try:
        yield path
    finally:
        _chattr("-i", path)


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A folder with a read-only tmpfs mounted on it (this needs root)."""
    path = tmp_path / "ro-mount"
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, capture_output=True)


def test_an_immutable_file_is_refused(home: Path, config: Path, immutable_file: Path) -> None:
    result = refused(home, config, immutable_file)
    assert one_line(result.stderr) == (
        f"invalid --output-bom {immutable_file}: the existing file is immutable (chattr +i)"
    )


def test_a_read_only_mount_is_refused(home: Path, config: Path, read_only_mount: Path) -> None:
    bom = read_only_mount / "proof.json"
    result = refused(home, config, bom)
    assert one_line(result.stderr) == (
        f"invalid --output-bom {bom}: its folder {read_only_mount} is on a read-only file system"
    )


def test_the_check_raises_one_error_type(tmp_path: Path) -> None:
    with pytest.raises(OutputTargetError) as caught:
        check_output_target(tmp_path)
    assert caught.value.path == tmp_path and caught.value.reason.startswith("is a folder")


# -- real runs on the local platform --------------------------------------------------------------

NO_OUTPUTS_SCRIPT = 'print("training-marker: wrote nothing", flush=True)\n'


def _project(tmp_path: Path, prefix: str, script: str, **overrides: object) -> tuple[str, Path]:
    project = unique_project(prefix)
    repo = make_git_repo(tmp_path / "repo", {"train.py": script})
    return project, write_config(
        tmp_path / "aicert.yaml", training_config(project, str(repo), **overrides)
    )


def test_a_run_short_of_its_required_outputs_fails_with_exit_1(
    flow_env: str, aicert_home: Path, tmp_path: Path, client: SyncPrefectClient
) -> None:
    _, config = _project(
        tmp_path,
        "no-outputs",
        NO_OUTPUTS_SCRIPT,
        outputs={"path": "/workspace/model", "minFiles": 1},
    )
    bom = tmp_path / "proof.json"

    result = invoke("--config", str(config), "--output-bom", str(bom))

    assert result.exit_code == 1, result.output
    (run_id,) = run_ids_in(aicert_home)
    workspace = aicert_home / "runs" / run_id / "work" / run_id
    assert (
        "outputs: the run left 0 file(s) in /workspace/model, outputs.minFiles requires at "
        f"least 1; no certificate is produced, outputs and logs are kept in {workspace}"
    ) in one_line(result.stderr)
    assert not bom.exists()
    assert "training-marker: wrote nothing" in (workspace / "logs" / "training.log").read_text()
    assert not (aicert_home / "runs" / run_id / "certificate.json").exists()
    _assert_torn_down(aicert_home, run_id)


def test_a_run_without_outputs_certifies_with_a_warning(
    flow_env: str, aicert_home: Path, tmp_path: Path, client: SyncPrefectClient
) -> None:
    _, config = _project(tmp_path, "empty", NO_OUTPUTS_SCRIPT)
    bom = tmp_path / "proof.json"

    state = certify_training(config_path=str(config), output_bom=str(bom), return_state=True)

    assert state.is_completed(), state.message
    report = aicert.load(bom).verify(
        trusted_roots=[platform_ca_certificate_path(aicert_home)], allow_dev_platform=True
    )
    assert report.outputs == ()
    flush_prefect_workers()
    warnings = [
        log.message
        for log in flow_run_logs(client, state.state_details.flow_run_id)
        if log.level == logging.WARNING
    ]
    assert warnings == [
        f"run {report.run_id} left no output files: its certificate lists no outputs (set "
        "outputs.minFiles in the config to make such a run fail)"
    ]


def _make_read_only_once_training(project: str, folder: Path, done: threading.Event) -> None:
    with contextlib.suppress(AssertionError):
        wait_for(lambda: running_training_container(project), timeout_s=300, what="training")
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    done.set()


def test_a_target_that_becomes_unwritable_fails_at_the_end_pointing_at_the_certificate(
    flow_env: str, aicert_home: Path, tmp_path: Path, client: SyncPrefectClient
) -> None:
    # The run certifies, but the folder of its certificate is made read-only while it trains.
    project, config = _project(
        tmp_path, "late-bom", TRAIN_SCRIPT, env={"EPOCHS": "20", "HOLD_SECONDS": "3"}
    )
    folder = tmp_path / "proofs"
    folder.mkdir()
    bom = folder / "proof.json"
    done = threading.Event()
    watcher = threading.Thread(
        target=_make_read_only_once_training, args=(project, folder, done), daemon=True
    )
    watcher.start()
    try:
        result = invoke("--config", str(config), "--output-bom", str(bom))
    finally:
        watcher.join(timeout=30)
        folder.chmod(0o755)
    assert done.is_set()

    assert result.exit_code == 1, result.output
    (run_id,) = run_ids_in(aicert_home)
    certificate = aicert_home / "runs" / run_id / "certificate.json"
    assert (
        f"certification failed: {bom}: cannot write the certificate there (its folder "
        f"{folder} is read-only (mode 0500)); the run is certified and its verified "
        f"certificate is {certificate}"
    ) in one_line(result.stderr)
    assert not bom.exists()
    report = aicert.load(certificate).verify(
        trusted_roots=[platform_ca_certificate_path(aicert_home)], allow_dev_platform=True
    )
    assert report.run_id == run_id
    _assert_torn_down(aicert_home, run_id)
