"""The guest runtime: the agent that runs on the attested machine (TPM, measuring, containers)."""

from importlib.metadata import PackageNotFoundError, version

try:
    RUNTIME_VERSION = version("aicert")
except PackageNotFoundError:  # running from a source tree without installation
    RUNTIME_VERSION = "0.0.0+source"
