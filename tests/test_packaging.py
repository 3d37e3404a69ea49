"""Packaging is checked, not assumed: ``python -m build`` makes the sdist and, from it, the
wheel (so the sdist holds everything the wheel needs); ``twine check --strict`` accepts both
(the README renders as the PyPI description); the wheel installs in fresh venvs and imports."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

VERIFIER_MODULES = [
    "aicert",
    "aicert.appevents",
    "aicert.canonical",
    "aicert.chain",
    "aicert.cli",
    "aicert.errors",
    "aicert.hashing",
    "aicert.model",
    "aicert.quote",
    "aicert.reference_values",
    "aicert.schema",
    "aicert.tcg_eventlog",
    "aicert.tpm_structures",
    "aicert.verify",
]


def _modules_in_wheel(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    return sorted(
        name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name in names
        if name.endswith(".py") and not name.split("/")[-1].startswith("__main__")
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder ``python -m build`` wrote: the sdist, and the wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    (built,) = dist.glob("aicert-*.whl")
    return built


@pytest.fixture(scope="module")
def sdist(dist: Path) -> Path:
    (built,) = dist.glob("aicert-*.tar.gz")
    return built


def test_twine_accepts_the_sdist_and_the_wheel(sdist: Path, wheel: Path) -> None:
    # --strict: a warning (a description that would not render on PyPI, missing metadata)
    # fails as an error would.
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_the_sdist_holds_the_sources_and_package_data(sdist: Path) -> None:
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for path in (
        "README.md",
        "pyproject.toml",
        "verification/schemas/aicert-v1.schema.json",
        "aicert_flows/blocks.py",
        "tasks/platforms/qemu/guest/init.sh",
    ):
        assert path in names, f"the sdist lacks {path}"


def test_the_readme_links_resolve_off_the_repository() -> None:
    # PyPI shows the README without the repository around it: a relative link or image
    # (docs/x.md) would be broken there. Links go to the docs site or elsewhere absolute.
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)", readme)
    assert targets, "no links found: the pattern is wrong"
    relative = [t for t in targets if not re.match(r"(https?://|#)", t)]
    assert relative == []


def _venv(path: Path, *, system_site: bool = False) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    if system_site:
        # Reuse the dependencies already installed for the tests, but not the aicert
        # package itself: the wheel under test must be the one imported.
        site = Path(sysconfig.get_paths()["purelib"])
        (
            path
            / "lib"
            / f"python{sys.version_info.major}.{sys.version_info.minor}"
            / "site-packages"
            / "_deps.pth"
        ).write_text(str(site) + "\n")
    return path / "bin" / "python"


def test_wheel_maps_every_folder_into_the_aicert_namespace(wheel: Path) -> None:
    modules = _modules_in_wheel(wheel)
    top_level = {module.split(".")[0] for module in modules}
    assert top_level == {"aicert"}, f"generic top-level names leaked: {top_level}"
    for package in ("aicert.guest_runtime", "aicert.tasks", "aicert.flows"):
        assert package in modules
    with zipfile.ZipFile(wheel) as archive:
        assert "aicert/schemas/aicert-v1.schema.json" in archive.namelist()


def test_bare_install_is_the_verifier_alone(wheel: Path, tmp_path: Path) -> None:
    python = _venv(tmp_path / "bare")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    code = (
        "import importlib, importlib.util, sys\n"
        f"for name in {VERIFIER_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "for absent in ('prefect', 'docker', 'tpm2_pytss', 'fastapi'):\n"
        "    assert importlib.util.find_spec(absent) is None, absent\n"
        "import aicert.schema; aicert.schema.published_schema_text()\n"
        "print(aicert.__file__)\n"
    )
    result = subprocess.run(
        [str(python), "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    assert str(tmp_path / "bare") in result.stdout
    help_text = subprocess.run(
        [str(tmp_path / "bare" / "bin" / "aicert"), "--help"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    commands = {line.strip("│ ").split(" ")[0] for line in help_text.splitlines()}
    assert "verify" in commands and "inspect" in commands
    assert "run" not in commands, "builder commands need the flows extra"


def test_every_module_of_the_wheel_imports(wheel: Path, tmp_path: Path) -> None:
    python = _venv(tmp_path / "full", system_site=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
    )
    modules = _modules_in_wheel(wheel)
    code = (
        "import importlib\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(tmp_path / 'full')!r}), module.__file__\n"
    )
    subprocess.run([str(python), "-c", code], check=True, timeout=300)
