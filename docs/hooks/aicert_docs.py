"""MkDocs hooks of the AICert site: the CLI reference from the code, and the API reference's
package found.

The CLI reference page holds two markers that the build replaces with what the installed
programs say about themselves, so the page cannot drift from the code:

- ``<!-- aicert --help -->``: every ``aicert`` command, ``aicert reference-values ...``
  included, rendered by typer's own Markdown generator (``typer.cli.get_docs_for_click``, what
  ``typer ... utils docs`` prints). The builder's commands (``run``, ``cleanup``, ``image``,
  ``azure``) are added to the typer app only when ``aicert.cli.main`` starts, from the
  ``aicert.cli`` entry-point group; they are added here the same way.
- ``<!-- aicert-reference-values --help -->``: the ``aicert-reference-values`` program runs the
  commands of ``aicert reference-values``; a table names each with its one-line help.

The API reference (mkdocstrings, griffe) reads the ``aicert`` package from its source files,
which griffe finds by folder name; the package's folder is ``verification/`` (setuptools
``package-dir``), and the ``aicert`` console script beside the interpreter would be taken for
it. So the build gives griffe a temporary folder where ``aicert`` names the real package.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer
import typer.main
from mkdocs.plugins import event_priority
from typer.cli import get_docs_for_click
from typer.core import TyperGroup

import aicert
from aicert.cli import app
from aicert.flows.cli import register

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs.structure.pages import Page

AICERT_MARKER = "<!-- aicert --help -->"
REFERENCE_VALUES_MARKER = "<!-- aicert-reference-values --help -->"
# The typer group of ``aicert`` that the ``aicert-reference-values`` program also runs.
REFERENCE_VALUES_GROUP = "reference-values"

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


def _aicert_command() -> TyperGroup:
    """The ``aicert`` program as ``main`` assembles it (the builder's commands added).

    Returns:
        Its command group.
    """
    # The registration of aicert.cli.main, once per process (mkdocs serve rebuilds).
    if "run" not in {command.name for command in app.registered_commands}:
        register(app)
    command = typer.main.get_command(app)
    if not isinstance(command, TyperGroup):
        raise TypeError(f"aicert is a single command ({type(command).__name__}), not a group")
    return command


def aicert_markdown() -> str:
    """Markdown for every ``aicert`` command, from the typer app as ``main`` assembles it.

    Returns:
        The program as a level-2 heading, each command below it, with usage and options.
    """
    command = _aicert_command()
    context = typer.Context(command, info_name="aicert")
    # indent=1: the program is a level-2 heading under the page's title.
    return get_docs_for_click(obj=command, ctx=context, indent=1, name="aicert").strip()


def reference_values_markdown() -> str:
    """Markdown: each ``aicert-reference-values`` command beside the ``aicert`` one it runs.

    Returns:
        A sentence, then a table of the commands, each with its one-line help.

    Raises:
        RuntimeError: ``aicert`` has no ``reference-values`` group (the program changed).
    """
    group = _aicert_command().commands.get(REFERENCE_VALUES_GROUP)
    if not isinstance(group, TyperGroup) or not group.commands:
        raise RuntimeError(f"aicert has no {REFERENCE_VALUES_GROUP} commands")
    rows = [
        f"| `aicert-reference-values {name}` | `aicert {REFERENCE_VALUES_GROUP} {name}` "
        f"| {command.get_short_help_str(limit=200).replace('|', '&#124;')} |"
        for name, command in group.commands.items()
    ]
    lead = (
        f"The program runs the commands of `aicert {REFERENCE_VALUES_GROUP}` above, with the "
        "same options and exit codes:"
    )
    table = ["| command | the same as | what it does |", "|---|---|---|", *rows]
    return "\n".join([lead, "", *table])


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
