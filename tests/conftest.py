"""Session fixtures shared by the flow, qemu and Azure tests: one Prefect test server and the
offline base image for the whole session (a fixture imported into several test modules would
start one server per module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A temporary Prefect server (SQLite in a temporary folder) for the whole session; the
    flow's result storage (where the certificate is stored) in a temporary folder too."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from tests.aicert_flows.conftest import flush_prefect_workers

    storage = tmp_path_factory.mktemp("prefect-storage")
    with (
        prefect_test_harness(server_startup_timeout=90),
        temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}),
    ):
        # Events and logs go through per-process workers bound to the API they started
        # with; ones started earlier in this session (another server) must not be reused.
        flush_prefect_workers()
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def base_image() -> str:
    """The offline Debian Python base image; built here when missing (CI), else reused."""
    from aicert.tasks.platforms.base_image import ensure_base_image

    return ensure_base_image()
