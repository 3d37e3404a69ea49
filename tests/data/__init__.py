"""The tests' own data: real event logs and public vTPM CA certificates (see README.md)."""

from pathlib import Path

DATA = Path(__file__).resolve().parent
EVENTLOGS = DATA / "eventlogs"
TRUST_ROOTS = DATA / "trust-roots"
