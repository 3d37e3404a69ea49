"""The errors of the ``gcp`` provider: one base class, one subclass per way a run fails."""

from __future__ import annotations


class GcpProviderError(RuntimeError):
    """Base class of the gcp provider's errors."""


class GcpProvisioningError(GcpProviderError):
    """The machine could not be made ready (its resources were deleted before raising)."""


class GcpReferenceValuesError(GcpProviderError):
    """The configured reference-value set cannot be read, or is not the image's."""


class GcpEnrollmentError(GcpProviderError):
    """The VM's attestation key or its certificate chain is not acceptable."""


class GcpTeardownError(GcpProviderError):
    """Some resources of the run could not be deleted; the message lists them."""
