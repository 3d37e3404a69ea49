"""The ``certify-training`` flow end to end, on the local platform (real swtpm, real Docker),
against a temporary Prefect server: states, task runs, artifacts, event, the certificate,
streamed logs and teardown. One flow run (module fixture) serves all the checks."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pytest
from prefect.artifacts import Artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

import aicert
from aicert.flows.flows import (
    CERTIFICATE_CREATED,
    artifact_key,
    certify_training,
    run_display_name,
)
from aicert.tasks.platforms.local.provider import LocalProvider, platform_ca_certificate_path

from .conftest import (
    TRAIN_SCRIPT,
    events_named,
    flow_run_logs,
    flush_prefect_workers,
    git_head,
    make_git_repo,
    processes_mentioning,
    run_containers,
    run_ids_in,
    task_run_logs,
    task_runs_of,
    training_config,
    unique_project,
    wait_for,
    write_config,
)

EXPECTED_TASKS = (
    "load-config",
    "provision",
    "wait-for-agent",
    "establish-ak",
    "measure-inputs",
    "build-image",
    "run-training",
    "measure-outputs",
    "quote",
    "assemble-certificate",
    "verify-certificate",
    "store-certificate",
    "teardown",
)

# Steps of a local run that the checks above do not single out.
OTHER_TASKS = {"stage-inputs", "attest-machine", "start-run", "check-tpm"}


@dataclass
class CertifiedRun:
    project: str
    home: Path
    repo: Path
    bom: Path
    outputs_dir: Path
    state: State[Any]
    result: dict[str, Any]
    task_runs: list[TaskRun]


@pytest.fixture(scope="module")
def certified(tmp_path_factory: pytest.TempPathFactory, prefect_api_url: str, base_image: str):
    """Certify a small git repository once, with the config file beside it (relative path)."""
    root = tmp_path_factory.mktemp("certify")
    project = unique_project("flowtest")
    repo = make_git_repo(root / "project", {"train.py": TRAIN_SCRIPT, "README.md": "tiny\n"})
    config_path = write_config(root / "aicert.yaml", training_config(project, "project"))
    home = root / "aicert-home"
    bom = root / "out" / "proof.json"
    outputs_dir = root / "model"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("AICERT_HOME", str(home))
        state = certify_training(
            config_path=str(config_path),
            output_bom=str(bom),
            outputs_dir=str(outputs_dir),
            return_state=True,
        )
        result = state.result(raise_on_failure=False)
    flush_prefect_workers()
    with get_client(sync_client=True) as client:
        task_runs = task_runs_of(client, state.state_details.flow_run_id)
    return CertifiedRun(project, home, repo, bom, outputs_dir, state, result, task_runs)


def _task_run(run: CertifiedRun, name: str) -> TaskRun:
    matches = [t for t in run.task_runs if t.name == name]
    assert len(matches) == 1, f"{name}: {[t.name for t in run.task_runs]}"
    return matches[0]


def test_flow_and_every_task_completed(certified: CertifiedRun) -> None:
    assert certified.state.is_completed(), certified.state.message
    names = {t.name for t in certified.task_runs}
    for task_name in EXPECTED_TASKS:
        assert any(name == task_name or name.startswith(f"{task_name}-") for name in names), (
            f"no {task_name} task run in {sorted(names)}"
        )
    # One naming scheme: each task run is named after its step, nothing appended.
    assert names <= set(EXPECTED_TASKS) | OTHER_TASKS, sorted(names)
    for step in EXPECTED_TASKS:
        _task_run(certified, step)
    assert all(t.state is not None and t.state.is_completed() for t in certified.task_runs), [
        (t.name, t.state.type if t.state else None) for t in certified.task_runs
    ]


def test_result_names_the_run_and_the_certificate(certified: CertifiedRun) -> None:
    result = certified.result
    assert result["project"] == certified.project
    assert result["run_id"].startswith(f"{certified.project}-")
    assert result["run_id"] in run_ids_in(certified.home)
    assert result["certificate"]["path"] == str(certified.bom)
    assert result["certificate"]["sha256"] == hashlib.sha256(certified.bom.read_bytes()).hexdigest()


def test_output_bom_verifies_with_the_sdk(certified: CertifiedRun) -> None:
    root = platform_ca_certificate_path(certified.home)
    report = aicert.load(certified.bom).verify(trusted_roots=[root], allow_dev_platform=True)
    assert report.run_id == certified.result["run_id"]
    assert report.exit_code == 0
    assert sorted(o.path for o in report.outputs) == ["metrics/loss.txt", "model.json"]
    sources = [i for i in report.inputs if i.kind == "source"]
    assert len(sources) == 1
    # The relative gitRepo ("project") was resolved against the config file's folder.
    assert sources[0].uri == str(certified.repo.resolve())
    assert sources[0].digest["sha1"] == git_head(certified.repo)
    # The model copied out by outputs_dir is the certified one.
    assert aicert.load(certified.bom).verify_artifact(certified.outputs_dir / "model.json") == 1


def test_artifacts_under_stable_keys(certified: CertifiedRun) -> None:
    run_id = certified.result["run_id"]
    markdown = Artifact.get(artifact_key(certified.project, "certificate"))
    assert markdown is not None and markdown.type == "markdown"
    assert run_id in str(markdown.data)
    assert "model.json" in str(markdown.data) and "metrics/loss.txt" in str(markdown.data)

    table = Artifact.get(artifact_key(certified.project, "bom"))
    assert table is not None and table.type == "table"
    rows = table.data if isinstance(table.data, list) else json.loads(str(table.data))
    outputs = {row["name"]: row for row in rows if row["item"] == "output"}
    model = certified.outputs_dir / "model.json"
    assert set(outputs) == {"model.json", "metrics/loss.txt"}
    assert outputs["model.json"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert any(row["item"] == "input: source" for row in rows)

    # Prefect stores a link artifact as markdown: "[text](url)".
    link = Artifact.get(artifact_key(certified.project, "certificate-file"))
    assert link is not None
    match = re.fullmatch(r"\[(?P<text>[^\]]*)\]\((?P<url>[^)]+)\)", str(link.data))
    assert match is not None, link.data
    assert certified.result["certificate"]["sha256"][:12] in match["text"]
    target = urlsplit(match["url"])
    assert target.scheme == "file"
    stored = Path(url2pathname(target.path))
    assert stored.read_bytes() == certified.bom.read_bytes()


def test_certificate_created_event(certified: CertifiedRun) -> None:
    run_id = certified.result["run_id"]
    with get_client(sync_client=True) as client:
        events = wait_for(
            lambda: events_named(client, CERTIFICATE_CREATED, f"aicert.run.{run_id}"),
            timeout_s=30,
            what="the aicert.certificate.created event",
        )
    assert len(events) == 1
    payload = events[0].payload
    assert payload["certificate_sha256"] == hashlib.sha256(certified.bom.read_bytes()).hexdigest()
    assert payload["run_id"] == run_id
    assert payload["project"] == certified.project


def test_container_logs_stream_into_the_training_task(
    certified: CertifiedRun, client: SyncPrefectClient
) -> None:
    training = _task_run(certified, "run-training")
    messages = wait_for(
        lambda: [
            log.message
            for log in task_run_logs(client, training.id)
            if "training-marker: done" in log.message
        ],
        timeout_s=20,
        what="the container's last line in the run-training logs",
    )
    assert messages
    lines = [log.message for log in task_run_logs(client, training.id)]
    assert any("epoch 60" in line for line in lines), lines


def test_teardown_left_nothing(certified: CertifiedRun) -> None:
    run_id = certified.result["run_id"]
    assert processes_mentioning(str(certified.home)) == []
    assert run_containers(run_id) == []
    assert not any((certified.home / "active").glob("*.json"))
    # The run's workspace stays: outputs and the training log.
    workspace = Path(certified.result["workspace"])
    assert (workspace / "outputs" / "model.json").is_file()
    assert "training-marker: done" in (workspace / "logs" / "training.log").read_text()


def test_the_next_run_starts_on_the_spare_tpm_made_during_this_one(
    certified: CertifiedRun,
) -> None:
    spares = sorted(LocalProvider(certified.home).spares_dir.glob("ready-*"))
    assert len(spares) == 1, "the first run did not leave a spare TPM"
    bom = certified.bom.with_name("second-proof.json")
    config = certified.repo.parent / "aicert.yaml"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("AICERT_HOME", str(certified.home))
        state = certify_training(config_path=str(config), output_bom=str(bom), return_state=True)
    assert state.is_completed(), state.message
    assert not spares[0].exists(), "the second run did not use the spare"
    assert len(list(LocalProvider(certified.home).spares_dir.glob("ready-*"))) == 1
    report = aicert.load(bom).verify(
        trusted_roots=[platform_ca_certificate_path(certified.home)], allow_dev_platform=True
    )
    assert report.run_id != certified.result["run_id"]
    assert processes_mentioning(str(certified.home)) == []


def _flow_run_id(certified: CertifiedRun) -> Any:
    return certified.state.state_details.flow_run_id


def test_flow_run_is_named_after_the_project_and_the_run(
    certified: CertifiedRun, client: SyncPrefectClient
) -> None:
    run = client.read_flow_run(_flow_run_id(certified))
    run_id = certified.result["run_id"]
    assert run.name == run_display_name(certified.project, run_id)
    stamp = run_id.removeprefix(f"{certified.project}-").rsplit("-", 1)[0]
    assert run.name == f"{certified.project} · {stamp}"
    assert re.fullmatch(r"\d{8}T\d{6}Z", stamp), stamp


ARTIFACT_KINDS = ("certificate", "bom", "certificate-file", "cyclonedx", "slsa", "model-signing")


def test_artifacts_belong_to_the_flow_run(
    certified: CertifiedRun, client: SyncPrefectClient
) -> None:
    flow_run_id = _flow_run_id(certified)
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    )
    by_key = {artifact.key: artifact for artifact in artifacts}
    for kind in ARTIFACT_KINDS:
        artifact = by_key.get(artifact_key(certified.project, kind))
        assert artifact is not None, (kind, sorted(str(k) for k in by_key))
        # Made by the flow itself: the artifacts page shows the flow run, no task run.
        assert artifact.task_run_id is None, kind
    slsa = str(by_key[artifact_key(certified.project, "slsa")].data)
    envelope = json.loads(slsa.split("```json\n", 1)[1].rsplit("\n```", 1)[0])
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    cyclonedx = str(by_key[artifact_key(certified.project, "cyclonedx")].data)
    assert '"bomFormat": "CycloneDX"' in cyclonedx or '"bomFormat":"CycloneDX"' in cyclonedx
    model_signing = str(by_key[artifact_key(certified.project, "model-signing")].data)
    bundle = json.loads(model_signing.split("```json\n", 1)[1].rsplit("\n```", 1)[0])
    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"


def test_certificate_markdown_shows_full_hashes_the_model_check_and_the_dev_warning(
    certified: CertifiedRun,
) -> None:
    markdown = Artifact.get(artifact_key(certified.project, "certificate"))
    assert markdown is not None
    text = str(markdown.data)
    model_sha = hashlib.sha256((certified.outputs_dir / "model.json").read_bytes()).hexdigest()
    assert f"`{model_sha[:32]}` `{model_sha[32:]}`" in text  # whole, in two wrappable halves
    verified = text.split("## Verified", 1)[1]
    assert "- **model**: 2 file(s) at" in verified, verified
    assert "> ⚠️ **Development platform (local)" in text
    # The platform's note is said once, under Verified.
    report = certified.result["report"]
    assert text.count(report["platform_note"]) == 1
    # The source is named by its repository, not by the folder it was cloned to.
    assert f"- source **{certified.repo.resolve()} @ main**" in text


def test_run_graph_follows_the_steps(certified: CertifiedRun) -> None:
    by_name = {t.name: t for t in certified.task_runs}

    def upstream(name: str) -> set[str]:
        inputs = by_name[name].task_inputs
        ids = {str(i.id) for values in inputs.values() for i in values if hasattr(i, "id")}
        return {t.name for t in certified.task_runs if str(t.id) in ids}

    assert "attest-machine" in upstream("start-run")
    assert "start-run" in upstream("measure-inputs")
    assert "measure-inputs" in upstream("build-image")
    assert "build-image" in upstream("check-tpm")
    assert "check-tpm" in upstream("run-training")
    assert "run-training" in upstream("measure-outputs")
    assert "measure-outputs" in upstream("quote")
    assert "verify-certificate" in upstream("store-certificate")


def test_log_lines_are_readable(certified: CertifiedRun, client: SyncPrefectClient) -> None:
    flow_run_id = _flow_run_id(certified)
    logs = wait_for(
        lambda: (
            [
                log
                for log in flow_run_logs(client, flow_run_id)
                if "certified and verified" in log.message
            ]
            and flow_run_logs(client, flow_run_id)
        ),
        timeout_s=20,
        what="the flow's last log line",
    )
    flow_level = [log.message for log in logs if log.task_run_id is None]
    # The flow's own last line, before Prefect's "Finished in state Completed()".
    last = [line for line in flow_level if not line.startswith("Finished in state")][-1]
    assert "certified and verified" in last and "{" not in last, last
    pcr_lines = [log.message for log in logs if log.message.startswith("PCR ")]
    assert any(line.startswith("PCR 14 <- aicert.input.source") for line in pcr_lines), pcr_lines
    assert all("{" not in line and "': '" not in line for line in pcr_lines), pcr_lines
