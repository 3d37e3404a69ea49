"""MkDocs hooks of the AICert site: the CLI reference from the code, and the API reference's
package found.

The CLI reference page holds two markers that the build replaces with what the installed
programs say about themselves, so the page cannot drift from the code:

- ``<!-- aicert --help -->``: every ``aicert`` command, rendered by typer's own Markdown
  generator (``typer.cli.get_docs_for_click``, what ``typer ... utils docs`` prints). The
  builder's commands (``run``, ``cleanup``, ``image``, ``azure``) are added to the typer app only
  when ``aicert.cli.main`` starts; they are added here the same way.
- ``<!-- aicert-reference-values --help -->``: the argparse program's ``--help``, and each
  subcommand's.

The API reference (mkdocstrings, griffe) reads the ``aicert`` package from its source files,
which griffe finds by folder name; the package's folder is ``verification/`` (setuptools
``package-dir``), and the ``aicert`` console script beside the interpreter would be taken for
it. So the build gives griffe a temporary folder where ``aicert`` names the real package.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer
import typer.main
from mkdocs.plugins import event_priority
from typer.cli import get_docs_for_click

import aicert
from aicert.cli import app
from aicert.flows.cli import register
from aicert.reference_values import main as reference_values_main

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs.structure.pages import Page

AICERT_MARKER = "<!-- aicert --help -->"
REFERENCE_VALUES_MARKER = "<!-- aicert-reference-values --help -->"
# argparse wraps to the terminal's width: a fixed one keeps the page the same on every host.
HELP_COLUMNS = "100"

_package_folders: list[Path] = []


# Before mkdocstrings' own on_config, which creates the python handler from this mapping.
@event_priority(100)
def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Point mkdocstrings' python handler at a folder where ``aicert`` is the package.

    Args:
        config: the site's configuration; its mkdocstrings python handler gains the folder
            as its first search path.

    Returns:
        The same configuration.
    """
    folder = Path(tempfile.mkdtemp(prefix="aicert-docs-"))
    (folder / "aicert").symlink_to(Path(aicert.__file__).parent, target_is_directory=True)
    _package_folders.append(folder)
    handlers = config.plugins["mkdocstrings"].config.handlers
    python = handlers.setdefault("python", {})
    python["paths"] = [str(folder), *python.get("paths", [])]
    return config


def on_shutdown() -> None:
    """Remove the temporary package folders."""
    while _package_folders:
        shutil.rmtree(_package_folders.pop(), ignore_errors=True)


def aicert_markdown() -> str:
    """Markdown for every ``aicert`` command, from the typer app as ``main`` assembles it.

    Returns:
        The program as a level-2 heading, each command below it, with usage and options.
    """
    # The registration of aicert.cli.main, once per process (mkdocs serve rebuilds).
    if "run" not in {command.name for command in app.registered_commands}:
        register(app)
    command = typer.main.get_command(app)
    context = typer.Context(command, info_name="aicert")
    # indent=1: the program is a level-2 heading under the page's title.
    return get_docs_for_click(obj=command, ctx=context, indent=1, name="aicert").strip()


def _argparse_help(argv: list[str]) -> str:
    """What ``aicert-reference-values <argv>`` prints (argparse exits after --help).

    Args:
        argv: the arguments, ending in ``--help``.

    Returns:
        The printed help, without trailing blank lines.
    """
    output = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        with contextlib.redirect_stdout(output), contextlib.suppress(SystemExit):
            reference_values_main(argv)
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return output.getvalue().rstrip()


def reference_values_markdown() -> str:
    """Markdown: the program's help, then one section per subcommand.

    Returns:
        The help as a text block, then a level-3 heading and help block per subcommand.

    Raises:
        RuntimeError: the program's help lists no subcommands (its format changed).
    """
    top = _argparse_help(["--help"])
    found = re.search(r"\{([a-z0-9,-]+)\}", top)
    if found is None:
        raise RuntimeError("aicert-reference-values --help lists no subcommands")
    parts = ["```text", top, "```"]
    for name in found.group(1).split(","):
        parts += ["", f"### `aicert-reference-values {name}`", "", "```text"]
        parts += [_argparse_help([name, "--help"]), "```"]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Put the programs' generated reference where the CLI page has its markers.

    Args:
        markdown: the page's Markdown source.
        page: the page (unused: the markers say where).
        config: the site's configuration (unused).
        files: the site's files (unused).

    Returns:
        The Markdown with each marker replaced.
    """
    if AICERT_MARKER in markdown:
        markdown = markdown.replace(AICERT_MARKER, aicert_markdown())
    if REFERENCE_VALUES_MARKER in markdown:
        markdown = markdown.replace(REFERENCE_VALUES_MARKER, reference_values_markdown())
    return markdown
