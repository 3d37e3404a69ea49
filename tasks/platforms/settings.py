"""Where AICert keeps its state on the orchestrating host."""

from __future__ import annotations

import os
from pathlib import Path


def aicert_home() -> Path:
    """``$AICERT_HOME`` or ``~/.aicert``: CAs, per-run TPM state, workspaces and logs."""
    configured = os.environ.get("AICERT_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".aicert"
