"""The Docker work pool recipe (deployments/docker-pool/prefect.yaml) is valid for Prefect.

Not a ``prefect deploy --help``-level check: the file is read by Prefect's own prefect.yaml
model, each step resolves to Prefect's step function with arguments its signature accepts, the
job variables validate against prefect-docker's base job template, the entrypoints load as
AICert's flows and accept the parameters, the ``pull`` steps run for real (Prefect's
``run_steps``, variables read from a real server: the project is cloned and becomes the working
directory), and ``prefect deploy`` creates both deployments on a real server with a Docker work
pool, which checks the job variables against the pool.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.steps.core import run_steps
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.importtools import import_object
from prefect.variables import Variable
from prefect_docker.worker import DockerWorker

from tests.aicert_flows.conftest import make_git_repo

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "deployments" / "docker-pool" / "prefect.yaml"
RESERVED_STEP_KEYS = {"id", "requires"}  # Prefect's own keys, not the step's arguments


@pytest.fixture(scope="module")
def recipe() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(RECIPE.read_text())
    return data


def test_prefect_reads_the_file(recipe: dict[str, Any]) -> None:
    model = PrefectYamlModel.model_validate(recipe)
    assert [d.name for d in model.deployments] == [
        "certify-training-docker",
        "verify-and-promote-docker",
    ]
    assert model.pull is not None and len(model.pull) == 2
    for deployment in model.deployments:
        assert deployment.work_pool is not None and deployment.work_pool.name == "aicert-docker"


def test_every_step_is_a_prefect_step_its_arguments_fit(recipe: dict[str, Any]) -> None:
    names = []
    for step in recipe["pull"]:
        ((qualified_name, inputs),) = step.items()
        function = import_object(qualified_name)
        arguments = {k: v for k, v in inputs.items() if k not in RESERVED_STEP_KEYS}
        inspect.signature(function).bind(**arguments)  # TypeError on a wrong argument
        names.append(qualified_name.rsplit(".", 1)[1])
    assert names == ["git_clone", "set_working_directory"]


def test_the_job_variables_fit_the_docker_work_pool(recipe: dict[str, Any]) -> None:
    template = DockerWorker.get_default_base_job_template()["variables"]
    for deployment in recipe["deployments"]:
        variables = deployment["work_pool"]["job_variables"]
        unknown = set(variables) - set(template["properties"])
        assert unknown == set(), f"prefect-docker has no job variable {unknown}"
        jsonschema.validate(variables, template)
        # The same AICERT_HOME inside and on the host: the host engine resolves the training
        # container's bind mounts on the host.
        home = variables["env"]["AICERT_HOME"]
        assert f"{home}:{home}" in variables["volumes"]
        assert "/var/run/docker.sock:/var/run/docker.sock" in variables["volumes"]


def test_the_entrypoints_are_the_flows_and_take_the_parameters(recipe: dict[str, Any]) -> None:
    for deployment in recipe["deployments"]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        flow.validate_parameters(deployment["parameters"])  # raises on an unknown or bad one
    assert {d["entrypoint"] for d in recipe["deployments"]} == {
        "aicert.flows.flows.certify_training",
        "aicert.flows.promote.verify_and_promote",
    }


def test_the_pull_steps_clone_the_project_and_run_from_it(
    recipe: dict[str, Any],
    prefect_api_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = make_git_repo(tmp_path / "origin" / "project", {"aicert.yaml": "kind: python\n"})
    Variable.set("aicert_project_repository", str(project), overwrite=True)
    container = tmp_path / "flow-run"
    container.mkdir()
    monkeypatch.chdir(container)  # restored after the test: set_working_directory chdirs

    outputs = asyncio.run(run_steps(recipe["pull"]))

    clone = Path(outputs["directory"]).resolve()
    assert clone.parent == container.resolve() and clone != project
    assert Path.cwd().resolve() == clone
    assert (clone / "aicert.yaml").read_text() == "kind: python\n"


def test_prefect_deploy_creates_the_deployments(prefect_api_url: str, tmp_path: Path) -> None:
    async def prepare() -> None:
        async with get_client() as client:
            await client.create_work_pool(
                WorkPoolCreate(
                    name="aicert-docker",
                    type="docker",
                    base_job_template=DockerWorker.get_default_base_job_template(),
                ),
                overwrite=True,
            )

    asyncio.run(prepare())
    Variable.set("aicert_project_repository", "https://example.invalid/p.git", overwrite=True)
    Variable.set("aicert_worker_image", "registry.example.invalid/aicert:1", overwrite=True)
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_HOME": str(tmp_path)}
    deploy = ["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(RECIPE)]
    done = subprocess.run(
        [sys.executable, "-m", *deploy],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    async def read() -> list[Any]:
        async with get_client() as client:
            return [
                await client.read_deployment_by_name(name)
                for name in (
                    "certify-training/certify-training-docker",
                    "verify-and-promote/verify-and-promote-docker",
                )
            ]

    for deployment in asyncio.run(read()):
        assert deployment.work_pool_name == "aicert-docker"
        assert [next(iter(step)) for step in deployment.pull_steps or []] == [
            "prefect.deployments.steps.git_clone",
            "prefect.deployments.steps.set_working_directory",
        ]
        assert deployment.job_variables["image"] == "registry.example.invalid/aicert:1"
