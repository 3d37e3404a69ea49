"""TPM access for the guest agent, over tpm2-pytss's ESAPI.

One ``Tpm`` per TCTI ("swtpm:host=...,port=..." or "device:/dev/tpmrm0"). A raw swtpm socket
has no resource manager, so every transient object and session this class creates is flushed
in a ``finally`` (sessions) or when the ``Tpm`` closes (the EK and the loaded AK, kept loaded
in between because re-creating an RSA EK per quote costs more than the quote).

The data it hands out and takes back (keys, quotes, templates, errors) is in ``tpm_types``,
re-exported here (``__all__``): callers import everything TPM from this module.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_GENERATED,
    TPM2_PT_NV,
    TPM2_SE,
    TPM2_ST,
    TPMA_NV,
    TPMA_OBJECT,
    TSS2_RC,
)
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPMS_ATTEST,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMU_HA,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from aicert.guest_runtime.hostutil import StartStop
from aicert.guest_runtime.tpm_types import (
    AK_ATTRIBUTES,
    AK_REQUIRED_ATTRIBUTES,
    DEFAULT_NV_BUFFER_MAX,
    EK_RSA_CERT_NV_INDEX,
    HMAC_SESSION_FIRST,
    MAX_NONCE_SIZE,
    PCR_COUNT,
    POLICY_SESSION_FIRST,
    SHA256_SIZE,
    TRANSIENT_HANDLE_FIRST,
    AkAlgorithm,
    AttestationKey,
    NvIndexNotDefinedError,
    Quote,
    TpmError,
    TpmObject,
    TpmUnreachableError,
    ak_template,
    der_prefix,
    pcr_selection,
    selected_pcrs,
)

_log = logging.getLogger(__name__)
_CAP_HANDLE_BATCH = 64
_HASH_BY_DIGEST_SIZE = {32: "sha256", 48: "sha384", 64: "sha512"}

# Base codes of the TSS layers (not the TPM's own codes, layer 0) meaning "the TPM cannot be
# reached".
_UNREACHABLE_BASE_CODES = frozenset(
    {int(TSS2_RC.BASE_RC_IO_ERROR), int(TSS2_RC.BASE_RC_NO_CONNECTION)}
)
_TPM_RC_HANDLE = 0x08B  # format-1 TPM_RC_HANDLE, as returned for an undefined NV index
_RC_FMT1 = 0x080


@dataclass(frozen=True)
class _LoadedKey:
    name: bytes
    handle: ESYS_TR
    persistent: bool


def _validated_pcrs(pcrs: Sequence[int], operation: str) -> list[int]:
    unique = sorted(set(pcrs))
    if not unique:
        raise TpmError(operation, "no PCR selected")
    for pcr in unique:
        if not 0 <= pcr < PCR_COUNT:
            raise TpmError(operation, f"PCR index {pcr} out of range 0-{PCR_COUNT - 1}")
    return unique


def _is_unreachable(rc: int) -> bool:
    return rc >> 16 != 0 and (rc & 0xFFFF) in _UNREACHABLE_BASE_CODES


def _is_undefined_nv(rc: int) -> bool:
    # Format-1 codes carry the offending parameter/handle number in bits 8-11; ignore it.
    return (rc & 0xFFFF) & ~0xF00 == _TPM_RC_HANDLE and bool(rc & _RC_FMT1)


def _require_restricted_signing(public: TPM2B_PUBLIC, operation: str) -> None:
    """TpmError unless ``public`` is a restricted signing key (an AK that signs only quotes)."""
    attributes = int(public.publicArea.objectAttributes)
    if attributes & int(AK_REQUIRED_ATTRIBUTES) != int(AK_REQUIRED_ATTRIBUTES) or (
        attributes & int(TPMA_OBJECT.DECRYPT)
    ):
        raise TpmError(operation, f"not a restricted signing key (0x{attributes:08x})")


class Tpm(StartStop):
    """An open connection to one TPM. Use as a context manager."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self._ek: TpmObject | None = None
        self._loaded_ak: _LoadedKey | None = None
        self._nv_buffer_max: int | None = None
        self._unreachable: str | None = None
        try:
            self._esapi: ESAPI | None = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise TpmUnreachableError(
                "open", f"TPM unreachable at {tcti!r}: {exc}", int(exc.rc)
            ) from exc
        except Exception as exc:  # TCTI loader errors are not all TSS2_Exception
            raise TpmUnreachableError("open", f"TPM unreachable at {tcti!r}: {exc}") from exc

    # -- plumbing --------------------------------------------------------------------

    @property
    def esapi(self) -> ESAPI:
        if self._esapi is None:
            raise TpmError("use", "the TPM connection is closed")
        return self._esapi

    @contextmanager
    def _operation(self, name: str) -> Iterator[ESAPI]:
        """Map TSS2 failures to TpmError naming ``name``; after a connection failure every
        later operation fails fast instead of talking to a context in an unknown state."""
        if self._unreachable is not None:
            raise TpmUnreachableError(name, f"TPM unreachable ({self._unreachable})")
        esapi = self.esapi
        try:
            yield esapi
        except TSS2_Exception as exc:
            rc = int(exc.rc)
            if _is_unreachable(rc):
                self._unreachable = str(exc)
                raise TpmUnreachableError(name, f"TPM unreachable: {exc}", rc) from exc
            raise TpmError(name, str(exc), rc) from exc

    def operation(self, name: str) -> AbstractContextManager[ESAPI]:
        """The ESAPI for one TPM command of a module that adds commands (``tpm_signing``),
        TSS2 failures mapped to ``TpmError`` naming ``name`` as for this class's own.

        Args:
            name: the operation, for error messages.
        """
        return self._operation(name)

    def ak_handle(self, ak: AttestationKey) -> ESYS_TR:
        """The handle of ``ak``, loaded under the EK if it is not already (one AK at a time).

        Args:
            ak: the attestation key.

        Raises:
            TpmError: it does not load under this TPM's EK.
        """
        return self._ak_handle(ak)

    def close(self) -> None:
        """Flush what this object loaded, then close the connection. Idempotent.

        Raises TpmError if a flush fails on a reachable TPM (objects may be left behind);
        a TPM that is gone has nothing left to flush."""
        if self._esapi is None:
            return
        try:
            if self._unreachable is None:
                self._flush_owned_objects()
        except TpmUnreachableError:
            _log.warning("TPM at %s unreachable while closing; nothing flushed", self.tcti)
        finally:
            self._esapi.close()
            self._esapi = None

    def _flush_owned_objects(self) -> None:
        loaded: list[_LoadedKey] = []
        if self._loaded_ak is not None:
            loaded.append(self._loaded_ak)
            self._loaded_ak = None
        if self._ek is not None:
            loaded.append(_LoadedKey(self._ek.name, self._ek.handle, persistent=False))
            self._ek = None
        first_error: TpmError | None = None
        for key in loaded:
            try:
                self._release(key)
            except TpmError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def _release(self, key: _LoadedKey) -> None:
        """Flush a transient object; only forget the ESYS reference of a persistent one."""
        if key.persistent:
            with self._operation("close persistent handle") as esapi:
                esapi.tr_close(key.handle)
        else:
            self._flush(key.handle)

    def _flush(self, handle: ESYS_TR) -> None:
        with self._operation("flush") as esapi:
            esapi.flush_context(handle)

    def stop(self) -> None:
        """``close``, as leaving a ``with`` block calls it (``hostutil.StartStop``)."""
        self.close()

    # -- capabilities and handles ------------------------------------------------------

    def _handles(self, first: int, count: int | None = None) -> list[int]:
        """Handles of ``first``'s type from ``first`` on (all of them, or the first ``count``)."""
        found: list[int] = []
        with self._operation("get capability handles") as esapi:
            more, start = True, first
            while more and (count is None or len(found) < count):
                batch_size = _CAP_HANDLE_BATCH if count is None else count - len(found)
                more, data = esapi.get_capability(TPM2_CAP.HANDLES, start, batch_size)
                batch = [int(h) for h in data.data.handles]
                batch = [h for h in batch if h >> 24 == first >> 24]
                if not batch:
                    break
                found.extend(batch)
                start = batch[-1] + 1
        return found

    def transient_handles(self) -> list[int]:
        """Transient object handles currently loaded in the TPM (0x80xxxxxx)."""
        return self._handles(TRANSIENT_HANDLE_FIRST)

    def loaded_session_handles(self) -> list[int]:
        """HMAC and policy session handles currently loaded in the TPM."""
        return self._handles(HMAC_SESSION_FIRST) + self._handles(POLICY_SESSION_FIRST)

    def _nv_max(self) -> int:
        if self._nv_buffer_max is None:
            with self._operation("get capability NV buffer max") as esapi:
                _, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT_NV.BUFFER_MAX, 1)
            props = [p for p in data.data.tpmProperties if p.property == TPM2_PT_NV.BUFFER_MAX]
            self._nv_buffer_max = int(props[0].value) if props else DEFAULT_NV_BUFFER_MAX
        return self._nv_buffer_max

    # -- PCRs -------------------------------------------------------------------------

    def pcr_extend(self, pcr: int, digest: bytes) -> None:
        """Extend ``pcr`` in the SHA-256 bank with a 32-byte ``digest``."""
        _validated_pcrs([pcr], "pcr_extend")
        if len(digest) != SHA256_SIZE:
            raise TpmError("pcr_extend", f"digest must be {SHA256_SIZE} bytes, got {len(digest)}")
        values = TPML_DIGEST_VALUES(
            [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))]
        )
        with self._operation(f"pcr_extend {pcr}") as esapi:
            esapi.pcr_extend(ESYS_TR.PCR0 + pcr, values)

    def pcr_read(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        """SHA-256 bank values of ``pcrs``, ascending by index."""
        wanted = _validated_pcrs(pcrs, "pcr_read")
        values: dict[int, bytes] = {}
        remaining = list(wanted)
        with self._operation("pcr_read") as esapi:
            while remaining:
                _, selection_out, digests = esapi.pcr_read(pcr_selection(remaining))
                returned = [p for _, banked in selected_pcrs(selection_out) for p in banked]
                if not returned or len(returned) != len(digests):
                    raise TpmError("pcr_read", f"the TPM returned no SHA-256 value for {remaining}")
                for pcr, digest in zip(returned, digests, strict=True):
                    values[pcr] = bytes(digest)
                remaining = [p for p in remaining if p not in values]
        return {pcr: values[pcr] for pcr in wanted}

    # -- NV --------------------------------------------------------------------------

    def read_nv(self, index: int) -> bytes:
        """The whole content of NV ``index``, read in chunks of the TPM's NV buffer."""
        chunk_max = self._nv_max()
        operation = f"read_nv 0x{index:08x}"
        # Asking GetCapability first keeps the TSS from logging an error for every optional
        # index that is absent (the EK template and nonce indices usually are).
        if index not in self._handles(index, count=1):
            raise NvIndexNotDefinedError(operation, "index not defined")
        with self._operation(operation) as esapi:
            try:
                nv = esapi.tr_from_tpmpublic(index)
            except TSS2_Exception as exc:
                if _is_undefined_nv(int(exc.rc)):
                    raise NvIndexNotDefinedError(
                        operation, "index not defined", int(exc.rc)
                    ) from exc
                raise
            try:
                nv_public, _ = esapi.nv_read_public(nv)
                attributes = int(nv_public.nvPublic.attributes)
                if attributes & TPMA_NV.AUTHREAD:
                    auth = nv
                elif attributes & TPMA_NV.OWNERREAD:
                    auth = ESYS_TR.OWNER
                elif attributes & TPMA_NV.PPREAD:
                    auth = ESYS_TR.PLATFORM
                else:
                    raise TpmError(operation, "index readable only with a policy")
                size = int(nv_public.nvPublic.dataSize)
                data = bytearray()
                while len(data) < size:
                    count = min(chunk_max, size - len(data))
                    data += bytes(esapi.nv_read(nv, count, len(data), auth_handle=auth))
                return bytes(data)
            finally:
                esapi.tr_close(nv)

    def ek_certificate(self) -> bytes | None:
        """The RSA EK certificate (DER, padding removed), or None if the TPM has none."""
        try:
            raw = self.read_nv(EK_RSA_CERT_NV_INDEX)
        except NvIndexNotDefinedError:
            return None
        return der_prefix(raw)

    # -- keys ------------------------------------------------------------------------

    def _nv_read_for_template(self, index: int) -> bytes:
        try:
            return self.read_nv(int(index))
        except NvIndexNotDefinedError as exc:
            raise NoSuchIndex(int(index)) from exc

    def create_ek(self) -> TpmObject:
        """The RSA-2048 EK from the TCG default template (or the template/nonce the
        manufacturer stored in NV), loaded for the life of this ``Tpm``."""
        if self._ek is not None:
            return self._ek
        try:
            _, template = create_ek_template("EK-RSA2048", self._nv_read_for_template)
        except NoSuchIndex as exc:  # only template/nonce lookups can end up here
            raise TpmError("create_ek", f"EK template lookup failed: {exc}") from exc
        with self._operation("create_ek") as esapi:
            handle, public, _, _, _ = esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
            )
        self._ek = TpmObject(handle=handle, public=public)
        return self._ek

    @contextmanager
    def _endorsement_policy_session(self) -> Iterator[ESYS_TR]:
        """A policy session satisfying the EK's authPolicy, PolicySecret(TPM_RH_ENDORSEMENT)."""
        with self._operation("start EK policy session") as esapi:
            session = esapi.start_auth_session(
                tpm_key=ESYS_TR.NONE,
                bind=ESYS_TR.NONE,
                session_type=TPM2_SE.POLICY,
                symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                auth_hash=TPM2_ALG.SHA256,
            )
        try:
            with self._operation("EK PolicySecret(endorsement)") as esapi:
                esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, expiration=0)
            yield session
        finally:
            if self._unreachable is None:
                self._flush(session)

    def create_ek_child(
        self, template: TPMT_PUBLIC, operation: str = "create key"
    ) -> AttestationKey:
        """Create a key under the EK from ``template`` (not loaded)."""
        ek = self.create_ek()
        with self._endorsement_policy_session() as session, self._operation(operation) as esapi:
            private, public, _, _, _ = esapi.create(
                ek.handle,
                TPM2B_SENSITIVE_CREATE(),
                TPM2B_PUBLIC(publicArea=template),
                session1=session,
            )
        return AttestationKey(
            public_bytes=bytes(public.publicArea.marshal()),
            private_bytes=bytes(private.marshal()),
        )

    def create_ak(
        self, algorithm: AkAlgorithm = AkAlgorithm.RSA2048_RSASSA_SHA256
    ) -> AttestationKey:
        """A new restricted signing AK under the EK (RSA-2048 RSASSA or ECC P-256 ECDSA,
        SHA-256). Persist ``public_bytes`` and ``private_bytes`` to reuse it later."""
        ak = self.create_ek_child(ak_template(algorithm), "create_ak")
        self._ak_handle(ak)  # prove it loads under this EK before handing it out
        return ak

    def load_ak(self, private: bytes, public: bytes) -> AttestationKey:
        """Reload an AK created earlier under this TPM's EK."""
        try:
            ak = AttestationKey(public_bytes=public, private_bytes=private)
            _ = ak.public, ak.private
        except Exception as exc:
            raise TpmError("load_ak", f"malformed AK blobs: {exc}") from exc
        self._ak_handle(ak)
        return ak

    def persistent_ak(self, handle: int) -> AttestationKey:
        """The restricted signing key persisted at ``handle`` (Azure: 0x81000003)."""
        operation = f"read persistent AK 0x{handle:08x}"
        with self._operation(operation) as esapi:
            tr = esapi.tr_from_tpmpublic(handle)
            try:
                public, _, _ = esapi.read_public(tr)
            finally:
                esapi.tr_close(tr)
        _require_restricted_signing(public, operation)
        return AttestationKey(
            public_bytes=bytes(public.publicArea.marshal()), persistent_handle=handle
        )

    def endorsement_primary_ak(self, template: bytes) -> AttestationKey:
        """The restricted signing primary of the endorsement hierarchy made from ``template``,
        loaded: GCE's AK (template in NV 0x01c10001 RSA / 0x01c10003 ECC).

        Args:
            template: the TPMT_PUBLIC template, as the NV index holds it.

        Raises:
            TpmError: the template is malformed, not a restricted signing key, or the TPM
                refuses it.
        """
        try:
            TPMT_PUBLIC.unmarshal(template)
        except Exception as exc:  # tpm2-pytss raises several types on malformed input
            raise TpmError("create endorsement AK", f"malformed template: {exc}") from exc
        ak = AttestationKey(public_bytes=b"", endorsement_template=bytes(template))
        handle, public_bytes = self._create_endorsement_primary(ak)
        self._flush(handle)
        ak = AttestationKey(public_bytes=public_bytes, endorsement_template=bytes(template))
        self._ak_handle(ak)  # loads it as the one AK, proving the template gives it again
        return ak

    def _create_endorsement_primary(self, ak: AttestationKey) -> tuple[ESYS_TR, bytes]:
        """CreatePrimary(endorsement, template); the handle and the public area it got."""
        area, _ = TPMT_PUBLIC.unmarshal(ak.endorsement_template)
        with self._operation("create endorsement AK") as esapi:
            handle, public, _, _, _ = esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=area), ESYS_TR.ENDORSEMENT
            )
        public_bytes = bytes(public.publicArea.marshal())
        try:
            _require_restricted_signing(public, "create endorsement AK")
            if ak.public_bytes and public_bytes != ak.public_bytes:
                raise TpmError("create endorsement AK", "the template gave another key")
        except TpmError:
            self._flush(handle)
            raise
        return handle, public_bytes

    def _ak_handle(self, ak: AttestationKey) -> ESYS_TR:
        """The AK's handle, loading it under the EK if needed. Only one AK stays loaded:
        a TPM may hold as few as three transient objects."""
        name = ak.name
        if self._loaded_ak is not None:
            if hmac.compare_digest(self._loaded_ak.name, name):
                return self._loaded_ak.handle
            previous, self._loaded_ak = self._loaded_ak, None
            self._release(previous)
        if ak.persistent_handle is not None:
            handle = self._persistent_handle(ak)
            self._loaded_ak = _LoadedKey(name, handle, persistent=True)
            return handle
        if ak.endorsement_template:
            handle, _ = self._create_endorsement_primary(ak)
            self._loaded_ak = _LoadedKey(name, handle, persistent=False)
            return handle
        ek = self.create_ek()
        with self._endorsement_policy_session() as session, self._operation("load AK") as esapi:
            handle = esapi.load(ek.handle, ak.private, ak.public, session1=session)
        self._loaded_ak = _LoadedKey(name, handle, persistent=False)
        return handle

    def _persistent_handle(self, ak: AttestationKey) -> ESYS_TR:
        if ak.persistent_handle is None:
            raise TpmError("open persistent AK", "the AK is not persistent")
        operation = f"open persistent AK 0x{ak.persistent_handle:08x}"
        with self._operation(operation) as esapi:
            handle = esapi.tr_from_tpmpublic(ak.persistent_handle)
            # The key at the handle must be the one the caller holds (a later provisioning
            # step could have replaced it).
            public, _, _ = esapi.read_public(handle)
            if bytes(public.publicArea.marshal()) != ak.public_bytes:
                esapi.tr_close(handle)
                raise TpmError(operation, "the persistent key is not the expected AK")
        return handle

    # -- attestation -------------------------------------------------------------------

    def activate_credential(
        self, ak: AttestationKey, credential_blob: bytes, encrypted_secret: bytes
    ) -> bytes:
        """TPM2_ActivateCredential: the secret the platform CA sealed to (EK, AK name).

        ``credential_blob`` and ``encrypted_secret`` are the contents of TPM2B_ID_OBJECT and
        TPM2B_ENCRYPTED_SECRET (without their size prefix)."""
        ak_handle = self._ak_handle(ak)
        ek = self.create_ek()
        with (
            self._endorsement_policy_session() as session,
            self._operation("activate_credential") as esapi,
        ):
            secret = esapi.activate_credential(
                ak_handle,
                ek.handle,
                TPM2B_ID_OBJECT(credential=credential_blob),
                TPM2B_ENCRYPTED_SECRET(secret=encrypted_secret),
                session1=ESYS_TR.PASSWORD,
                session2=session,
            )
        return bytes(secret)

    def quote(self, ak: AttestationKey, pcrs: Sequence[int], nonce: bytes) -> Quote:
        """Quote ``pcrs`` of the SHA-256 bank with ``ak``, ``nonce`` as extraData.

        The PCR values are read right after the quote; if one changed in between (the
        attested pcrDigest differs from the digest of the values read), quote once more."""
        wanted = _validated_pcrs(pcrs, "quote")
        if len(nonce) > MAX_NONCE_SIZE:
            raise TpmError("quote", f"nonce longer than {MAX_NONCE_SIZE} bytes")
        for _ in range(2):
            quote = self._quote_once(ak, wanted, nonce)
            if quote is not None:
                return quote
        raise TpmError("quote", "PCR values kept changing while quoting")

    def _quote_once(self, ak: AttestationKey, pcrs: list[int], nonce: bytes) -> Quote | None:
        handle = self._ak_handle(ak)
        with self._operation("quote") as esapi:
            attest_2b, signature = esapi.quote(
                handle, pcr_selection(pcrs), nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
            )
        attest = bytes(attest_2b)
        values = self.pcr_read(pcrs)
        parsed, used = TPMS_ATTEST.unmarshal(attest)
        if used != len(attest):
            raise TpmError("quote", "trailing bytes after TPMS_ATTEST")
        if parsed.magic != TPM2_GENERATED.VALUE or parsed.type != TPM2_ST.ATTEST_QUOTE:
            raise TpmError("quote", "the TPM returned something other than a quote")
        if bytes(parsed.extraData) != nonce:
            raise TpmError("quote", "the quote's extraData is not the nonce")
        quoted = selected_pcrs(parsed.attested.quote.pcrSelect)
        if quoted != [(int(TPM2_ALG.SHA256), pcrs)]:
            raise TpmError("quote", f"the TPM quoted {quoted}, not SHA-256 PCRs {pcrs}")
        # The TPM digests the PCR values with the signing scheme's hash; its size tells which.
        signed_digest = bytes(parsed.attested.quote.pcrDigest)
        hash_name = _HASH_BY_DIGEST_SIZE.get(len(signed_digest))
        if hash_name is None:
            raise TpmError("quote", f"pcrDigest of unexpected size {len(signed_digest)}")
        digest = hashlib.new(hash_name, b"".join(values[p] for p in pcrs)).digest()
        if not hmac.compare_digest(digest, signed_digest):
            return None
        return Quote(
            attest=attest,
            signature=bytes(signature.marshal()),
            pcrs=values,
            nonce=nonce,
        )


__all__ = [
    "AK_ATTRIBUTES",
    "AK_REQUIRED_ATTRIBUTES",
    "EK_RSA_CERT_NV_INDEX",
    "AkAlgorithm",
    "AttestationKey",
    "NvIndexNotDefinedError",
    "Quote",
    "Tpm",
    "TpmError",
    "TpmObject",
    "TpmUnreachableError",
    "ak_template",
    "der_prefix",
    "pcr_selection",
    "selected_pcrs",
]
