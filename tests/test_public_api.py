"""Each part's public names are importable from its package's top, and lazily where it must be.

``from aicert.flows import certify_training`` (not ``aicert.flows.flows``): every name in a
package's ``__all__`` must import, be listed by ``dir()``, and be the object its defining
module holds. The packages that every ``aicert`` command loads through the ``aicert.cli``
entry point (``aicert.flows.cli``, ``aicert.exports.cli``) must stay light: importing them,
or the packages themselves, imports neither Prefect nor the CycloneDX library.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["aicert", "aicert.flows", "aicert.tasks", "aicert.exports", "aicert.guest_runtime"]

# Names the issue and the README promise at the top of each package.
PROMISED = {
    "aicert.flows": {
        "certify_training",
        "certify_evaluation",
        "verify_and_promote",
        "AicertRunConfig",
        "LocalPlatform",
        "QemuPlatform",
        "AzurePlatform",
    },
    "aicert.tasks": {"verify_certificate"},
    "aicert.exports": {"VerifiedCertificate", "bom_json"},
    "aicert.guest_runtime": {"RunConfig", "load_config", "RUNTIME_VERSION"},
    "aicert": {"load", "Certificate", "VerificationError"},
}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_imports(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), "a name listed twice"
    assert PROMISED[package] <= set(exported)
    listed = set(dir(module))
    for name in exported:
        value = getattr(module, name)
        assert value is not None, name
        assert name in listed, f"{package}.{name} is not in dir()"
        defined_in = getattr(value, "__module__", None)
        if isinstance(defined_in, str) and defined_in.startswith(f"{package}."):
            # Re-exported, not a copy: the same object as in its own module.
            assert getattr(importlib.import_module(defined_in), name, value) is value


@pytest.mark.parametrize("package", PACKAGES)
def test_star_import_gives_every_name(package: str) -> None:
    # In a fresh interpreter: a lazy hook that only works once something else imported the
    # module would pass above and fail for a user.
    code = (
        f"namespace = {{}}\nexec('from {package} import *', namespace)\n"
        f"import {package} as package\n"
        "missing = sorted(set(package.__all__) - set(namespace))\n"
        "assert not missing, missing\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize(
    "module", ["aicert.flows", "aicert.flows.cli", "aicert.exports", "aicert.exports.cli"]
)
def test_the_cli_path_stays_light(module: str) -> None:
    probe = (
        f"import sys, {module}\n"
        "heavy = [name for name in ('prefect', 'cyclonedx', 'docker', 'tpm2_pytss')"
        " if name in sys.modules]\n"
        "print(heavy)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error() -> None:
    import aicert.exports
    import aicert.flows
    import aicert.guest_runtime

    for package in (aicert.flows, aicert.exports, aicert.guest_runtime):
        with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
            _ = package.nothing_here
