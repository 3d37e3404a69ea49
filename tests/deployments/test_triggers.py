"""Event-driven deployments on the real stack (SQLite backend): ``aicert.source.updated`` starts
``certify-training`` through the worker, ``aicert.certificate.created`` starts
``verify-and-promote``, which publishes the verified model or rejects a forged certificate,
and, for a training run only (its ``aicert.run.kind`` label), ``certify-evaluation``.
The PostgreSQL backend runs the same scenario in test_postgres.py."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.events import Event
from prefect.events.clients import PrefectEventsClient
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

import aicert
from aicert.errors import ArtifactMismatchError, PlatformError
from aicert.flows.blocks import AicertRunConfig
from aicert.flows.deploy import build_deployments
from aicert.flows.events import CERTIFICATE_CREATED, CERTIFICATE_FAILED, RUN_KIND_LABEL
from aicert.flows.flows import artifact_key
from aicert.flows.promote import (
    CertificateDigestError,
    RunMismatchError,
    promotion_artifact_key,
    verify_and_promote,
)
from aicert.model import PLATFORM_KINDS
from tests.aicert_flows.conftest import unique_project

from .conftest import (
    Promotion,
    Stack,
    check_promoted,
    check_tampered_certificate_rejected,
    deployment_runs,
    make_project,
    registry_snapshot,
    task_run_names,
    wait_for_event,
    wait_for_run,
    wait_until_final,
)


def test_source_event_runs_certify_training_through_the_worker(promotion: Promotion) -> None:
    run = promotion.certify_run
    assert run.state is not None and run.state.is_completed(), run.state
    # The trigger templated the event's payload into the parameters.
    assert run.parameters == {
        "config_path": str(promotion.config_path),
        "config_block": None,
        "source_commit": promotion.commit,
    }
    assert run.created_by is not None and run.created_by.type == "AUTOMATION"
    assert run.work_pool_name == "aicert"
    with promotion.stack.client() as client:
        assert client.read_deployment(run.deployment_id).name == "certify-training"
        names = task_run_names(client, run.id)
    for step in ("measure-inputs", "run-training", "measure-outputs"):
        assert step in names, names


def test_certificate_binds_the_pushed_commit(promotion: Promotion) -> None:
    payload = promotion.created_event.payload
    report = aicert.load(payload["certificate_path"]).verify(
        trusted_roots=[promotion.stack.platform_ca],
        allow_dev_platform=True,
        model=payload["outputs_path"],
    )
    sources = [i for i in report.inputs if i.kind == "source"]
    assert len(sources) == 1 and sources[0].digest["sha1"] == promotion.commit
    assert payload["outputs_path"] == str(
        promotion.stack.home / "runs" / promotion.run_id / "work" / promotion.run_id / "outputs"
    )


def test_artifacts_are_readable_through_the_api(promotion: Promotion) -> None:
    with promotion.stack.client() as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[promotion.certify_run.id])
            )
        )
    by_key = {a.key: a for a in artifacts}
    keys = {
        artifact_key(promotion.project, kind) for kind in ("certificate", "bom", "certificate-file")
    }
    assert keys <= set(by_key), sorted(k for k in by_key if k)
    assert promotion.run_id in str(by_key[artifact_key(promotion.project, "certificate")].data)
    link = str(by_key[artifact_key(promotion.project, "certificate-file")].data)
    match = re.fullmatch(r"\[(?P<text>[^\]]*)\]\((?P<url>[^)]+)\)", link)
    assert match is not None, link
    stored = Path(url2pathname(urlsplit(match["url"]).path))
    assert (
        stored.read_bytes()
        == Path(promotion.created_event.payload["certificate_path"]).read_bytes()
    )


def test_certificate_created_starts_verify_and_promote(promotion: Promotion) -> None:
    run = promotion.promote_run
    payload = promotion.created_event.payload
    assert run.created_by is not None and run.created_by.type == "AUTOMATION"
    for name in ("certificate_path", "storage_url", "certificate_sha256", "run_id", "outputs_path"):
        assert run.parameters[name] == payload[name], name
    assert run.parameters["allow_dev_platform"] is True  # the deployment's own parameter
    assert run.parameters["certifying_flow_run_id"] == str(promotion.certify_run.id)
    with promotion.stack.client() as client:
        names = task_run_names(client, run.id)
    assert [n for n in names if n.startswith("verify-certificate")], names
    check_promoted(promotion)


def test_runs_are_named_and_the_promotion_links_its_certifying_run(promotion: Promotion) -> None:
    stamp = promotion.run_id.removeprefix(f"{promotion.project}-").rsplit("-", 1)[0]
    assert promotion.certify_run.name == f"{promotion.project} · {stamp}"
    assert promotion.promote_run.name == f"promote {promotion.project} · {stamp}"
    with promotion.stack.client() as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[promotion.promote_run.id])
            )
        )
    (promoted,) = [a for a in artifacts if a.key == promotion_artifact_key(promotion.project)]
    assert promoted.task_run_id is None  # the flow run's, as the artifacts page shows it
    assert f"/runs/flow-run/{promotion.certify_run.id})" in str(promoted.data), promoted.data


def test_every_aicert_event_of_the_scenario_is_on_the_run_resource(promotion: Promotion) -> None:
    """One resource-id scheme: the run's events (created, promoted) are all about
    ``aicert.run.<run id>``, the project a related resource."""
    with promotion.stack.client() as client:
        events = client.read_events(
            EventFilter(
                event=EventNameFilter(prefix=["aicert."]),
                related=EventRelatedFilter(
                    resources_in_roles=[(f"aicert.project.{promotion.project}", "project")]
                ),
            ),
            limit=50,
        ).events
    names = sorted(e.event for e in events)
    assert {"aicert.certificate.created", "aicert.model.promoted"} <= set(names), names
    assert {e.resource.id for e in events} == {f"aicert.run.{promotion.run_id}"}, names


def test_tampered_certificate_is_rejected(promotion: Promotion, tmp_path: Path) -> None:
    check_tampered_certificate_rejected(promotion, tmp_path)


def test_prefect_yaml_declares_the_python_deployments(sqlite_stack: Stack) -> None:
    """The SQLite stack applied deployments/prefect.yaml; the Python entry point's
    deployments must be the same (parameters, schedule, triggers, pool, entrypoint)."""
    with sqlite_stack.client() as client:
        for expected in build_deployments("aicert"):
            applied = client.read_deployment_by_name(expected.full_name)
            assert applied.entrypoint == expected.entrypoint
            assert applied.parameters == expected.parameters
            assert applied.work_pool_name == "aicert"
            assert applied.tags == expected.tags
            assert applied.global_concurrency_limit is not None, expected.full_name
            assert applied.global_concurrency_limit.limit == expected.concurrency_limit
            assert [
                (s.schedule.cron, s.schedule.timezone, s.active)  # type: ignore[union-attr]
                for s in applied.schedules
            ] == [
                (s.schedule.cron, s.schedule.timezone, s.active)  # type: ignore[union-attr]
                for s in expected.schedules
            ]
            automations = client.read_resource_related_automations(
                f"prefect.deployment.{applied.id}"
            )
            got = {
                a.name: (
                    a.description,
                    a.enabled,
                    a.trigger.expect,  # type: ignore[union-attr]
                    a.trigger.match.model_dump(),  # type: ignore[union-attr]
                    a.actions[0].parameters,  # type: ignore[union-attr]
                )
                for a in automations
            }
            want = {
                t.name: (
                    t.description,  # type: ignore[union-attr]
                    t.enabled,  # type: ignore[union-attr]
                    t.expect,  # type: ignore[union-attr]
                    t.match.model_dump(),  # type: ignore[union-attr]
                    t.parameters,  # type: ignore[union-attr]
                )
                for t in expected.triggers
            }
            assert got == want
            # The automations page says what fires each one.
            for automation in automations:
                assert automation.description.startswith("Fires on each aicert."), automation


def test_deployment_parameters_are_typed_and_described(sqlite_stack: Stack) -> None:
    """The UI's run form: every parameter described (from the Google-style docstring Args),
    ``provider`` a choice of the platform kinds, the blocks pickable or named."""
    with sqlite_stack.client() as client:
        for name in (
            "certify-training/certify-training",
            "verify-and-promote/verify-and-promote",
            "certify-evaluation/certify-evaluation",
        ):
            schema = client.read_deployment_by_name(name).parameter_openapi_schema
            properties = schema["properties"]
            undescribed = [p for p, spec in properties.items() if not spec.get("description")]
            assert undescribed == [], (name, undescribed)
        certify = client.read_deployment_by_name("certify-training/certify-training")
        properties = certify.parameter_openapi_schema["properties"]
        definitions = certify.parameter_openapi_schema["definitions"]
    assert tuple(properties["provider"]["enum"]) == PLATFORM_KINDS
    config_types = properties["config_block"]["anyOf"]
    assert {"$ref": "#/definitions/AicertRunConfig"} in config_types
    assert {"type": "string"} in config_types  # a saved block's name, as triggers pass it
    assert definitions["AicertRunConfig"]["block_type_slug"] == "aicert-run-config"
    platform_types = properties["platform_block"]["anyOf"]
    assert {"type": "string"} in platform_types
    slugs = {
        definitions[ref["$ref"].rsplit("/", 1)[1]]["block_type_slug"]
        for ref in platform_types
        if "$ref" in ref
    }
    assert slugs == {"aicert-local-platform", "aicert-qemu-platform"}


# -- refusals, in this process against the stack's server -------------------------------------


Promote = Callable[..., dict[str, object]]


@pytest.fixture
def promote_here(
    promotion: Promotion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Promote, Path]:
    """Call verify_and_promote in this process, on the stack's AICERT_HOME, into a fresh
    registry; the event's payload is the default argument set."""
    monkeypatch.setenv("AICERT_HOME", str(promotion.stack.home))
    registry = tmp_path / "registry"
    payload = dict(promotion.created_event.payload)
    arguments = {
        key: payload[key]
        for key in (
            "certificate_path",
            "storage_url",
            "certificate_sha256",
            "run_id",
            "project",
            "outputs_path",
        )
    }

    def promote(**overrides: object) -> dict[str, object]:
        with promotion.stack.client():  # PREFECT_API_URL -> the stack
            return verify_and_promote(
                **{**arguments, "registry": str(registry), "allow_dev_platform": True, **overrides}
            )

    return promote, registry


