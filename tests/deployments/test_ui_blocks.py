"""The Prefect UI's page of an AICert block: the "paste this snippet" box holds the block's
code example with its name, the block type's logo loads, and the run-config YAML keeps its
lines in the edit form.

The UI runs in Debian's headless Chromium against the stack's server (``stack.sh up``), driven
over the DevTools protocol with test_ui.py's helpers. The logos live on the documentation site
(``aicert.flows.blocks.DOCUMENTATION_URL``), which this machine cannot reach: the browser's
requests for that site are answered, through the DevTools ``Fetch`` domain, with the files the
docs build publishes there (``docs/`` as MkDocs copies it). Everything else the page loads is
the real server's.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from websockets.sync.client import ClientConnection

from aicert.flows import AicertRunConfig, LocalPlatform
from aicert.flows.blocks import DOCUMENTATION_URL

from .conftest import Stack
from .test_ui import RENDER_TIMEOUT_S, Page, _keep, headless_chromium

DOCS = Path(__file__).resolve().parents[2] / "docs"
CONTENT_TYPES = {".svg": "image/svg+xml", ".html": "text/html"}

LOGOS = """[...document.images]
  .filter((image) => image.src.includes('/assets/logos/'))
  .map((image) => ({src: image.src, complete: image.complete, width: image.naturalWidth}))"""

YAML_TEXTAREA = """(() => {
  const area = [...document.querySelectorAll('textarea')]
    .find((element) => element.value.includes('kind: python'));
  return area ? {value: area.value, height: area.clientHeight} : null;
})()"""


class DocsSitePage(Page):
    """A tab whose requests for the documentation site are answered from ``docs/``."""

    def __init__(self, socket: ClientConnection) -> None:
        super().__init__(socket)
        self._socket_ = socket
        self._next_id = itertools.count(1_000_000)  # apart from Page's own message ids
        self.served: list[str] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._next_id)
        self._socket_.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while time.monotonic() < deadline:
            message = json.loads(self._socket_.recv(timeout=RENDER_TIMEOUT_S))
            if message.get("method") == "Fetch.requestPaused":
                self._answer(message["params"])
            elif message.get("id") == message_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return dict(message["result"])
        raise AssertionError(f"{method}: no answer in {RENDER_TIMEOUT_S} s")

    def _answer(self, paused: dict[str, Any]) -> None:
        url = str(paused["request"]["url"]).split("#")[0].split("?")[0]
        path = DOCS / url.removeprefix(DOCUMENTATION_URL)
        if path.is_file():
            self.served.append(url)
            headers = [{"name": "Content-Type", "value": CONTENT_TYPES.get(path.suffix, "")}]
            body = base64.b64encode(path.read_bytes()).decode()
            self._send(
                "Fetch.fulfillRequest",
                requestId=paused["requestId"],
                responseCode=200,
                responseHeaders=headers,
                body=body,
            )
        else:
            self._send("Fetch.failRequest", requestId=paused["requestId"], errorReason="Failed")

    def _send(self, method: str, **params: Any) -> None:
        # The answer to this command comes back later and is skipped by call().
        message = {"id": next(self._next_id), "method": method, "params": params}
        self._socket_.send(json.dumps(message))


def _save_blocks(stack: Stack) -> tuple[str, str]:
    """A run config (multi-line YAML) and a local platform saved on the stack's server."""
    config_name, platform_name = (f"ui-{kind}-{uuid.uuid4().hex[:8]}" for kind in "cp")
    config_yaml = yaml.safe_dump(
        {
            "kind": "python",
            "name": "ui-blocks",
            "source": {"type": "git", "gitRepo": "https://example.invalid/r.git"},
            "pythonEntryPoint": "train.py",
            "limits": {"cpus": 1, "memory": "1g", "timeoutSeconds": 600},
        }
    )
    with stack.client():  # PREFECT_API_URL is the stack's inside
        AicertRunConfig(config_yaml=config_yaml).save(config_name)
        LocalPlatform().save(platform_name)
    return config_name, platform_name


def _block_id(stack: Stack, slug: str, name: str) -> str:
    with stack.client() as client:
        return str(client.read_block_document_by_name(name, block_type_slug=slug).id)


def test_a_block_page_shows_the_snippet_and_the_logo(sqlite_stack: Stack, tmp_path: Path) -> None:
    output_dir = tmp_path  # screenshots (copied to $AICERT_TEST_ARTIFACTS when set)
    config_name, platform_name = _save_blocks(sqlite_stack)
    pages = {
        (AicertRunConfig, config_name): _block_id(sqlite_stack, "aicert-run-config", config_name),
        (LocalPlatform, platform_name): _block_id(
            sqlite_stack, "aicert-local-platform", platform_name
        ),
    }
    with headless_chromium(output_dir / "profile") as plain:
        page = DocsSitePage(plain._socket)  # test_ui's tab, answering Fetch events too
        page.call("Page.enable")
        page.call("Fetch.enable", patterns=[{"urlPattern": f"{DOCUMENTATION_URL}*"}])
        for (block, name), block_id in pages.items():
            page.call("Page.navigate", url=f"{sqlite_stack.ui_url}/v2/blocks/block/{block_id}")
            # The box shows the fenced example with BLOCK_NAME replaced by the block's name.
            text = page.wait_for_text("Paste this snippet", f'{block.__name__}.load("{name}")')
            assert "from aicert.flows import" in text
            logos = _wait_for_logo(page)
            shot = page.screenshot(output_dir / f"block-{block.get_block_type_slug()}.png")
            _keep(shot)
            slug = block.get_block_type_slug()
            assert any(
                logo["src"].endswith(f"/{slug}.svg") and logo["width"] > 0 for logo in logos
            ), logos

        config_id = pages[(AicertRunConfig, config_name)]
        page.call("Page.navigate", url=f"{sqlite_stack.ui_url}/v2/blocks/block/{config_id}/edit")
        page.wait_for_text("aicert.yaml", "Base folder")
        area = _wait_for(page, YAML_TEXTAREA)
        _keep(page.screenshot(output_dir / "block-aicert-run-config-edit.png"))
    lines = area["value"].count("\n")
    assert lines >= 8, area
    # Every line shown, not one: the text area grows with its content (at least 14 px a line).
    assert area["height"] >= 14 * lines, area
    assert page.served, "no request reached the documentation site"


def _wait_for_logo(page: Page) -> list[dict[str, Any]]:
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while True:
        logos: list[dict[str, Any]] = page.evaluate(LOGOS) or []
        if logos and all(logo["complete"] for logo in logos):
            return logos
        assert time.monotonic() < deadline, f"the logo never loaded: {logos}"
        time.sleep(0.3)


def _wait_for(page: Page, expression: str) -> dict[str, Any]:
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while True:
        value = page.evaluate(expression)
        if value:
            return dict(value)
        assert time.monotonic() < deadline, f"never true: {expression}"
        time.sleep(0.3)
