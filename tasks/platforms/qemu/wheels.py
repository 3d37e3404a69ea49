"""The Python side of the ``qemu`` guest image: the pinned wheels and their installation.

The guest gets exactly the versions of ``aicert[guest]``'s dependencies the orchestrator runs
(``guest_python_pins``), as wheels fetched once and cached, and an ``aicert`` wheel built
from a clean copy of the source tree with a pinned build backend. Only what runs in the
guest is installed: the verifier (``aicert``) and ``aicert.guest_runtime``; every other
part the project's pyproject maps (``aicert.tasks``, ``aicert.flows``, ``aicert.exports``)
is removed with its RECORD lines.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from aicert.tasks.platforms.qemu.image import GuestImageError
from aicert.tasks.platforms.qemu.recipe import (
    BUILD_BACKEND_PINS,
    GUEST_PACKAGES_OF_AICERT,
    GUEST_SITE_PACKAGES,
    BuildInputs,
    ProgressCallback,
    run_step,
)

# Distributions of aicert's dependencies that only its command line uses (never the agent).
CLI_ONLY_DISTRIBUTIONS = frozenset(
    {"typer", "rich", "pygments", "markdown-it-py", "mdurl", "shellingham"}
)


def _wanted_requirements(
    distribution: importlib.metadata.Distribution, extras: frozenset[str]
) -> list[Requirement]:
    """The requirements of ``distribution`` that apply here with ``extras``."""
    environment = default_environment()
    wanted = [{**environment, "extra": extra} for extra in (extras or {""})]
    requirements = [Requirement(line) for line in distribution.requires or []]
    return [
        requirement
        for requirement in requirements
        if requirement.marker is None or any(requirement.marker.evaluate(env) for env in wanted)
    ]


def guest_python_pins() -> tuple[str, ...]:
    """``name==version`` of every distribution ``aicert[guest]`` needs, as installed here.

    The guest gets exactly the versions the orchestrator runs and was tested with.

    Raises:
        GuestImageError: a needed distribution is not installed here.
    """
    pins: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [("aicert", frozenset({"guest"}))]
    while pending:
        name, extras = pending.pop()
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise GuestImageError(f"{name} is not installed here: install aicert[guest]") from None
        key = canonicalize_name(distribution.metadata["Name"])
        if key in CLI_ONLY_DISTRIBUTIONS:
            continue
        if key != "aicert":
            pins[key] = distribution.version
        for requirement in _wanted_requirements(distribution, extras):
            child = canonicalize_name(requirement.name)
            if child in {"aicert", *CLI_ONLY_DISTRIBUTIONS}:
                continue
            if child in pins and not requirement.extras:
                continue
            pending.append((child, frozenset(requirement.extras)))
    return tuple(f"{name}=={version}" for name, version in sorted(pins.items()))


def package_folders(project_root: Path) -> dict[str, str]:
    """The project's packages and the source folders they are built from (pyproject's
    ``[tool.setuptools] package-dir``: one folder per part)."""
    pyproject = tomllib.loads((project_root / "pyproject.toml").read_text(encoding="utf-8"))
    folders: dict[str, str] = pyproject["tool"]["setuptools"]["package-dir"]
    return folders


def _pip_wheel(
    requirements: list[str],
    wheel_dir: Path,
    progress: ProgressCallback | None,
    what: str,
    env: dict[str, str] | None = None,
) -> None:
    """``pip wheel --no-deps`` of ``requirements`` into ``wheel_dir`` (the host's pip setup)."""
    argv = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir"]
    run_step([*argv, str(wheel_dir), *requirements], progress, what, env)


def pinned_wheels(inputs: BuildInputs, cache: Path, progress: ProgressCallback | None) -> Path:
    """Wheels of the pinned guest dependencies (the host's pip configuration), cached."""
    folder = cache / f"wheels-{inputs.wheels_key()}"
    done = folder / "complete"
    if done.is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _pip_wheel(list(inputs.python_pins), folder, progress, "pip wheel")
    done.write_text("\n".join(inputs.python_pins) + "\n")
    return folder


def project_wheel(inputs: BuildInputs, work: Path, progress: ProgressCallback | None) -> Path:
    """The aicert wheel, built from a clean copy of the source tree (no build/ or egg-info
    left in the repository, no stray __pycache__ in the wheel); the folder holding it."""
    source = work / "aicert-source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(inputs.project_root / name, source / name)
    for folder in package_folders(inputs.project_root).values():
        shutil.copytree(inputs.project_root / folder, source / folder, ignore=ignore)
    wheels = work / "aicert-wheel"
    constraints = work / "build-constraints.txt"
    constraints.write_text("\n".join(BUILD_BACKEND_PINS) + "\n")
    # Also read by the pip that installs the isolated build environment.
    pin_backend = {"PIP_CONSTRAINT": str(constraints)}
    _pip_wheel([str(source)], wheels, progress, "pip wheel (aicert)", pin_backend)
    return wheels


def _remove_host_packages(target: Path, project_root: Path) -> None:
    """Delete every aicert subpackage the guest does not run, and its RECORD lines.

    The orchestrator's code (and any other part) has no business in the guest; leaving it
    out also keeps the image (and its reference values) unchanged by edits to those parts."""
    left_out = [
        package.removeprefix("aicert.")
        for package in package_folders(project_root)
        if package not in GUEST_PACKAGES_OF_AICERT
    ]
    for package in left_out:
        shutil.rmtree(target / "aicert" / package)
    prefixes = tuple(f"aicert/{package}/" for package in left_out)
    for record in target.glob("aicert-*.dist-info/RECORD"):
        kept = [
            line
            for line in record.read_text(encoding="utf-8").splitlines(keepends=True)
            if not line.startswith(prefixes)
        ]
        record.write_text("".join(kept), encoding="utf-8")


def install_python(
    inputs: BuildInputs,
    root: Path,
    wheels: Path,
    project_wheels: Path,
    progress: ProgressCallback | None,
) -> None:
    """Install aicert and the pinned wheels into the guest's site-packages, keep only what
    the guest runs, and make the result independent of the build host.

    Raises:
        GuestImageError: pip or strip failed, or strip is not installed.
    """
    target = root / GUEST_SITE_PACKAGES
    target.mkdir(parents=True, exist_ok=True)
    version = importlib.metadata.version("aicert")
    pip_install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    pip_install += ["--no-compile", "--no-warn-script-location"]
    pip_install += ["--find-links", str(wheels), "--find-links", str(project_wheels)]
    pip_install += ["--target", str(target), f"aicert=={version}", *inputs.python_pins]
    run_step(pip_install, progress, "pip install --target")
    _remove_host_packages(target, inputs.project_root)
    # Console scripts carry the build host's interpreter path; the guest runs modules.
    shutil.rmtree(target / "bin", ignore_errors=True)
    for direct_url in target.glob("*.dist-info/direct_url.json"):
        direct_url.unlink()
    # Debug symbols of locally built extensions (tpm2-pytss) embed build paths and weigh MBs.
    libraries = sorted(str(path) for path in target.rglob("*.so"))
    if shutil.which("strip") is None:
        # Skipping it would give another image than a host that has it.
        raise GuestImageError("strip is not installed (apt-get install binutils)")
    run_step(["strip", "--strip-debug", *libraries], progress, "strip")
