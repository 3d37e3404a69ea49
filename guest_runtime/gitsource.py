"""Cloning the configured git source: the agent does it on machines with a network, the
orchestrator does it to stage the source for a VM without one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from aicert.guest_runtime.config import GitSource


class SourceError(RuntimeError):
    """The source cannot be fetched, or is not what the configuration pins."""


def _git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false"}
    completed = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        raise SourceError(f"source: git {args[0]} failed: {' '.join(detail)}")
    return completed.stdout


def clone_source(source: GitSource, checkout: Path) -> str:
    """Clone ``source`` into ``checkout`` at its branch, tag or commit (the ``.git`` folder
    stays: the caller removes it); return the resolved commit SHA-1."""
    clone = ["clone", "--quiet", "--no-hardlinks"]
    if source.branch or source.tag:
        clone += ["--branch", source.branch or source.tag or ""]
    _git(*clone, "--", source.git_repo, str(checkout))
    if source.commit:
        _git("-c", "advice.detachedHead=false", "checkout", "--quiet", source.commit, cwd=checkout)
    commit = _git("rev-parse", "--verify", "HEAD^{commit}", cwd=checkout).strip()
    if source.commit and not commit.startswith(source.commit):
        raise SourceError(f"source.commit: {source.commit} resolved to {commit}")
    return commit


def commit_object(checkout: Path) -> bytes:
    """The raw commit object of HEAD (what its SHA-1 is computed over, minus the header)."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    completed = subprocess.run(
        ["git", "cat-file", "commit", "HEAD"], cwd=checkout, env=env, capture_output=True
    )
    if completed.returncode != 0:
        raise SourceError(f"source: git cat-file failed: {completed.stderr.decode()[-300:]}")
    return completed.stdout
