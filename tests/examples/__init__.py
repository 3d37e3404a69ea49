"""Tests of the bundled examples, each run as its README says."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load_driver(path: Path) -> ModuleType:
    """An example's driver script (``run_*.py``) imported as a module, from its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
