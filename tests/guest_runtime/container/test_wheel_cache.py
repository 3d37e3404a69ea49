"""The dependency cache: wheels by SHA-256, recorded resolutions, and the pinning rule.

Real pip against the configured index (six 1.16.0, one small wheel); the cache in a temporary
folder. Each tamper test changes exactly one thing in the cache and checks the run's answer.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from aicert.guest_runtime.wheel_cache import (
    CACHE_ENV,
    REFRESH_ENV,
    DependencyCache,
    WheelInfo,
    dependency_cache_dir,
    unpinned_reason,
)
from aicert.guest_runtime.wheelhouse import WheelhouseError, resolve_wheelhouse
from aicert.hashing import sha256_file

SIX = WheelInfo(
    "six",
    "1.16.0",
    "six-1.16.0-py2.py3-none-any.whl",
    "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254",
    11053,
)
PINNED = "# training deps\nsix==1.16.0\n"
REUSED = "as resolved by an earlier run"


def pip_ran(lines: list[str]) -> bool:
    """Whether pip resolved (its "Collecting" lines are in the progress)."""
    return any(line.startswith("Collecting ") for line in lines)


@pytest.fixture
def requirements(tmp_path: Path) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text(PINNED, encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path: Path) -> DependencyCache:
    return DependencyCache(tmp_path / "cache")


def resolve(
    requirements: Path, dest: Path, cache: DependencyCache
) -> tuple[list[WheelInfo], list[str]]:
    lines: list[str] = []
    wheels = resolve_wheelhouse(requirements, dest, cache=cache, progress=lines.append)
    return wheels, lines


def record_path(cache: DependencyCache) -> Path:
    (path,) = (cache.root / "resolutions").iterdir()
    return path


# -- the pinning rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "six==1.16.0\n",
        "# comment\n\nsix==1.16.0  # trailing comment\n",
        "Six[extra]==1.16.0 ; python_version >= '3'\n",
        f"six==1.16.0 --hash=sha256:{SIX.sha256}\n",
        f"six==1.16.0 \\\n    --hash=sha256:{SIX.sha256} --hash=sha256:{'0' * 64}\n",
    ],
)
def test_pinned_requirements_may_reuse_a_resolution(tmp_path: Path, text: str) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text(text, encoding="utf-8")
    assert unpinned_reason(path) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("six\n", "line 1 ('six') does not pin one version with =="),
        ("six==1.16.0\nnumpy>=1.26\n", "line 2 ('numpy>=1.26') does not pin one version"),
        ("six==1.*\n", "does not pin one version with =="),
        ("six>=1,==1.16.0\n", "does not pin one version with =="),
        ("six @ https://example.org/six.whl\n", "does not pin one version with =="),
        ("-r other.txt\n", "line 1 ('-r other.txt') is an option line"),
        ("--index-url https://example.org/simple\nsix==1.16.0\n", "is an option line"),
        ("six==${SIX_VERSION}\n", "uses an environment variable"),
        ("six==1.16.0 --config-settings=a=b\n", "has options other than --hash"),
        ("six==1.16.0 garbage(\n", "is not a requirement pip would pin"),
    ],
)
def test_unpinned_requirements_say_which_line(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text(text, encoding="utf-8")
    found = unpinned_reason(path)
    assert found is not None and reason in found


def test_cache_location_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert dependency_cache_dir(tmp_path) == tmp_path / "cache" / "dependencies"
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert DependencyCache.from_environment() is None
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    monkeypatch.setenv(REFRESH_ENV, "0")
    found = DependencyCache.from_environment()
    assert found is not None and found.root == tmp_path / "c" and not found.refresh
    monkeypatch.setenv(REFRESH_ENV, "1")
    found = DependencyCache.from_environment()
    assert found is not None and found.refresh


# -- reuse -------------------------------------------------------------------------------------


def test_second_resolution_reuses_the_record_without_pip(
    requirements: Path, cache: DependencyCache, tmp_path: Path
) -> None:
    first, first_lines = resolve(requirements, tmp_path / "w1", cache)
    assert first == [SIX] and pip_ran(first_lines)
    assert cache.wheel_path(SIX).is_file()
    assert json.loads(record_path(cache).read_text())["wheels"][0]["sha256"] == SIX.sha256

    second, second_lines = resolve(requirements, tmp_path / "w2", cache)
    assert second == first
    assert not pip_ran(second_lines)
    assert any(REUSED in line for line in second_lines)
    assert sha256_file(tmp_path / "w2" / SIX.filename) == (SIX.sha256, SIX.size)
    assert sorted(path.name for path in (tmp_path / "w2").iterdir()) == [SIX.filename]
    assert list((cache.root / "tmp").iterdir()) == []  # every write renamed into place


def test_changed_requirements_resolve_again(
    requirements: Path, cache: DependencyCache, tmp_path: Path
) -> None:
    resolve(requirements, tmp_path / "w1", cache)
    requirements.write_text(PINNED + "# a comment changes the bytes, so the key\n")
    _, lines = resolve(requirements, tmp_path / "w2", cache)
    assert pip_ran(lines)
    assert len(list((cache.root / "resolutions").iterdir())) == 2


def test_refresh_resolves_again_and_replaces_the_record(
    requirements: Path, cache: DependencyCache, tmp_path: Path
) -> None:
    resolve(requirements, tmp_path / "w1", cache)
    record = record_path(cache)
    record.write_text(record.read_text().replace('"1.16.0"', '"0.0.1"'))  # a stale record
    refreshing = DependencyCache(cache.root, refresh=True)
    wheels, lines = resolve(requirements, tmp_path / "w2", refreshing)
    assert wheels == [SIX] and pip_ran(lines)
    assert any("resolving again (refresh requested)" in line for line in lines)
    assert json.loads(record.read_text())["wheels"][0]["version"] == "1.16.0"


def test_unpinned_requirements_are_resolved_every_run(
    cache: DependencyCache, tmp_path: Path
) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("six>=1.16,<1.17\n")
    for dest in ("w1", "w2"):
        wheels, lines = resolve(requirements, tmp_path / dest, cache)
        assert wheels == [SIX] and pip_ran(lines)
        assert any("does not pin one version with ==" in line for line in lines)
    assert not (cache.root / "resolutions").exists()
    assert cache.wheel_path(SIX).is_file()  # the wheels are cached all the same


def test_unreadable_record_is_ignored(
    requirements: Path, cache: DependencyCache, tmp_path: Path
) -> None:
    resolve(requirements, tmp_path / "w1", cache)
    record_path(cache).write_text("{not json")
    wheels, lines = resolve(requirements, tmp_path / "w2", cache)
    assert wheels == [SIX] and pip_ran(lines)
    assert json.loads(record_path(cache).read_text())["format"] == 1  # written anew


def test_record_naming_one_file_twice_is_ignored(
    requirements: Path, cache: DependencyCache, tmp_path: Path
) -> None:
    resolve(requirements, tmp_path / "w1", cache)
    record = record_path(cache)
    value = json.loads(record.read_text())
    value["wheels"].append({**value["wheels"][0], "sha256": "0" * 64})
    record.write_text(json.dumps(value))
    wheels, lines = resolve(requirements, tmp_path / "w2", cache)
    assert wheels == [SIX] and pip_ran(lines)


# -- a cache that lies -------------------------------------------------------------------------


def test_corrupt_cached_wheel_is_downloaded_again_and_the_cache_repaired(
    requirements: Path, cache: DependencyCache, tmp_path: Path
) -> None:
    resolve(requirements, tmp_path / "w1", cache)
    cached = cache.wheel_path(SIX)
    cached.unlink()  # (the first run's copy may share its bytes: change only the cache's)
    cached.write_bytes(b"not the wheel that was measured")

    wheels, lines = resolve(requirements, tmp_path / "w2", cache)

    assert wheels == [SIX]
    assert any(f"not matching its sha256 {SIX.sha256}" in line for line in lines)
    assert sha256_file(tmp_path / "w2" / SIX.filename) == (SIX.sha256, SIX.size)
    assert sha256_file(cached) == (SIX.sha256, SIX.size)  # repaired
    _, again = resolve(requirements, tmp_path / "w3", cache)
    assert not any("downloading it again" in line for line in again)


def test_missing_cached_wheel_is_downloaded_again(
    requirements: Path, cache: DependencyCache, tmp_path: Path
) -> None:
    resolve(requirements, tmp_path / "w1", cache)
    cache.wheel_path(SIX).unlink()
    wheels, lines = resolve(requirements, tmp_path / "w2", cache)
    assert wheels == [SIX]
    assert any("missing from the dependency cache" in line for line in lines)
    assert sha256_file(cache.wheel_path(SIX)) == (SIX.sha256, SIX.size)


def test_wheel_that_cannot_be_fetched_again_is_a_clear_error(
    requirements: Path, cache: DependencyCache, tmp_path: Path
) -> None:
    # The record names digest 0...0 for six: no index serves those bytes, and the cache has
    # none under that digest.
    resolve(requirements, tmp_path / "w1", cache)
    record = record_path(cache)
    record.write_text(record.read_text().replace(SIX.sha256, "0" * 64))
    with pytest.raises(WheelhouseError) as caught:
        resolve(requirements, tmp_path / "w2", cache)
    message = str(caught.value)
    assert f"{SIX.filename} (sha256 {'0' * 64})" in message
    assert "cannot be downloaded again" in message
    assert "--refresh-dependencies" in message and REFRESH_ENV in message


def test_two_runs_at_once_share_the_cache(
    requirements: Path, cache: DependencyCache, tmp_path: Path
) -> None:
    resolve(requirements, tmp_path / "w0", cache)
    cache.wheel_path(SIX).unlink()  # both runs download it again and write it at once
    results: dict[str, list[WheelInfo]] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            results[name] = resolve_wheelhouse(requirements, tmp_path / name, cache=cache)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == {"a": [SIX], "b": [SIX]}
    assert sha256_file(cache.wheel_path(SIX)) == (SIX.sha256, SIX.size)
    assert list((cache.root / "tmp").iterdir()) == []


def test_cli_refresh_dependencies_sets_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aicert run --refresh-dependencies`` reaches the resolvers through the variable (the
    run stops at the missing config, before any flow)."""
    from typer.testing import CliRunner

    from aicert.cli import _register_plugin_commands, app

    _register_plugin_commands()
    monkeypatch.setenv(REFRESH_ENV, "")  # restored after the test
    missing = str(tmp_path / "missing.yaml")
    result = CliRunner().invoke(app, ["run", "--config", missing])
    assert result.exit_code == 2, result.output
    assert DependencyCache.for_home(tmp_path).refresh is False
    result = CliRunner().invoke(app, ["run", "--config", missing, "--refresh-dependencies"])
    assert result.exit_code == 2, result.output
    assert DependencyCache.for_home(tmp_path).refresh is True
