"""Certify a fine-tune from a pinned base-model resource on the local platform, then verify it.

The job is ``examples/digits/finetune.py`` (this repository's committed state, HEAD, is the
certified source, as for the default demo): it loads the digits network in
``base-model/model.npz`` (with its ``model-card.json``), two ``resources:`` pinned by SHA-256
below, and trains it further for a new domain. The agent hashes each resource before anything
runs and refuses one whose digest is not the pinned one; the certificate lists both digests.
The verification then requires those digests (``--expect``) and the certified accuracy on the
new domain (``--expect-metric``).

A ``file://`` URL must be absolute, so the config is written here, into WORK_DIR/aicert.yaml,
with this checkout's paths. Usage:
``python examples/finetune/run_finetune.py [WORK_DIR]`` (default: ./finetune-demo).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
AICERT = Path(sys.executable).parent / "aicert"
BASE_MODEL = HERE / "base-model"
# The base model's files and their pinned digests: what `make demo` wrote (outputs/), see
# README.md. A file with other bytes is refused before training.
PINNED = {
    "model.npz": "82e17c75004d7e016c3c102d9b9ab832cb044b6ef595af024844280f16ff867d",
    "model-card.json": "199beb7036f50f63ea25f68353b31032460859abe29b701640d97088a6c76f14",
}
THRESHOLD = "accuracy>=0.8"


def config(base_model: Path) -> dict[str, object]:
    """The run's config: the fine-tune job, the base model's files as pinned resources."""
    return {
        "kind": "python",
        "name": "digits-finetune",
        "source": {
            "type": "git",
            "gitRepo": str(REPO_ROOT),
            "subdirectory": "examples/digits",
        },
        "pythonEntryPoint": "finetune.py",
        "resources": [
            {
                "type": "file",
                "url": (base_model / name).as_uri(),
                "destinationPath": f"base/{name}",
                "sha256": digest,
            }
            for name, digest in PINNED.items()
        ],
        "env": {"EPOCHS": "50", "FINETUNE_EXAMPLES": "600"},
        "outputs": {"path": "/workspace/outputs", "minFiles": 3},
        "results": "metrics.json",
        "limits": {"cpus": 1, "memory": "1g", "timeoutSeconds": 600},
    }


def run(*args: object) -> None:
    """One ``aicert`` command, echoed; a non-zero exit raises CalledProcessError."""
    print("$ aicert " + " ".join(map(str, args)), flush=True)
    subprocess.run([str(AICERT), *map(str, args)], check=True)


def certify(work: Path, base_model: Path = BASE_MODEL) -> Path:
    """Write WORK_DIR/aicert.yaml and certify it; returns the certificate's path."""
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "aicert.yaml"
    # JSON is YAML: the config is written as JSON.
    config_path.write_text(json.dumps(config(base_model), indent=2) + "\n")
    proof = work / "proof.json"
    run("run", "--config", config_path, "--output-bom", proof, "--outputs-dir", work / "outputs")
    return proof


def main(work: Path | str) -> Path:
    """Certify the fine-tune into ``work`` (a new folder), then verify it; returns ``work``."""
    work = Path(work).resolve()
    if work.exists():
        sys.exit(f"{work} exists: give a new folder")
    proof = certify(work)
    home = Path(os.environ.get("AICERT_HOME", Path.home() / ".aicert"))
    expected = [("--expect", f"base/{name}={digest}") for name, digest in PINNED.items()]
    run(
        "verify", proof,
        "--trust-root", home / "platform-ca" / "platform-ca.cert.pem",
        "--allow-dev-platform",
        "--model", work / "outputs",
        *[arg for pair in expected for arg in pair],
        "--expect-metric", THRESHOLD,
    )  # fmt: skip
    return work


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "finetune-demo")
