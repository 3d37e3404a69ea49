"""The caller's trust anchors (the local or qemu platform CA), loaded and checked.

A wrong root is the caller's mistake, not the certificate's fault: it is a ``TypeError`` or
``ValueError`` naming ``trusted_roots[i]``, never a ``VerificationError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509

from aicert.chain import load_pem_certificates
from aicert.errors import CertificateChainError

TrustRoot = x509.Certificate | str | bytes | os.PathLike[str]
"""A trust anchor as a caller may give it: a certificate, PEM text or bytes, or a file path."""
# A trust root file is one PEM certificate or a few; a bigger file is not one.
MAX_TRUST_ROOT_FILE_BYTES = 1024 * 1024


def load_trust_roots(trusted_roots: Iterable[TrustRoot]) -> list[x509.Certificate]:
    """The caller's trust anchors as certificates: each an ``x509.Certificate``, PEM text or
    bytes, or the path of a PEM file (each PEM may hold several certificates).

    A wrong root is the caller's mistake, not the certificate's fault: it raises ``TypeError``
    or ``ValueError`` naming ``trusted_roots[i]``, never a ``VerificationError``.

    Args:
        trusted_roots: the anchors (a list or other iterable, not one root on its own).

    Raises:
        TypeError: ``trusted_roots`` is a single str, bytes or path, or holds something that
            is none of the above (an int, None, a key).
        ValueError: a root is a file that cannot be read or a folder, or is not PEM
            certificate data (a random file, a PEM private key or CSR).
    """
    if isinstance(trusted_roots, str | bytes | bytearray | os.PathLike | x509.Certificate):
        raise TypeError(
            "trusted_roots must be a list of roots, not one "
            f"{type(trusted_roots).__name__} (pass [root])"
        )
    roots: list[x509.Certificate] = []
    for index, root in enumerate(trusted_roots):
        name = f"trusted_roots[{index}]"
        if isinstance(root, x509.Certificate):
            roots.append(root)
            continue
        if isinstance(root, bytes | bytearray) or (isinstance(root, str) and "-----BEGIN" in root):
            data, where = bytes(root) if not isinstance(root, str) else root, "PEM data"
        elif isinstance(root, str | os.PathLike):
            where = str(root)
            try:
                with Path(root).open("rb") as handle:
                    data = handle.read(MAX_TRUST_ROOT_FILE_BYTES + 1)
            except OSError as exc:
                raise ValueError(f"{name} {where}: cannot read: {exc.strerror or exc}") from None
            if len(data) > MAX_TRUST_ROOT_FILE_BYTES:
                raise ValueError(
                    f"{name} {where}: larger than {MAX_TRUST_ROOT_FILE_BYTES} bytes, "
                    "not a PEM certificate file"
                )
        else:
            raise TypeError(
                f"{name} must be an x509.Certificate, PEM str or bytes, or a path, "
                f"not {type(root).__name__}"
            )
        try:
            roots.extend(load_pem_certificates(data))
        except CertificateChainError as exc:
            raise ValueError(f"{name} {where}: {exc}") from None
    return roots
