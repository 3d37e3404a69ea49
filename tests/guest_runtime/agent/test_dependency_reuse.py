"""Two runs with the same requirements on the local platform: the second reuses the cached
wheels, the recorded resolution and the training image, and measures the same events.

Real swtpm, real dockerd, the agent in its own process with the provider's dependency cache
(``$AICERT_HOME/cache/dependencies``, given through ``AICERT_DEPENDENCY_CACHE``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from aicert.guest_runtime.run_state import training_image_tag
from aicert.guest_runtime.wheel_cache import dependency_cache_dir
from aicert.model import AppEvent
from tests.guest_runtime.agent.conftest import AgentUnderTest, ConfigFactory, Provisioner

pytestmark = [pytest.mark.docker, pytest.mark.swtpm, pytest.mark.slow]


def dependency_part(events: list[AppEvent], run_id: str) -> list[tuple[str, dict[str, object]]]:
    """The image step's events as measured, less the training image's tag (the run's own
    name for it, checked to be ``training_image_tag(run_id)``)."""
    part = []
    for event in events:
        data = dict(event.data)
        if event.type == "aicert.input.image":
            assert data.pop("name") == training_image_tag(run_id)
        part.append((event.type, data))
    return part


def agent_log(agent: AgentUnderTest) -> str:
    return (Path(agent.machine.state_dir) / "agent.log").read_text(encoding="utf-8")


def test_second_run_reuses_dependencies_and_measures_the_same(
    provision: Provisioner, make_config: ConfigFactory
) -> None:
    config = make_config(tag="v1")
    with provision("deps-first") as first:
        first_events = first.prepare(config)
    with provision("deps-second") as second:
        second_events = second.prepare(config)
        status, lines = second.train()
        log = agent_log(second)

    assert [event.type for event in second_events] == [
        "aicert.input.package",
        "aicert.input.image",
    ]
    assert dependency_part(second_events, second.run_id) == dependency_part(
        first_events, first.run_id
    )
    assert "1 wheels as resolved by an earlier run" in log
    assert "reusing training image " + str(second_events[1].data["image_id"]) in log
    assert "Collecting six" not in log  # pip did not run
    # The reused image is the one the job ran in, offline, with six importable.
    assert status.exit_code == 0, lines
    assert any(line.startswith("six 1.16.0 from /opt/venv/") for line in lines), lines
    home = second.provider.home
    assert (dependency_cache_dir(home) / "resolutions").is_dir()
