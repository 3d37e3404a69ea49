"""A clone runs its own tests: no test module names a path outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

from tests.data import DATA, EVENTLOGS, TRUST_ROOTS

TESTS = Path(__file__).resolve().parent
# The ways tests used to reach the folder beside the checkout, which a user's or contributor's
# clone does not have: a relative path up to it, a pathlib join of ".." and its name, or its
# absolute path. Built from parts so that this file does not itself name that path.
FOLDER = "sha" + "red"
OUTSIDE = re.compile(rf"""\.\./{FOLDER}|["']\.\.["']\s*/\s*["']{FOLDER}["']|/work/{FOLDER}""")


def test_no_test_reads_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(TESTS)}:{number}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        if path.name != Path(__file__).name
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert offenders == []


def test_the_copied_data_is_there_with_its_provenance() -> None:
    readme = (DATA / "README.md").read_text()
    for path in [*EVENTLOGS.iterdir(), *TRUST_ROOTS.iterdir()]:
        assert f"`{path.name}`" in readme, f"{path.name} has no provenance line in README.md"
    assert len(list(EVENTLOGS.glob("*.bin"))) == 8
    assert len(list(TRUST_ROOTS.glob("*.pem"))) == 8
