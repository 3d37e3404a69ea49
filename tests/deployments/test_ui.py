"""The Prefect UI, rendered by Debian's headless ``chromium``, shows the certification run:
its name (``<project> · <stamp>``), its step-named task runs, its artifacts on the flow run
(the certificate's, the BOM, the link, the exports), and an artifact's page naming the flow
run rather than "None".

Chromium is driven over the DevTools protocol (``--remote-debugging-port``) because the flow
run page selects its Task Runs and Artifacts tabs on click only (a ``?tab=`` in the URL is
reset while the page loads): the test opens the page, clicks each tab, reads the rendered
text (``document.body.innerText``) and takes screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from websockets.sync.client import ClientConnection, connect

from aicert.flows.flows import artifact_key

from .conftest import Promotion, task_run_names

CHROMIUM = "chromium"
# Headless Chromium as root in a container-like machine: no sandbox (root), no GPU, no
# background traffic (no network here). Screenshots go over the DevTools protocol and the page
# is polled until it shows what is expected, instead of --screenshot/--virtual-time-budget.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--window-size=1600,1200",
)
START_TIMEOUT_S = 30
RENDER_TIMEOUT_S = 45

CLICK_BY_TEXT = """(label) => {
  const candidates = [...document.querySelectorAll('[role=tab], button, a, li')];
  const target = candidates.find((el) => el.innerText && el.innerText.trim() === label);
  if (!target) return false;
  target.click();
  return true;
}"""


class Page:
    """One browser tab, over the DevTools protocol."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv(timeout=RENDER_TIMEOUT_S))
            if message.get("id") == message_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return dict(message["result"])
        raise AssertionError(f"{method}: no answer in {RENDER_TIMEOUT_S} s")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def text(self) -> str:
        return str(self.evaluate("document.body ? document.body.innerText : ''") or "")

    def wait_for_text(self, *needles: str) -> str:
        """The rendered text once it contains every needle (bounded)."""
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while True:
            text = self.text()
            if all(needle in text for needle in needles):
                return text
            if time.monotonic() >= deadline:
                missing = [n for n in needles if n not in text]
                raise AssertionError(f"the page never showed {missing}; it shows:\n{text[:3000]}")
            time.sleep(0.3)

    def click(self, label: str) -> None:
        assert self.evaluate(f"({CLICK_BY_TEXT})({json.dumps(label)})") is True, label

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


@contextlib.contextmanager
def headless_chromium(profile: Path) -> Iterator[Page]:
    """Debian's chromium, headless, with a fresh profile; yields its first tab."""
    assert shutil.which(CHROMIUM), "Debian's chromium is not installed (apt-get install chromium)"
    profile.mkdir(parents=True)
    browser = subprocess.Popen(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            assert browser.poll() is None, f"chromium exited with {browser.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024) as socket:
            yield Page(socket)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, 15)
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(browser.pid, 9)
            browser.wait(timeout=10)


def _keep(path: Path) -> None:
    """Copy a screenshot to $AICERT_TEST_ARTIFACTS when set (CI keeps it)."""
    target = os.environ.get("AICERT_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(target) / path.name)


# The artifacts the certification's flow run shows on its Artifacts tab.
FLOW_RUN_ARTIFACTS = ("certificate", "bom", "certificate-file", "cyclonedx", "slsa")


def _stamp(promotion: Promotion) -> str:
    return promotion.run_id.removeprefix(f"{promotion.project}-").rsplit("-", 1)[0]


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ui"
    folder.mkdir()
    return folder


def test_ui_shows_the_certification_run(promotion: Promotion, output_dir: Path) -> None:
    run = promotion.certify_run
    project = promotion.project
    url = f"{promotion.stack.ui_url}/runs/flow-run/{run.id}"
    with promotion.stack.client() as client:
        task_names = task_run_names(client, run.id)
        artifact = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key(project, "certificate")])
            )
        )[0]
    assert artifact.flow_run_id == run.id and artifact.task_run_id is None
    with headless_chromium(output_dir / "profile") as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=url)
        overview = page.wait_for_text(run.name, "certify-training", "Completed", "Task Runs")
        assert "Can't connect to Server API" not in overview

        page.click("Task Runs")
        task_runs = page.wait_for_text("measure-inputs", "run-training", "measure-outputs")
        assert f"{len(task_names)} Task runs" in task_runs, task_runs[:2000]
        shot = page.screenshot(output_dir / f"flow-run-{project}-task-runs.png")

        page.click("Artifacts")
        artifacts = page.wait_for_text(
            *(artifact_key(project, kind) for kind in FLOW_RUN_ARTIFACTS)
        )
        artifacts_shot = page.screenshot(output_dir / f"flow-run-{project}-artifacts.png")

        # The certificate artifact's own page names the flow run it belongs to.
        page.call("Page.navigate", url=f"{promotion.stack.ui_url}/artifacts/artifact/{artifact.id}")
        artifact_page = page.wait_for_text(run.name, "Development platform (local)")
        artifact_shot = page.screenshot(output_dir / f"artifact-{project}-certificate.png")

    (output_dir / "task-runs.txt").write_text(task_runs)
    (output_dir / "artifacts.txt").write_text(artifacts)
    (output_dir / "artifact.txt").write_text(artifact_page)
    assert run.name == f"{project} · {_stamp(promotion)}"
    assert run.name in overview and run.name in task_runs and run.name in artifacts
    for path in (shot, artifacts_shot, artifact_shot):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 20_000  # a rendered page, not a blank one
        _keep(path)
