"""The errors of the ``azure`` platform: one base class, one subclass per way a run fails."""

from __future__ import annotations


class AzureProviderError(RuntimeError):
    """Base class of the azure provider's errors."""


class AzureOperationError(AzureProviderError):
    """An ARM operation on a named resource failed (after the retries it is allowed)."""

    def __init__(self, what: str, code: str, message: str, attempts: int) -> None:
        """Args:
        what: the operation and the resource it acts on (``create virtual machine x``).
        code: ARM's error code.
        message: ARM's error message.
        attempts: how many times the operation was started.
        """
        self.what = what
        self.code = code
        self.attempts = attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{what} failed{tries}: {code}: {message}")


class AzureProvisioningError(AzureProviderError):
    """The machine could not be made ready (its resources were deleted before raising)."""


class AzureReferenceValuesError(AzureProviderError):
    """The configured reference-value set cannot be read, or is not the image's."""


class AzureEnrollmentError(AzureProviderError):
    """The VM's attestation key or its certificate chain is not acceptable."""


class AzureTeardownError(AzureProviderError):
    """Some resources of the run could not be deleted; the message lists them."""
