"""The run's statements signed by the TPM, then bound into PCR 15 (after the result).

Built from the agent's own event log with the verifier's functions
(``aicert.signed_statements``), so that what is signed is exactly what a verifier rebuilds
from the replayed log, and nothing only the orchestrator knows. The AK signs each DSSE
pre-authentication encoding with ``tpm_sign`` (the TPM hashes the bytes itself: the AK is a
restricted key). Which statements:

- ``model-signing`` only with an ECDSA AK (``model_signing`` verifies no other key type;
  Azure's pre-provisioned AK is RSA) and when no output sits where the signature file goes;
- ``slsa-provenance`` always (DSSE allows RSA as well as ECDSA).

The ``aicert.output.signed-statements`` event holding each envelope's digest is measured
last; the envelopes go back to the orchestrator with the quote.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import ec

from aicert.appevents import MeasuredRun, interpret
from aicert.guest_runtime.run_state import Measurer, RunState
from aicert.guest_runtime.tpm import AttestationKey, Tpm
from aicert.guest_runtime.tpm_signing import tpm_sign
from aicert.model import STATEMENT_KINDS, AppEvent, SignedStatement, StatementKind
from aicert.model_signing_format import ModelSigningFormatError, dsse_pae
from aicert.signed_statements import (
    AkPublicKey,
    ak_keyid,
    dsse_envelope,
    signed_statements_event,
    statement_payload,
)
from aicert.tpm_structures import parse_tpmt_public


def _payloads(measured: MeasuredRun, key: AkPublicKey) -> list[tuple[StatementKind, bytes]]:
    """The statements this AK can sign for this run, in kind order."""
    payloads: list[tuple[StatementKind, bytes]] = []
    for kind in STATEMENT_KINDS:
        if kind == "model-signing" and not isinstance(key, ec.EllipticCurvePublicKey):
            continue
        try:
            payloads.append((kind, statement_payload(kind, measured)))
        except ModelSigningFormatError:
            continue  # an output named model.sig: no bundle the tool accepts describes it
    return payloads


def signed_statements_of(
    tpm: Tpm, ak: AttestationKey, events: Sequence[AppEvent]
) -> list[SignedStatement]:
    """The statements of the run ``events`` measure (outputs and result included), signed
    by ``ak`` in ``tpm``; nothing is measured.

    Args:
        tpm: the TPM holding the AK.
        ak: the attestation key.
        events: the run's application event log so far.

    Raises:
        EventLogError: the log is not a complete run (the verifier's grammar).
        TpmError: the TPM refused to sign.
    """
    key = parse_tpmt_public(ak.public_bytes).to_cryptography_key()
    keyid = ak_keyid(key)
    return [
        SignedStatement(
            kind=kind, envelope=dsse_envelope(payload, tpm_sign(tpm, ak, dsse_pae(payload)), keyid)
        )
        for kind, payload in _payloads(interpret(events), key)
    ]


def sign_statements(
    measurer: Measurer, run: RunState, tpm: Tpm, ak: AttestationKey
) -> list[SignedStatement]:
    """Sign the run's statements with ``ak`` and measure their digests into PCR 15.

    Args:
        measurer: extends PCR 15 and appends the event to the run's log.
        run: the run, its outputs and result measured.
        tpm: this machine's TPM.
        ak: the machine's attestation key.

    Returns:
        The signed statements, in the order the event lists them.

    Raises:
        TpmError: the TPM refused to sign.
    """
    measurer.progress("signing the model_signing and SLSA statements with the AK")
    statements = signed_statements_of(tpm, ak, run.events)
    measurer.measure(run, signed_statements_event(statements))
    return statements


__all__ = ["sign_statements", "signed_statements_of"]
