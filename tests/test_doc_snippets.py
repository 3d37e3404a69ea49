"""The README's and the docs' Python snippets run as written, against a real certificate.

Every fenced ``python`` block of README.md and docs/*.md is found and handled by what it is:

- a pytest module (it defines ``test_`` functions): run with pytest, every test must pass;
- a script: run with ``python`` in a folder holding what the docs say a user has after
  ``aicert run`` (``proof.json``, the platform CA's ``platform-ca.pem``, the model in
  ``outputs/``, an ``aicert.yaml``), with a Prefect server; it must exit 0. Run again with
  another CA's certificate as ``platform-ca.pem`` and a changed model, it must fail: a
  snippet that verifies nothing does not pass;
- one that certifies (``certify_training(``: Docker, a swtpm and a minute; the flow's own
  tests run it) or pastes a UI snippet (``BLOCK_NAME``): its imports are run, the rest
  compiled;
- a skeleton to fill in (``class ...(PlatformBlock)``, ``(ABC)``), or a fragment of a
  longer program (it uses names it never defines): compiled.

A new snippet is a script unless it is one of the others, so it is run as soon as it is
written. The certificate is made by the verifier's test factory on a software TPM (a quote by a
platform-CA-certified AK over the measured run), verified by the SDK like any other.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.aicert_flows.conftest import training_config
from tests.data import DATA

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SKELETON = re.compile(r"^class \w+\((?:PlatformBlock|ABC)\)", re.M)
OTHER_CA = DATA / "trust-roots" / "azure-virtual-tpm-root-ca-2023.pem"

pytestmark = pytest.mark.swtpm


@dataclass(frozen=True)
class Snippet:
    """One fenced python block of a Markdown file."""

    source: Path
    line: int
    code: str

    @property
    def name(self) -> str:
        return f"{self.source.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        if SKELETON.search(self.code) or _undefined_names(self.code):
            return "compile"
        if "certify_training(" in self.code or "BLOCK_NAME" in self.code:
            return "imports"
        if re.search(r"^def test_", self.code, re.M):
            return "pytest"
        return "script"


def _undefined_names(code: str) -> set[str]:
    """Names a snippet reads but neither imports, assigns, defines nor gets as a parameter."""
    bound: set[str] = set(dir(builtins))
    loaded: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound


def _snippets() -> list[Snippet]:
    found = []
    for source in SOURCES:
        text = source.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Snippet(source, line, match.group(1)))
    return found


SNIPPETS = _snippets()


def _of_kind(kind: str) -> list[pytest.param]:
    return [pytest.param(s, id=s.name) for s in SNIPPETS if s.kind == kind]


def test_the_readme_has_the_snippets_the_issue_names() -> None:
    readme = [s for s in SNIPPETS if s.source.name == "README.md"]
    scripts = [s.code for s in readme if s.kind == "script"]
    assert any("allow_dev_platform=True" in code and "aicert.load" in code for code in scripts)
    assert any("verify_certificate(" in code and "@flow" in code for code in scripts)
    assert any(s.kind == "pytest" and "prefect_test_harness" in s.code for s in SNIPPETS)


@dataclass(frozen=True)
class UserFolder:
    """What a user has after a certified run, made on a software TPM."""

    folder: Path
    model_files: dict[str, bytes]


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserFolder]:
    from tests.verification.verify.factory import CertificateFactory, TpmRig

    workdir = tmp_path_factory.mktemp("snippet-certificate")
    rig = TpmRig.create(workdir / "tpm", workdir / "ek-ca", workdir / "platform-ca")
    try:
        made = CertificateFactory(rig).make_certificate()
        made.verify()  # the SDK accepts it: a failing snippet is the snippet's fault
        folder = workdir / "user"
        folder.mkdir()
        (folder / "proof.json").write_bytes(made.json_bytes())
        (folder / "platform-ca.pem").write_text(made.trust_root_pem)
        model = dict(made.params.outputs)
        for path, content in model.items():
            (folder / "outputs" / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / "outputs" / path).write_bytes(content)
        config = training_config("snippets", "https://example.invalid/snippets.git")
        (folder / "aicert.yaml").write_text(yaml.safe_dump(config))
        yield UserFolder(folder, model)
    finally:
        rig.close()


def _run_in_copy(
    user: UserFolder,
    target: Path,
    snippet: Snippet,
    command: list[str],
    prefect_api_url: str,
    change: Callable[[Path], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (``{file}`` is the snippet's file) in a copy of the user's folder,
    changed first by ``change``, with the session's Prefect server and a fresh AICERT_HOME."""
    folder = shutil.copytree(user.folder, target / "user")
    file_name = "test_snippet.py" if snippet.kind == "pytest" else "snippet.py"
    (folder / file_name).write_text(snippet.code)
    if change is not None:
        change(folder)
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api_url,
        "AICERT_HOME": str(target / "home"),
        "PYTHONPATH": "",  # the snippet sees the installed aicert, as a user does
    }
    return subprocess.run(
        [part.replace("{file}", file_name) for part in command],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("snippet", _of_kind("script"))
def test_script_snippets_run_as_written(
    snippet: Snippet, user_folder: UserFolder, prefect_api_url: str, tmp_path: Path
) -> None:
    script = [sys.executable, "{file}"]
    done = _run_in_copy(user_folder, tmp_path / "ok", snippet, script, prefect_api_url)
    assert done.returncode == 0, f"{snippet.name}:\n{snippet.code}\n{done.stdout}{done.stderr}"
    if '"proof.json"' not in snippet.code:
        return

    # The same snippet where the trust root or the model is not the certified one must fail.
    def doubt(folder: Path) -> None:
        if '"outputs"' in snippet.code:
            first = sorted(user_folder.model_files)[0]
            (folder / "outputs" / first).write_bytes(b"not the certified model")
        else:
            shutil.copy(OTHER_CA, folder / "platform-ca.pem")

    refused = _run_in_copy(
        user_folder, tmp_path / "doubt", snippet, script, prefect_api_url, change=doubt
    )
    assert refused.returncode != 0, f"{snippet.name} accepted what it should refuse"
    assert "Error" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("snippet", _of_kind("pytest"))
def test_pytest_snippets_pass(
    snippet: Snippet, user_folder: UserFolder, prefect_api_url: str, tmp_path: Path
) -> None:
    pytest_command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "{file}"]
    done = _run_in_copy(user_folder, tmp_path, snippet, pytest_command, prefect_api_url)
    tests = len(re.findall(r"^def test_", snippet.code, re.M))
    assert done.returncode == 0, f"{snippet.name}:\n{done.stdout}{done.stderr}"
    assert f"{tests} passed" in done.stdout, done.stdout


@pytest.mark.parametrize("snippet", _of_kind("imports"))
def test_snippets_that_certify_import_and_compile(snippet: Snippet) -> None:
    tree = ast.parse(snippet.code, filename=snippet.name)  # the whole snippet compiles
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    assert imports, f"{snippet.name}: nothing to import"
    namespace: dict[str, object] = {}
    exec(compile(ast.Module(body=imports, type_ignores=[]), snippet.name, "exec"), namespace)


@pytest.mark.parametrize("snippet", _of_kind("compile"))
def test_skeleton_snippets_compile(snippet: Snippet) -> None:
    compile(snippet.code, snippet.name, "exec")
