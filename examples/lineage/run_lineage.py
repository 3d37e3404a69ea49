"""Certify pretrain -> fine-tune -> evaluate on the local platform, then verify the chain.

Each stage is an ordinary certified run (``aicert run``). The fine-tune takes the pretraining
run's model as a certified input (``certifiedBy``), the evaluation takes the fine-tuned model
the same way and declares ``results: metrics.json``, so its accuracy is certified. The last
step verifies the evaluation with both parents (``--parent``, ``--require-lineage``) and a
threshold (``--expect-metric``) and a verification policy (``--policy policy.json``: this
code, the held-out split, a model descending from this pretraining run, its accuracy): the
report shows the chain back to the pretraining data.

Usage: python examples/lineage/run_lineage.py [WORK_DIR]   (default: ./lineage-demo)
The stages' code and data are copied into WORK_DIR (a git repository of the code is made
there, the certified source), so the demo does not depend on this repository's commits.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
AICERT = Path(sys.executable).parent / "aicert"
STAGES = ("pretrain", "finetune", "evaluate")


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_source(work):
    """The stages' code as a committed git repository: the certified source."""
    repo = work / "project"
    shutil.copytree(HERE / "project", repo)
    git = ["git", "-c", "user.name=AICert demo", "-c", "user.email=demo@aicert.invalid"]
    subprocess.run([*git, "init", "--quiet", "--initial-branch=main"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "lineage stages"], cwd=repo, check=True)
    return repo


def data_resource(work, name):
    path = work / "data" / name
    return {"url": path.as_uri(), "destinationPath": f"data/{name}", "sha256": sha256(path)}


def certified_model(work, parent, destination):
    """The parent stage's certified model as a certified input of the next stage."""
    return {
        "url": (work / "outputs" / parent / "model.json").as_uri(),
        "destinationPath": destination,
        "certifiedBy": {"certificate": f"runs/{parent}.proof.json", "output": "model.json"},
    }


def configs(work, repo):
    common = {
        "kind": "python",
        "source": {"type": "git", "gitRepo": str(repo), "branch": "main"},
        "outputs": {"path": "/workspace/outputs", "minFiles": 1},
        "limits": {"cpus": 1, "memory": "512m", "timeoutSeconds": 300},
    }
    return {
        "pretrain": {
            **common,
            "name": "lineage-pretrain",
            "pythonEntryPoint": "pretrain.py",
            "resources": [data_resource(work, "pretrain.csv")],
        },
        "finetune": {
            **common,
            "name": "lineage-finetune",
            "pythonEntryPoint": "finetune.py",
            "resources": [
                certified_model(work, "pretrain", "base/model.json"),
                data_resource(work, "finetune.csv"),
            ],
        },
        "evaluate": {
            **common,
            "name": "lineage-evaluate",
            "pythonEntryPoint": "evaluate.py",
            "resources": [
                certified_model(work, "finetune", "model/model.json"),
                data_resource(work, "heldout.csv"),
            ],
            "results": "metrics.json",
        },
    }


def run(*args):
    print("$ aicert " + " ".join(map(str, args)), flush=True)
    subprocess.run([str(AICERT), *map(str, args)], check=True)


def main(work):
    work = Path(work).resolve()
    if work.exists():
        sys.exit(f"{work} exists: give a new folder")
    work.mkdir(parents=True)
    shutil.copytree(HERE / "data", work / "data")
    repo = make_source(work)
    for stage, config in configs(work, repo).items():
        # JSON is YAML: the config files are written as JSON.
        (work / f"{stage}.yaml").write_text(json.dumps(config, indent=2) + "\n")
    for stage in STAGES:
        run(
            "run",
            "--config", work / f"{stage}.yaml",
            "--output-bom", work / "runs" / f"{stage}.proof.json",
            "--outputs-dir", work / "outputs" / stage,
        )
    home = Path(os.environ.get("AICERT_HOME", Path.home() / ".aicert"))
    write_policy(work, repo)
    run(
        "verify", work / "runs" / "evaluate.proof.json",
        "--trust-root", home / "platform-ca" / "platform-ca.cert.pem",
        "--allow-dev-platform",
        "--parent", work / "runs" / "finetune.proof.json",
        "--parent", work / "runs" / "pretrain.proof.json",
        "--require-lineage",
        "--expect-metric", "accuracy>=0.8",
        "--policy", work / "policy.json",
    )
    return work


def write_policy(work, repo):
    """What a relying party accepts (aicert.policy): this code, the held-out split, a model
    descending from this pretraining run, and its accuracy."""
    pretrain = json.loads((work / "runs" / "pretrain.proof.json").read_text())
    policy = {
        "version": "aicert-policy/v1",
        "source_repositories": [str(repo)],
        "resources": {"data/heldout.csv": sha256(work / "data" / "heldout.csv")},
        "platforms": ["local"],
        "lineage_root": {"run_id": pretrain["run"]["id"]},
        "metrics": ["accuracy>=0.8"],
    }
    (work / "policy.json").write_text(json.dumps(policy, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lineage-demo")
