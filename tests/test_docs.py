"""The documentation site builds with ``mkdocs build --strict`` and cannot go stale silently.

The build fails on any warning (a broken link or anchor, a page left out of the nav, an API
object mkdocstrings cannot collect); the tests then check what the strict build cannot see:
that the API reference really rendered the package's docstrings (griffe finds ``aicert`` in
``verification/`` only through the site's hook), that the CLI reference holds every command,
that every exception of ``aicert.errors`` is on the checks page, and that the built site
fetches nothing from the network.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mkdocs.config import load_config

import aicert.errors

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHECKS_PAGE = DOCS / "verification-checks.md"

pytestmark = pytest.mark.slow


def _nav_pages(nav: list[object]) -> Iterator[str]:
    """Every Markdown path of a MkDocs nav (entries are paths, {title: path} or sections)."""
    for entry in nav:
        if isinstance(entry, str):
            yield entry
        elif isinstance(entry, dict):
            for value in entry.values():
                if isinstance(value, str):
                    yield value
                else:
                    yield from _nav_pages(value)


@pytest.fixture(scope="module")
def nav_pages() -> list[str]:
    config = load_config(str(ROOT / "mkdocs.yml"))
    return list(_nav_pages(config["nav"]))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with --strict into a temporary folder."""
    site_dir = tmp_path_factory.mktemp("site")
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # The console script, as people run it: its folder (the venv's bin/, which also holds the
    # `aicert` script that griffe could take for the package) comes first on sys.path.
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    # --strict aborts on warnings MkDocs counts; a plugin's own warning must fail too.
    warnings = [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert warnings == [], "\n".join(warnings)
    return site_dir


def _text(site: Path, page: str) -> str:
    """The visible text of a built page's article (no markup, no scripts)."""
    html = (site / page / "index.html").read_text()
    article = re.search(r"<article.*?</article>", html, re.S)
    assert article is not None, f"{page}: no article"
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", article.group(0)))


def test_every_page_in_the_nav_exists_and_was_built(nav_pages: list[str], site: Path) -> None:
    assert "verification-checks.md" in nav_pages
    for page in nav_pages:
        assert (DOCS / page).is_file(), f"mkdocs.yml lists {page}, which is not in docs/"
        built = page.removesuffix(".md").removesuffix("index").rstrip("/")
        assert (site / built / "index.html").is_file(), f"{page} was not built"


def test_every_page_in_docs_is_in_the_nav(nav_pages: list[str]) -> None:
    pages = {
        str(path.relative_to(DOCS))
        for path in DOCS.rglob("*.md")
        if "hooks" not in path.relative_to(DOCS).parts
    }
    assert pages == set(nav_pages)


def test_every_exception_is_on_the_checks_page() -> None:
    page = CHECKS_PAGE.read_text()
    exceptions = [
        name
        for name, value in inspect.getmembers(aicert.errors, inspect.isclass)
        if issubclass(value, aicert.errors.VerificationError)
    ]
    assert len(exceptions) >= 14
    missing = [name for name in exceptions if f"`{name}`" not in page]
    assert missing == [], f"not documented in {CHECKS_PAGE.name}: {missing}"


def test_the_api_reference_renders_the_docstrings(site: Path) -> None:
    # Each page must show the real objects: a griffe that found another "aicert" (the
    # console script) renders an empty page without any warning.
    expected = {
        "api/aicert": ["verify AI model certificates offline"],
        "api/model": ["Certificate", "from_json_bytes", "naming the limit, key or field"],
        "api/verify": ["verify_certificate", "VerificationReport", "raise on the first failed"],
        "api/errors": [name for name, _ in inspect.getmembers(aicert.errors, inspect.isclass)],
        "api/quote": ["verify_quote"],
        "api/tcg_eventlog": ["parse_event_log", "TcgEventLog"],
        "api/reference_values": ["PlatformReferenceValues"],
    }
    for page, names in expected.items():
        text = _text(site, page)
        missing = [name for name in names if name not in text]
        assert missing == [], f"{page}: {missing} not rendered"


def test_the_cli_reference_has_every_command(site: Path) -> None:
    text = _text(site, "cli")
    for command in (
        "aicert verify",
        "aicert inspect",
        "aicert run",
        "aicert cleanup",
        "aicert image build-base",
        "aicert image build-guest",
        "--allow-dev-platform",
        "--output-bom",
        "aicert-reference-values derive-azure",
        "aicert-reference-values check",
    ):
        assert command in text, f"the CLI reference lacks {command!r}"


def test_the_site_fetches_nothing_from_the_network(site: Path) -> None:
    # Stylesheets, scripts, fonts and images come from the site itself; links to other sites
    # (<a href>) are fine, and so is the canonical address (site_url), which fetches nothing.
    external = re.compile(
        r"""<(?:link(?![^>]*rel="canonical")|script|img)\b[^>]*\b(?:href|src)=["']?(?:https?:)?//"""
    )
    offenders = [
        str(path.relative_to(site))
        for path in site.rglob("*.html")
        if external.search(path.read_text())
    ]
    assert offenders == []
    assert not any("fonts.googleapis" in path.read_text() for path in site.rglob("*.html"))


def test_the_blocks_link_to_pages_and_logos_the_site_has(site: Path) -> None:
    # The Prefect UI links each block type to its documentation and loads its logo from the
    # published site: both must be files of this build, at mkdocs.yml's site_url.
    from aicert.flows import (
        AicertRunConfig,
        AzurePlatform,
        GcpPlatform,
        LocalPlatform,
        QemuPlatform,
    )
    from aicert.flows.blocks import DOCUMENTATION_URL

    assert load_config(str(ROOT / "mkdocs.yml"))["site_url"] == DOCUMENTATION_URL
    for block in (AicertRunConfig, LocalPlatform, QemuPlatform, AzurePlatform, GcpPlatform):
        page, _, anchor = (
            str(block._documentation_url).removeprefix(DOCUMENTATION_URL).partition("#")
        )
        html = (site / page / "index.html").read_text()
        assert f'id="{anchor}"' in html, f"{block.__name__}: no #{anchor} on {page}"
        logo = site / str(block._logo_url).removeprefix(DOCUMENTATION_URL)
        assert logo.read_bytes().startswith(b"<svg"), f"{block.__name__}: {logo} not built"


def test_the_readme_links_into_the_site_reach_built_pages(site: Path) -> None:
    # The README links to the published site by absolute address (PyPI shows it without the
    # repository): each address must be a page of this build.
    from aicert.flows.blocks import DOCUMENTATION_URL

    links = re.findall(
        rf"\]\(({re.escape(DOCUMENTATION_URL)}[^)#\s]*)", (ROOT / "README.md").read_text()
    )
    assert len(links) >= 4, links
    for link in links:
        page = link.removeprefix(DOCUMENTATION_URL)
        assert (site / page / "index.html").is_file(), f"README links to {link}: not built"
