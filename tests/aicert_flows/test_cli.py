"""The builder's CLI (``aicert run``): a bad configuration is refused before provisioning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A valid configuration but for one misspelled key (``tga``, line 6).
MISSPELLED = """\
kind: python
pythonVersion: 11
source:
  type: git
  gitRepo: https://example.invalid/project.git
  tga: v1.0
pythonEntryPoint: src/main.py
outputs: /workspace/outputs
"""


def test_cli_refuses_a_bad_config_before_provisioning(tmp_path: Path) -> None:
    aicert_cli = Path(sys.executable).parent / "aicert"
    assert aicert_cli.is_file(), f"the aicert console script is not installed at {aicert_cli}"
    home = tmp_path / "aicert-home"
    config = tmp_path / "bad.yaml"
    config.write_text(MISSPELLED)
    completed = subprocess.run(
        [str(aicert_cli), "run", "--config", str(config), "--output-bom", str(tmp_path / "p.json")],
        env={**os.environ, "AICERT_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "source.tga (line 6): unknown field" in completed.stderr
    # Nothing was provisioned: no run folder (so no swtpm, no agent) and no certificate.
    assert not (home / "runs").exists()
    assert not (tmp_path / "p.json").exists()