def _published(registry: Path) -> dict[str, str]:
    return {k: v for k, v in registry_snapshot(registry).items() if not k.startswith(".staging")}


def test_announced_digest_must_match(promote_here: tuple[Promote, Path]) -> None:
    promote, registry = promote_here
    with pytest.raises(CertificateDigestError):
        promote(certificate_sha256="0" * 64)
    assert registry_snapshot(registry) == {}


def test_event_naming_another_run_is_refused(promote_here: tuple[Promote, Path]) -> None:
    promote, registry = promote_here
    with pytest.raises(RunMismatchError):
        promote(run_id="someone-else-20260101T000000Z-00000000")
    assert registry_snapshot(registry) == {}


def test_local_certificate_needs_allow_dev_platform(promote_here: tuple[Promote, Path]) -> None:
    promote, registry = promote_here
    with pytest.raises(PlatformError):
        promote(allow_dev_platform=False)
    assert registry_snapshot(registry) == {}


def test_changed_model_file_is_refused(
    promote_here: tuple[Promote, Path], promotion: Promotion, tmp_path: Path
) -> None:
    promote, registry = promote_here
    outputs = tmp_path / "outputs"
    shutil.copytree(promotion.created_event.payload["outputs_path"], outputs)
    (outputs / "model.json").write_text('{"a": 0, "b": 0}')
    with pytest.raises(ArtifactMismatchError):
        promote(outputs_path=str(outputs))
    assert registry_snapshot(registry) == {}


