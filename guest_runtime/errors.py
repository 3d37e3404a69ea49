"""The agent's step failures, one class per kind the orchestrator tells apart.

The HTTP API answers with the class name (``kind``) and a status from ``server._STATUS``: the
orchestrator retries a platform failure and reports a training or input failure to the builder.
"""

from __future__ import annotations

from aicert.guest_runtime import gitsource


class AgentError(RuntimeError):
    """A certification step failed; the message says which and why."""


class StepOrderError(AgentError):
    """A step was asked for out of order (e.g. a quote before the outputs were measured)."""


class InputMismatchError(AgentError):
    """A pinned input digest does not match what was fetched: the run stops before training."""


class SourceError(AgentError, gitsource.SourceError):
    """The git source cannot be fetched or the requested ref does not exist."""


class DownloadError(AgentError):
    """A resource could not be downloaded after retries."""


class TrainingFailedError(AgentError):
    """The training job exited non-zero or timed out: no certificate for this run."""


class DependencyError(AgentError):
    """requirements.txt could not be resolved to wheels (with the machine's pip config)."""


class UnsafeOutputError(AgentError):
    """The outputs folder holds something that cannot be measured safely (a symlink out of it,
    a special file): no certificate for this run."""


class MissingOutputsError(AgentError):
    """The run left fewer output files than its ``outputs.minFiles``: no certificate."""


class TooManyOutputsError(AgentError):
    """The run left more output files than a certificate may list (``MAX_OUTPUT_FILES``)."""


class EventLimitError(AgentError):
    """The run would measure more events than a certificate may hold (``MAX_EVENTS``)."""


class ResultsFileError(AgentError):
    """The config's ``results`` file is missing from the outputs, or is not a JSON object of
    metric name -> number (``aicert.metrics.parse_metrics``); no certificate is produced."""
