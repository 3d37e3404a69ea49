"""The OpenSSF model signing format (``model_signing`` 1.x), built from measured files.

``model_signing verify certificate MODEL --signature model.sig --certificate_chain ROOT``
(the sigstore model-transparency tool) reads a Sigstore bundle (media type
``application/vnd.dev.sigstore.bundle.v0.3+json``) holding:

- a DSSE envelope whose payload is an in-toto Statement v1 with the predicate
  ``https://model_signing/signature/v1.0``: one ``resources`` entry per file (its relative
  POSIX path, ``sha256`` and the hex digest), sorted by path component by component, the
  ``serialization`` used (``files``, ``sha256``, no symlinks, the paths ignored), and one
  subject named after the model whose ``sha256`` is the SHA-256 of the concatenated raw
  file digests in resource order;
- an ECDSA signature over the DSSE pre-authentication encoding (PAE) of that payload, with
  SHA-256 for a P-256 key (SHA-384 for P-384, SHA-512 for P-521); the tool verifies no other
  key type against a certificate;
- the signer's X.509 chain, leaf first, as verification material. The tool builds the chain
  up to a root given on its command line (OpenSSL, evaluated at the leaf's notBefore, so an
  expired leaf still verifies) and wants keyUsage digitalSignature (or extendedKeyUsage
  codeSigning) in the leaf.

Verification re-hashes the folder and wants exactly the signed files: a changed, missing or
added file fails. It ignores the signature file, ``.git``, ``.gitattributes``, ``.github``
and ``.gitignore`` (and whatever the signed ``ignore_paths`` name), so those are left out of
the statement here too; a measured file where the signature will be written is refused, as
the signature would overwrite it.

This module builds that statement from measured records (path, size, SHA-256) rather than by
reading files, so that the guest signs exactly what it measured, and builds the bundle around
a signature made elsewhere (by the TPM). It reproduces ``model_signing``'s own statement field
for field. Only orders differ, which no verifier reads: the tool lists ``ignore_paths`` in a
``frozenset``'s iteration order and writes the predicate's keys from protobuf maps, both of
which change from one process to the next; here ``ignore_paths`` are sorted and the keys
keep one order.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aicert.hashing import FileDigest, _check_digest_entry

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
DSSE_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
DEFAULT_SIGNATURE_NAME = "model.sig"
# Paths model_signing ignores by default (``--ignore-git-paths``) when it hashes a folder.
GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")
# The curves model_signing accepts for a signing certificate's key.
SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")


class ModelSigningFormatError(ValueError):
    """The records or certificates cannot make a bundle that ``model_signing`` accepts."""


@dataclass(frozen=True)
class ModelStatement:
    """An in-toto statement in ``model_signing``'s format, and what it left out.

    Attributes:
        statement: The statement, as JSON-ready data.
        payload: Its UTF-8 JSON, the DSSE payload (the bytes that are signed, through PAE).
        ignored: Measured paths left out because ``model_signing`` ignores them (git files).
    """

    statement: dict[str, object]
    payload: bytes
    ignored: tuple[str, ...]

    @property
    def pae(self) -> bytes:
        """The DSSE pre-authentication encoding of the payload: the bytes to sign."""
        return dsse_pae(self.payload)


def model_statement(
    model_name: str,
    files: Sequence[FileDigest],
    signature_name: str = DEFAULT_SIGNATURE_NAME,
) -> ModelStatement:
    """The statement ``model_signing`` signs for a folder holding exactly ``files``.

    Args:
        model_name: The subject's name (the tool uses the folder's name; informative only,
            verification does not compare it).
        files: The measured files: relative POSIX paths, sizes, lowercase SHA-256 hex.
        signature_name: Where the signature will be written, relative to the folder.

    Returns:
        The statement, its JSON payload, and the git paths left out.

    Raises:
        ModelSigningFormatError: A malformed or duplicate record, or a file at the
            signature's path.
    """
    ignore_paths = sorted({signature_name, *GIT_PATHS})
    signed, ignored = _signed_files(files, signature_name)
    resources = [
        {"name": file.path, "algorithm": "sha256", "digest": file.sha256} for file in signed
    ]
    root = hashlib.sha256(b"".join(bytes.fromhex(file.sha256) for file in signed))
    statement: dict[str, object] = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root.hexdigest()}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "resources": resources,
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": ignore_paths,
            },
        },
    }
    # Compact and unescaped: json.dumps takes its C encoder only without indentation, and a
    # statement lists up to MAX_OUTPUT_FILES files, which the verifier rebuilds to compare.
    payload = json.dumps(statement, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return ModelStatement(statement=statement, payload=payload, ignored=ignored)


def _signed_files(
    files: Sequence[FileDigest], signature_name: str
) -> tuple[list[FileDigest], tuple[str, ...]]:
    """The files the statement lists, in the tool's order, and the git paths left out."""
    signature_parts = _path_parts(signature_name)
    signed: list[FileDigest] = []
    ignored: list[str] = []
    seen: set[str] = set()
    for file in files:
        try:
            _check_digest_entry(file)
        except ValueError as exc:
            raise ModelSigningFormatError(str(exc)) from None
        if file.path in seen:
            raise ModelSigningFormatError(f"duplicate path: {file.path}")
        seen.add(file.path)
        parts = _path_parts(file.path)
        if parts[: len(signature_parts)] == signature_parts:
            raise ModelSigningFormatError(
                f"{file.path} is where the signature {signature_name} will be written"
            )
        if parts[0] in GIT_PATHS:
            ignored.append(file.path)
        else:
            signed.append(file)
    # The tool sorts pathlib paths, which compare component by component ("a/b" < "a-c",
    # although "a-c" < "a/b" as strings).
    signed.sort(key=lambda file: _path_parts(file.path))
    return signed, tuple(sorted(ignored))