def test_storage_url_alone_promotes_and_promoting_twice_is_idempotent(
    promote_here: tuple[Promote, Path], promotion: Promotion
) -> None:
    promote, registry = promote_here
    first = promote(certificate_path=None)
    assert first["registry_path"] == str(registry / promotion.project / promotion.run_id)
    published = _published(registry)
    assert set(published) == {
        f"{promotion.project}/{promotion.run_id}/{name}"
        for name in (
            "certificate.json",
            "verification.json",
            "model/model.json",
            "model/metrics/loss.txt",
        )
    }
    second = promote(certificate_path="/nonexistent/certificate.json")
    assert second == first
    assert _published(registry) == published


def test_config_block_parameter_takes_a_picked_block_or_a_saved_name(
    sqlite_stack: Stack, tmp_path: Path
) -> None:
    """``config_block`` is block-typed: the UI's block picker sends a ``$ref`` to the block
    document, an automation or a script sends the saved block's name; a deployment run
    certifies from either."""
    started = []
    with sqlite_stack.client() as client:  # blocks are saved on the stack's server too
        deployment = client.read_deployment_by_name("certify-training/certify-training")
        for how in ("ref", "name"):
            project, _, config = make_project(tmp_path, f"block-{how}")
            name = f"{project}-config"
            block_id = AicertRunConfig(
                config_yaml=config.read_text(), base_dir=str(config.parent)
            ).save(name)
            value: object = {"$ref": {"block_document_id": str(block_id)}} if how == "ref" else name
            run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"config_path": None, "config_block": value}
            )
            started.append((project, run.id))
        for project, run_id in started:
            final = wait_until_final(client, run_id)
            assert final.state is not None and final.state.is_completed(), final.state
            assert final.name.startswith(f"{project} · "), final.name
            created = wait_for_event(client, CERTIFICATE_CREATED, project=project)
            assert created.resource.id == f"aicert.run.{created.payload['run_id']}"


