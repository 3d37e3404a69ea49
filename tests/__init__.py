"""AICert's tests, laid out like the code: ``tests/<folder>/...`` tests ``<folder>/...``.

``verification/`` (the ``aicert`` verifier), ``guest_runtime/``, ``tasks/`` (with
``tasks/platforms/<platform>/``), ``aicert_flows/`` and ``deployments/`` each have their
folder here; ``data/`` holds the real event logs, trust roots and certificates the tests read,
``benchmarks/`` the speed measurements. Tests at this level check the repository as a whole.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout's root; tests reach repository files through it, never through ``..``."""