def _path_parts(path: str) -> tuple[str, ...]:
    parts = tuple(path.split("/"))
    if not path or any(part in ("", ".", "..") for part in parts):
        raise ModelSigningFormatError(f"not a relative POSIX path: {path!r}")
    return parts


def dsse_pae(payload: bytes, payload_type: str = DSSE_PAYLOAD_TYPE) -> bytes:
    """DSSE v1 pre-authentication encoding: what a DSSE signature signs.

    ``"DSSEv1" SP len(type) SP type SP len(payload) SP payload``, lengths in ASCII decimal
    (https://github.com/secure-systems-lab/dsse/blob/v1.0.0/protocol.md).

    Args:
        payload: The envelope's payload bytes.
        payload_type: The envelope's payload type.

    Returns:
        The bytes to sign.
    """
    encoded_type = payload_type.encode("utf-8")
    header = b"DSSEv1 %d %s %d " % (len(encoded_type), encoded_type, len(payload))
    return header + payload


def model_signing_bundle(
    payload: bytes, signature: bytes, certificate_chain: Sequence[x509.Certificate]
) -> bytes:
    """The Sigstore bundle ``model_signing verify certificate`` reads (``model.sig``).

    Args:
        payload: The DSSE payload (``ModelStatement.payload``).
        signature: The DER ECDSA signature over ``dsse_pae(payload)``.
        certificate_chain: The signer's certificate first, then its issuers (the root may be
            included; the verifier is given it separately anyway).

    Returns:
        The bundle's JSON, UTF-8.

    Raises:
        ModelSigningFormatError: No certificate, or a leaf whose key the tool cannot verify
            with (it verifies ECDSA on P-256, P-384 or P-521 only: an RSA AK cannot sign a
            bundle the tool accepts).
    """
    if not certificate_chain:
        raise ModelSigningFormatError("the certificate chain is empty")
    leaf_key = certificate_chain[0].public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey):
        raise ModelSigningFormatError(
            f"model_signing verifies only ECDSA signatures; the leaf has a "
            f"{type(leaf_key).__name__}"
        )
    if leaf_key.curve.name not in SUPPORTED_CURVES:
        raise ModelSigningFormatError(f"model_signing does not accept curve {leaf_key.curve.name}")
    certificates = [
        {"rawBytes": _b64(certificate.public_bytes(serialization.Encoding.DER))}
        for certificate in certificate_chain
    ]
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "x509CertificateChain": {"certificates": certificates},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": _b64(payload),
            "payloadType": DSSE_PAYLOAD_TYPE,
            "signatures": [{"sig": _b64(signature), "keyid": ""}],
        },
    }
    return json.dumps(bundle, separators=(",", ":")).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


__all__ = [
    "BUNDLE_MEDIA_TYPE",
    "DEFAULT_SIGNATURE_NAME",
    "DSSE_PAYLOAD_TYPE",
    "GIT_PATHS",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "ModelSigningFormatError",
    "ModelStatement",
    "dsse_pae",
    "model_signing_bundle",
    "model_statement",
]