# -- certify-evaluation: training runs only --------------------------------------------------


def emit_certificate_created(stack: Stack, kind: str, payload: dict[str, object]) -> None:
    """``aicert.certificate.created`` as certify-training or certify-evaluation emits it: on
    the run's resource, labelled with the kind of run."""
    to_send = Event(
        event=CERTIFICATE_CREATED,
        resource={
            "prefect.resource.id": f"aicert.run.{payload['run_id']}",
            RUN_KIND_LABEL: kind,
        },
        payload={**payload, "kind": kind},
    )

    async def send() -> None:
        async with PrefectEventsClient(api_url=stack.api_url) as events:
            await events.emit(to_send)

    asyncio.run(send())


def announced(project: str, tmp_path: Path) -> dict[str, object]:
    """A certificate.created payload (the trigger's inputs; no such certificate exists)."""
    run_id = f"{project}-20260101T000000Z-0a0b0c0d"
    return {
        "run_id": run_id,
        "project": project,
        "certificate_sha256": "1" * 64,
        "certificate_path": str(tmp_path / run_id / "certificate.json"),
        "storage_url": (tmp_path / "storage" / run_id).as_uri(),
        "outputs_path": str(tmp_path / run_id / "outputs"),
        "flow_run_id": "00000000-0000-0000-0000-000000000000",
        "platform": "local",
    }


def test_a_training_certificate_starts_certify_evaluation_an_evaluations_does_not(
    sqlite_stack: Stack, tmp_path: Path
) -> None:
    """The trigger, on the server: created disabled (no evaluation configured); enabled, a
    training run's certificate.created starts certify-evaluation with the event's fields as
    parameters, an evaluation's does not. The run itself fails on the worker (this
    deployment has no evaluation configuration) and says so, labelled evaluation; the flow
    body is tested on real runs in tests/aicert_flows/test_evaluation_flow.py."""
    training = announced(unique_project("evaluated"), tmp_path)
    evaluation = announced(unique_project("evaluation"), tmp_path)
    with sqlite_stack.client() as client:
        deployment = client.read_deployment_by_name("certify-evaluation/certify-evaluation")
        (automation,) = client.read_resource_related_automations(
            f"prefect.deployment.{deployment.id}"
        )
        assert automation.enabled is False
        client.resume_automation(automation.id)
        try:
            # The evaluation's first: once the training's run exists, both were processed.
            emit_certificate_created(sqlite_stack, "evaluation", evaluation)
            emit_certificate_created(sqlite_stack, "training", training)
            run = wait_for_run(
                client,
                "certify-evaluation",
                lambda p: p.get("run_id") == training["run_id"],
                what="the certify-evaluation run of the training certificate",
            )
        finally:
            client.pause_automation(automation.id)
        assert run.created_by is not None and run.created_by.type == "AUTOMATION"
        assert run.parameters == {
            "certificate_path": training["certificate_path"],
            "storage_url": training["storage_url"],
            "certificate_sha256": training["certificate_sha256"],
            "run_id": training["run_id"],
            "project": training["project"],
            "outputs_path": training["outputs_path"],
            "certifying_flow_run_id": training["flow_run_id"],
        }
        of_evaluation = deployment_runs(
            client, "certify-evaluation", lambda p: p.get("run_id") == evaluation["run_id"]
        )
        assert of_evaluation == []
        final = wait_until_final(client, run.id)
        assert final.state is not None and final.state.is_failed(), final.state
        assert "exactly one of config_path and config_block" in str(final.state.message)
        failed = wait_for_event(client, CERTIFICATE_FAILED, flow_run_id=str(run.id))
    assert failed.resource.get(RUN_KIND_LABEL) == "evaluation"
    assert failed.payload["kind"] == "evaluation"
