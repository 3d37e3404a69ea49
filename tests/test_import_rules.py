"""The parts of the repository depend one way only; this test reads every import to hold it.

Rules (README "Layout"): the verifier (``verification/``, package ``aicert``) imports only the
standard library and its own small dependencies, never another part; the guest runtime imports
neither Prefect nor the orchestrator's parts; the platform modules (``tasks/platforms/``) import
no Prefect and no other task or flow module; the tasks do not import the flows; the exports
(``exports/``) read verified certificates and import only the verifier.

import-linter cannot see this layout (setuptools maps four folders into one ``aicert``
namespace, and grimp reads a package from its folder), so the rules are checked on the source:
every ``import`` and ``from ... import`` anywhere in a file counts, function-local and
``TYPE_CHECKING`` ones included. A second check imports the Prefect-free parts in a fresh
interpreter and finds no Prefect loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Folder -> the package it is installed as (pyproject's package-dir).
PARTS = {
    "verification": "aicert",
    "guest_runtime": "aicert.guest_runtime",
    "tasks": "aicert.tasks",
    "aicert_flows": "aicert.flows",
    "exports": "aicert.exports",
}
SUBPACKAGES_OF_AICERT = ("aicert.guest_runtime", "aicert.tasks", "aicert.flows", "aicert.exports")

# What the end user's verifier may import besides the standard library and itself: the bare
# `pip install aicert` dependencies (pyproject's `dependencies`).
VERIFIER_THIRD_PARTY = {"cryptography", "pydantic", "rfc8785", "typer", "rich"}
# Optional imports of the verifier, each in one module that the verifier imports only when
# needed (a YAML policy): the bare install does without them (test_bare_verifier_loads_...).
VERIFIER_OPTIONAL = {"aicert.strict_yaml": {"yaml"}}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    folder, *rest = relative.parts
    parts = [PARTS[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, source: str | None = None) -> list[Import]:
    """Every module a file imports, relative imports resolved against its package."""
    tree = ast.parse(source if source is not None else path.read_text(), filename=str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append(Import(path, node.lineno, base))
            # `from aicert import tasks` imports the submodule aicert.tasks.
            found += [Import(path, node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def broken_rules(path: Path, source: str | None = None) -> list[str]:
    """The rules this file breaks, one line each (file:line: module - rule)."""
    me = module_name(path)
    problems: list[str] = []
    for imported in imports_of(path, source):
        module, top = imported.module, imported.module.split(".")[0]
        rule = None
        if not any(within(me, sub) for sub in SUBPACKAGES_OF_AICERT):  # the verifier
            if any(within(module, sub) for sub in SUBPACKAGES_OF_AICERT):
                rule = "the verifier imports no other part"
            elif top not in sys.stdlib_module_names | VERIFIER_THIRD_PARTY | {"aicert"} | (
                VERIFIER_OPTIONAL.get(me, set())
            ):
                rule = "the verifier imports only the stdlib and its own dependencies"
        elif within(me, "aicert.guest_runtime"):
            if top == "prefect" or within(module, "aicert.tasks") or within(module, "aicert.flows"):
                rule = "the guest runtime imports neither Prefect, tasks nor flows"
        elif within(me, "aicert.tasks.platforms"):
            if top.startswith("prefect") or within(module, "aicert.flows"):
                rule = "platform modules import no Prefect and no flows"
            elif within(module, "aicert.tasks") and not within(module, "aicert.tasks.platforms"):
                rule = "platform modules import no task module"
        elif within(me, "aicert.tasks") and within(module, "aicert.flows"):
            rule = "tasks do not import the flows"
        elif within(me, "aicert.exports") and any(
            within(module, sub) for sub in SUBPACKAGES_OF_AICERT if sub != "aicert.exports"
        ):
            rule = "exports read verified certificates: they import only the verifier"
        if rule is not None:
            where = path.relative_to(ROOT)
            problems.append(f"{where}:{imported.line}: imports {module} - {rule}")
    return problems


def source_files() -> list[Path]:
    return sorted(p for folder in PARTS for p in (ROOT / folder).rglob("*.py"))


def test_every_part_keeps_its_dependency_rules() -> None:
    files = source_files()
    assert len(files) > 50
    problems = [line for path in files for line in broken_rules(path)]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    ("path", "source", "rule"),
    [
        ("verification/verify.py", "from aicert.flows import cli", "verifier imports no other"),
        ("verification/verify.py", "import docker", "only the stdlib"),
        ("verification/policy.py", "import yaml", "only the stdlib"),
        ("verification/cli.py", "def f():\n    import aicert.tasks\n", "verifier imports no"),
        ("guest_runtime/agent.py", "from prefect import flow", "guest runtime"),
        ("guest_runtime/agent.py", "from ..tasks import platforms", "guest runtime"),
        ("tasks/platforms/qemu/image.py", "import prefect.logging", "no Prefect"),
        ("tasks/platforms/base.py", "from aicert.tasks import certification", "no task module"),
        ("tasks/platforms/base.py", "from aicert.tasks.certification import x", "no task"),
        ("tasks/certification.py", "from aicert.flows.blocks import X", "tasks do not import"),
        ("tasks/certification.py", "from ..flows import blocks", "tasks do not import"),
        ("exports/cyclonedx.py", "from aicert.tasks import platforms", "only the verifier"),
    ],
)
def test_each_rule_catches_a_violation(path: str, source: str, rule: str) -> None:
    problems = broken_rules(ROOT / path, source)
    assert problems and all(rule in problem for problem in problems), problems


def test_allowed_imports_pass() -> None:
    allowed = {
        "verification/verify.py": "import json\nfrom cryptography import x509\nfrom . import quote",
        "verification/strict_yaml.py": "import yaml",
        "guest_runtime/agent.py": "import docker\nfrom aicert.model import Certificate",
        "tasks/platforms/qemu/image.py": "from aicert.tasks.platforms.base import Provider",
        "tasks/certification.py": "from prefect import task\nfrom aicert.tasks.platforms import x",
        "aicert_flows/flows.py": "from aicert.tasks import certification",
    }
    for path, source in allowed.items():
        assert broken_rules(ROOT / path, source) == [], path


def test_prefect_free_parts_load_without_prefect() -> None:
    modules = [
        "aicert.cli",
        "aicert.guest_runtime.agent",
        "aicert.guest_runtime.server",
        "aicert.tasks.platforms",
        "aicert.tasks.platforms.local",
        "aicert.tasks.platforms.qemu",
        "aicert.tasks.platforms.qemu.image",
        "aicert.tasks.platforms.azure",
    ]
    program = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    program += "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'prefect')\n"
    program += "print(loaded)\nraise SystemExit(1 if loaded else 0)\n"
    completed = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_bare_verifier_loads_without_its_optional_imports() -> None:
    """The verifier's modules (``aicert.strict_yaml`` aside) load no optional dependency."""
    modules = [
        module_name(path)
        for path in source_files()
        if path.parent == ROOT / "verification" and module_name(path) not in VERIFIER_OPTIONAL
    ]
    optional = sorted(set().union(*VERIFIER_OPTIONAL.values()))
    program = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    program += f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {optional!r})\n"
    program += "print(loaded)\nraise SystemExit(1 if loaded else 0)\n"
    completed = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_every_module_imports() -> None:
    """A moved module's stale import fails here, not in the one test that happens to use it."""
    modules = [module_name(path) for path in source_files()]
    program = "import importlib, sys\nfailed = []\n"
    program += f"for name in {modules!r}:\n"
    program += "    try:\n        importlib.import_module(name)\n"
    program += "    except Exception as exc:\n        failed.append(f'{name}: {exc!r}')\n"
    program += "print('\\n'.join(failed))\nraise SystemExit(1 if failed else 0)\n"
    completed = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
