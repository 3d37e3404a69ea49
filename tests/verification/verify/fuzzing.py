"""A deterministic mutation engine over real certificates (see test_fuzz_real_certificates.py).

``mutate(context, index)`` returns the ``index``-th mutant of one seed certificate: the
category is chosen round-robin over ``CATEGORIES`` (each gets the same share), the target
field cycles through every field the category applies to (so a long enough run edits every
field of the seed), and every random choice comes from ``random.Random`` seeded with
(run seed, platform, index): one mutant can be rebuilt alone from those three values.

The binary structures are re-encoded here with a small marshaller of their own (TPMS_ATTEST,
TPMT_SIGNATURE, TPMT_PUBLIC, the TCG boot event log), so that a mutant can be well formed
with different content, not only garbage; ``tests`` check that each re-encodes the seeds'
structures byte for byte.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import cast

from aicert.appevents import event_digest, interpret
from aicert.canonical import canonical_json
from aicert.errors import VerificationError
from aicert.model import AppEvent
from aicert.tcg_eventlog import TcgEvent, TcgEventLog, parse_event_log
from aicert.tpm_structures import (
    TPM_ALG_ECC,
    TPM_ALG_ECDSA,
    TPM_ALG_HMAC,
    TPM_ALG_NULL,
    TPM_ALG_RSA,
    TPM_ALG_RSAPSS,
    TPM_ALG_RSASSA,
    TPM_ALG_SHA1,
    TPM_ALG_SHA256,
    TPM_ALG_SHA384,
    TPM_ALG_SHA512,
    TPM_ST_ATTEST_CERTIFY,
    TpmsAttest,
    TpmsEccPoint,
    TpmsPcrSelection,
    TpmsQuoteInfo,
    TpmsRsaParms,
    TpmtPublic,
    TpmtScheme,
    TpmtSignature,
    TpmtSymDefObject,
    parse_attest,
    parse_signature,
    parse_tpmt_public,
)

Json = None | bool | int | float | str | list["Json"] | dict[str, "Json"]
JsonPath = tuple[str | int, ...]

EV_NO_ACTION = 0x00000003
EV_EVENT_TAG = 0x00000006
EV_SEPARATOR = 0x00000004
EV_IPL = 0x0000000D
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
TCG_BANK_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
BOUNDARY_INTS = (0, 1, -1, 2**31 - 1, 2**31, -(2**31), 2**32, 2**53, 2**53 + 1, 2**63, 2**64)


# -- the JSON tree ----------------------------------------------------------------------------


def walk(node: Json, path: JsonPath = ()) -> Iterator[tuple[JsonPath, Json]]:
    """Every node of a JSON tree with its path, the root first."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, (*path, index))


def _get_at(document: Json, path: JsonPath) -> Json:
    node = document
    for key in path:
        node = node[key]  # type: ignore[index]
    return node


def _set_at(document: Json, path: JsonPath, value: Json) -> None:
    parent = _get_at(document, path[:-1])
    parent[path[-1]] = value  # type: ignore[index]


def _delete_at(document: Json, path: JsonPath) -> None:
    parent = _get_at(document, path[:-1])
    del parent[path[-1]]  # type: ignore[arg-type,union-attr]


def _show(path: JsonPath) -> str:
    return "/".join(str(part) for part in path) or "(root)"


def _encode_with_duplicate(
    document: Json, target: JsonPath, key: str, value: Json, first: bool
) -> bytes:
    """The JSON text of ``document`` with ``key`` appearing twice in the object at
    ``target``: the extra pair (``key``: ``value``) before or after the original."""

    def encode(node: Json, path: JsonPath) -> str:
        if isinstance(node, dict):
            pairs = [f"{json.dumps(k)}: {encode(v, (*path, k))}" for k, v in node.items()]
            if path == target:
                extra = f"{json.dumps(key)}: {json.dumps(value)}"
                pairs = [extra, *pairs] if first else [*pairs, extra]
            return "{" + ", ".join(pairs) + "}"
        if isinstance(node, list):
            return "[" + ", ".join(encode(v, (*path, i)) for i, v in enumerate(node)) + "]"
        return json.dumps(node)

    return encode(document, ()).encode()


# -- TPM structures: marshalling ------------------------------------------------------------


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def marshal_attest(attest: TpmsAttest) -> bytes:
    """TPMS_ATTEST from its parsed fields (a quote's ``attested`` re-encoded from ``quote``)."""
    clock = attest.clock_info
    head = (
        struct.pack(">IH", attest.magic, attest.type)
        + _tpm2b(attest.qualified_signer)
        + _tpm2b(attest.extra_data)
        + struct.pack(
            ">QIIBQ",
            clock.clock,
            clock.reset_count,
            clock.restart_count,
            int(clock.safe),
            attest.firmware_version,
        )
    )
    if attest.quote is None:
        return head + attest.attested
    selections = attest.quote.pcr_select.selections
    body = struct.pack(">I", len(selections))
    for selection in selections:
        body += struct.pack(">HB", selection.hash_alg, len(selection.pcr_select))
        body += selection.pcr_select
    return head + body + _tpm2b(attest.quote.pcr_digest)


def marshal_signature(signature: TpmtSignature) -> bytes:
    """TPMT_SIGNATURE from its parsed fields."""
    head = struct.pack(">H", signature.sig_alg)
    if signature.sig_alg == TPM_ALG_NULL:
        return head
    head += struct.pack(">H", signature.hash_alg)
    if signature.sig_alg in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        return head + _tpm2b(signature.rsa_signature)
    if signature.sig_alg == TPM_ALG_HMAC:
        return head + signature.hmac_digest
    return head + _tpm2b(signature.ecc_r) + _tpm2b(signature.ecc_s)


def _marshal_sym(symmetric: TpmtSymDefObject) -> bytes:
    if symmetric.algorithm == TPM_ALG_NULL:
        return struct.pack(">H", TPM_ALG_NULL)
    return struct.pack(">HHH", symmetric.algorithm, symmetric.key_bits, symmetric.mode)


def _marshal_scheme(scheme: TpmtScheme) -> bytes:
    if scheme.scheme == TPM_ALG_NULL or scheme.scheme == 0x0015:  # NULL, RSAES: no details
        return struct.pack(">H", scheme.scheme)
    if scheme.scheme == 0x001A:  # ECDAA: hash and count
        return struct.pack(">HHH", scheme.scheme, scheme.hash_alg, scheme.count)
    return struct.pack(">HH", scheme.scheme, scheme.hash_alg)


def marshal_public(public: TpmtPublic) -> bytes:
    """TPMT_PUBLIC from its parsed fields (not ``raw``)."""
    out = struct.pack(">HHI", public.type, public.name_alg, public.object_attributes)
    out += _tpm2b(public.auth_policy)
    parameters = public.parameters
    if isinstance(parameters, TpmsRsaParms):
        out += _marshal_sym(parameters.symmetric) + _marshal_scheme(parameters.scheme)
        out += struct.pack(">HI", parameters.key_bits, parameters.exponent)
        return out + _tpm2b(cast(bytes, public.unique))
    out += _marshal_sym(parameters.symmetric) + _marshal_scheme(parameters.scheme)
    out += struct.pack(">H", parameters.curve_id) + _marshal_scheme(parameters.kdf)
    point = cast(TpmsEccPoint, public.unique)
    return out + _tpm2b(point.x) + _tpm2b(point.y)


# -- the TCG boot event log: marshalling ----------------------------------------------------


def split_header(raw: bytes) -> tuple[bytes, bytes]:
    """The first record (TCG_PCR_EVENT with the Spec ID event) and the rest, as bytes."""
    (size,) = struct.unpack_from("<I", raw, 4 + 4 + 20)
    end = 4 + 4 + 20 + 4 + size
    return raw[:end], raw[end:]


def marshal_event2(event: TcgEvent, banks: tuple[str, ...]) -> bytes:
    """One TCG_PCR_EVENT2 record, its digests in the header's bank order."""
    out = struct.pack("<III", event.pcr, event.event_type, len(banks))
    for bank in banks:
        out += struct.pack("<H", TCG_BANK_IDS[bank]) + event.digests[bank]
    return out + struct.pack("<I", len(event.data)) + event.data


def marshal_event_log(header: bytes, events: list[TcgEvent], banks: tuple[str, ...]) -> bytes:
    """A whole log: the header record as it was, then ``events`` re-encoded."""
    return header + b"".join(marshal_event2(event, banks) for event in events)


def _measured_event(pcr: int, event_type: int, data: bytes, banks: tuple[str, ...]) -> TcgEvent:
    """An event whose every digest is the hash of its data (what firmware would log)."""
    return TcgEvent(
        index=0,
        pcr=pcr,
        event_type=event_type,
        digests={bank: hashlib.new(bank, data).digest() for bank in banks},
        data=data,
    )


# -- the seeds a campaign mutates ------------------------------------------------------------


@dataclass(frozen=True)
class SeedDocument:
    """A seed certificate as the fuzzer sees it: its JSON, and its parsed binary parts."""

    platform: str
    raw: bytes
    document: dict[str, Json]
    boot_log: TcgEventLog | None
    boot_log_raw: bytes | None

    @classmethod
    def of(cls, platform: str, raw: bytes) -> SeedDocument:
        document = json.loads(raw)
        boot_b64 = document.get("boot_event_log")
        boot_raw = base64.b64decode(boot_b64) if boot_b64 else None
        return cls(
            platform=platform,
            raw=raw,
            document=document,
            boot_log=parse_event_log(boot_raw) if boot_raw else None,
            boot_log_raw=boot_raw,
        )

    def b64(self, name: str) -> bytes:
        attestation = cast(dict[str, dict[str, str]], self.document["attestation"])
        if name in ("attest", "signature"):
            return base64.b64decode(attestation["quote"][name])
        if name == "public":
            return base64.b64decode(attestation["ak"]["public"])
        raise KeyError(name)

    @property
    def chain(self) -> list[str]:
        attestation = cast(dict[str, dict[str, list[str]]], self.document["attestation"])
        return list(attestation["ak"]["certificate_chain"])


@dataclass(frozen=True)
class Mutant:
    """One mutation of a seed: the certificate file's bytes, and what was done."""

    category: str
    description: str
    data: bytes


@dataclass
class Context:
    """One seed and the others (donors for splices), with the run's seed value."""

    seed: SeedDocument
    donors: list[SeedDocument]
    run_seed: int
    paths: list[JsonPath] = field(default_factory=list)
    _targets: dict[str, list[JsonPath]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paths = [path for path, _ in walk(self.seed.document) if path]

    def targets(self, category: str, predicate: Callable[[JsonPath, Json], bool]) -> list[JsonPath]:
        """The paths ``category`` applies to, in an order fixed by the run seed."""
        cached = self._targets.get(category)
        if cached is None:
            cached = [p for p in self.paths if predicate(p, _get_at(self.seed.document, p))]
            random.Random(f"{self.run_seed}/{self.seed.platform}/{category}").shuffle(cached)
            self._targets[category] = cached
        return cached


class Builder:
    """What one mutation function gets: a fresh copy of the seed and its random choices."""

    def __init__(self, context: Context, category: str, turn: int, rng: random.Random) -> None:
        self.context = context
        self.category = category
        self.turn = turn  # how many mutants of this category came before (target cycling)
        self.rng = rng
        # A fresh tree from the text: several times faster than deepcopy.
        self.document: dict[str, Json] = json.loads(context.seed.raw)

    @property
    def seed(self) -> SeedDocument:
        return self.context.seed

    def pick_target(self, predicate: Callable[[JsonPath, Json], bool]) -> JsonPath | None:
        targets = self.context.targets(self.category, predicate)
        if not targets:
            return None
        return targets[self.turn % len(targets)]

    def donor(self) -> SeedDocument:
        return self.rng.choice(self.context.donors)

    def done(self, description: str, data: bytes | None = None) -> Mutant:
        if data is None:
            data = json.dumps(self.document).encode()
        return Mutant(self.category, description, data)

    def set_b64(self, path: JsonPath, data: bytes) -> None:
        _set_at(self.document, path, base64.b64encode(data).decode())


# -- random values ---------------------------------------------------------------------------


def _random_text(rng: random.Random, max_size: int = 12) -> str:
    alphabet = "abcXYZ019 -_./:\\\"'\u00e9\u0430\u200b\u0000\n\t{}[]"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_size)))


def _random_json(rng: random.Random, depth: int = 2) -> Json:
    kind = rng.randrange(9 if depth > 0 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice(BOUNDARY_INTS) * rng.choice([1, -1])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 1.0, 3.14])
    if kind in (4, 5, 6):
        return _random_text(rng)
    if kind == 7:
        return [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {_random_text(rng, 6): _random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))}


def _edit_string(rng: random.Random, value: str) -> tuple[str, str]:
    """A small edit of ``value`` and its description."""
    if not value:
        return _random_text(rng, 8) or "x", "empty string filled"
    position = rng.randrange(len(value))
    choice = rng.randrange(10)
    if choice == 0:
        replacement = rng.choice("0aAfF/=+ \u0430")
        return value[:position] + replacement + value[position + 1 :], f"char {position} replaced"
    if choice == 1:
        return value[:position] + value[position + 1 :], f"char {position} dropped"
    if choice == 2:
        return value[:position] + rng.choice("0a=\n ") + value[position:], "char inserted"
    if choice == 3:
        return value.swapcase(), "case swapped"
    if choice == 4:
        return value + rng.choice([" ", "\n", "\u0000", "0", "=="]), "suffix appended"
    if choice == 5:
        return value[: len(value) // 2], "truncated to half"
    if choice == 6:
        return value + value, "doubled"
    if choice == 7:
        return " " + value, "leading space"
    if choice == 8:
        # A homoglyph: the same look, other bytes.
        swapped = value.replace("a", "\u0430", 1).replace("e", "\u0435", 1)
        return (swapped if swapped != value else value + "\u200b"), "homoglyph"
    return "", "emptied"


def _edit_number(rng: random.Random, value: int | float) -> tuple[Json, str]:
    choice = rng.randrange(6)
    if choice == 0 and isinstance(value, int):
        return float(value), "same value as a float"
    if choice == 1:
        return value + 1, "+1"
    if choice == 2:
        return value - 1, "-1"
    if choice == 3:
        return -value, "negated"
    boundary = rng.choice(BOUNDARY_INTS) * rng.choice([1, -1])
    return boundary, f"boundary {boundary}"


def _change_type(rng: random.Random, value: Json) -> tuple[Json, str]:
    """The same content in another JSON type (or the closest thing to it)."""
    if isinstance(value, bool):
        return rng.choice([int(value), str(value).lower(), None]), "bool as another type"
    if isinstance(value, int):
        return rng.choice([str(value), float(value), [value], value != 0]), "int as another type"
    if isinstance(value, float):
        return rng.choice([str(value), int(value), [value]]), "float as another type"
    if isinstance(value, str):
        candidates: list[Json] = [[value], {"value": value}, None, len(value)]
        if value.isdigit():
            candidates.append(int(value))
        return rng.choice(candidates), "string as another type"
    if isinstance(value, list):
        return rng.choice([{str(i): v for i, v in enumerate(value)}, json.dumps(value), None]), (
            "list as another type"
        )
    if isinstance(value, dict):
        return rng.choice([list(value.values()), list(value.items()), json.dumps(value)]), (
            "object as another type"
        )
    return rng.choice([0, "", [], {}, False]), "null as another type"


# -- JSON mutations --------------------------------------------------------------------------


def _any(_path: JsonPath, _value: Json) -> bool:
    return True


def _json_replace(b: Builder) -> Mutant:
    path = cast(JsonPath, b.pick_target(_any))
    value = _random_json(b.rng)
    _set_at(b.document, path, value)
    return b.done(f"{_show(path)} replaced by {json.dumps(value)[:60]}")


def _json_remove(b: Builder) -> Mutant:
    path = cast(JsonPath, b.pick_target(_any))
    _delete_at(b.document, path)
    return b.done(f"{_show(path)} removed")


def _json_duplicate_key(b: Builder) -> Mutant:
    path = cast(JsonPath, b.pick_target(lambda p, _v: isinstance(p[-1], str)))
    original = _get_at(b.document, path)
    value = _rng_variant(b.rng, original)
    first = b.rng.random() < 0.5
    data = _encode_with_duplicate(b.document, path[:-1], str(path[-1]), value, first)
    where = "before" if first else "after"
    return b.done(f"{_show(path)} duplicated {where} with {json.dumps(value)[:60]}", data)


def _rng_variant(rng: random.Random, value: Json) -> Json:
    """A value of the same type that differs (an edited string, a nearby number, ...)."""
    if isinstance(value, str):
        return _edit_string(rng, value)[0]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return _edit_number(rng, value)[0]
    return _random_json(rng)


def _json_type_change(b: Builder) -> Mutant:
    path = cast(JsonPath, b.pick_target(_any))
    value, how = _change_type(b.rng, _get_at(b.document, path))
    _set_at(b.document, path, value)
    return b.done(f"{_show(path)}: {how} ({json.dumps(value)[:60]})")


def _json_string_edit(b: Builder) -> Mutant:
    path = cast(JsonPath, b.pick_target(lambda _p, v: isinstance(v, str)))
    value, how = _edit_string(b.rng, cast(str, _get_at(b.document, path)))
    _set_at(b.document, path, value)
    return b.done(f"{_show(path)}: {how}")


def _json_key_rename(b: Builder) -> Mutant:
    path = cast(JsonPath, b.pick_target(lambda p, _v: isinstance(p[-1], str)))
    parent = cast(dict[str, Json], _get_at(b.document, path[:-1]))
    old = cast(str, path[-1])
    new, how = _edit_string(b.rng, old)
    renamed = {(new if k == old else k): v for k, v in parent.items()}
    parent.clear()
    parent.update(renamed)
    return b.done(f"key {_show(path)} renamed ({how}) to {new!r}")


def _json_number_boundary(b: Builder) -> Mutant:
    path = cast(
        JsonPath,
        b.pick_target(lambda _p, v: isinstance(v, int | float) and not isinstance(v, bool)),
    )
    value, how = _edit_number(b.rng, cast(int, _get_at(b.document, path)))
    _set_at(b.document, path, value)
    return b.done(f"{_show(path)}: {how}")


def _lists(minimum: int) -> Callable[[JsonPath, Json], bool]:
    return lambda _p, v: isinstance(v, list) and len(v) >= minimum


def _json_list_reorder(b: Builder) -> Mutant:
    path = cast(JsonPath, b.pick_target(_lists(2)))
    items = cast(list[Json], _get_at(b.document, path))
    if b.rng.random() < 0.5:
        i, j = b.rng.sample(range(len(items)), 2)
        items[i], items[j] = items[j], items[i]
        return b.done(f"{_show(path)}: items {i} and {j} swapped")
    before = list(items)
    while items == before and len({json.dumps(x) for x in items}) > 1:
        b.rng.shuffle(items)
    return b.done(f"{_show(path)}: shuffled")


def _json_list_truncate(b: Builder) -> Mutant:
    path = cast(JsonPath, b.pick_target(_lists(1)))
    items = cast(list[Json], _get_at(b.document, path))
    keep = b.rng.randrange(len(items))
    if b.rng.random() < 0.5:
        del items[keep:]
        return b.done(f"{_show(path)}: truncated to its first {keep}")
    del items[: len(items) - keep]
    return b.done(f"{_show(path)}: truncated to its last {keep}")


def _json_list_extend(b: Builder) -> Mutant:
    path = cast(JsonPath, b.pick_target(_lists(0)))
    items = cast(list[Json], _get_at(b.document, path))
    position = b.rng.randint(0, len(items))
    if items and b.rng.random() < 0.7:
        copied = copy.deepcopy(b.rng.choice(items))
        items.insert(position, copied)
        return b.done(f"{_show(path)}: an item duplicated at {position}")
    value = _random_json(b.rng)
    items.insert(position, value)
    return b.done(f"{_show(path)}: {json.dumps(value)[:40]} inserted at {position}")


def _json_add_key(b: Builder) -> Mutant:
    path = cast(JsonPath, b.pick_target(lambda _p, v: isinstance(v, dict)))
    target = cast(dict[str, Json], _get_at(b.document, path) if path else b.document)
    name = b.rng.choice(["verified", "extra", "pcr", "__proto__", "$ref", _random_text(b.rng, 8)])
    value = _random_json(b.rng)
    target[name] = value
    return b.done(f"{_show(path)}: key {name!r} added with {json.dumps(value)[:40]}")


def _raw_bytes(b: Builder) -> Mutant:
    data = bytearray(b.seed.raw)
    choice = b.rng.randrange(5)
    if choice == 0:
        positions = [b.rng.randrange(len(data)) for _ in range(b.rng.randint(1, 4))]
        for position in positions:
            data[position] = b.rng.randrange(256)
        return b.done(f"bytes {positions} of the file set at random", bytes(data))
    if choice == 1:
        cut = b.rng.randrange(len(data))
        return b.done(f"file truncated to {cut} bytes", bytes(data[:cut]))
    if choice == 2:
        tail = b.rng.choice([b"{}", b"\x00", b" x", b',"a":1}', b"\xff\xfe"])
        return b.done(f"{tail!r} appended to the file", bytes(data) + tail)
    if choice == 3:
        return b.done("UTF-8 byte order mark prepended", b"\xef\xbb\xbf" + bytes(data))
    # A structural character removed or doubled.
    marks = [i for i, c in enumerate(data) if c in b'{}[],:"']
    position = b.rng.choice(marks)
    if b.rng.random() < 0.5:
        return b.done(
            f"structural byte {position} removed", bytes(data[:position] + data[position + 1 :])
        )
    return b.done(
        f"structural byte {position} doubled",
        bytes(data[: position + 1] + data[position : position + 1] + data[position + 1 :]),
    )


# -- application event log mutations ---------------------------------------------------------


def _fix_claims(document: dict[str, Json]) -> str:
    """Make inputs[], outputs[] and run.* agree with the (edited) event log, as a forger who
    knows the format would: only the quote then stands between the edit and acceptance."""
    try:
        events = [AppEvent.model_validate(e) for e in cast(list[Json], document["event_log"])]
        measured = interpret(events)
        inputs = [r.model_dump(mode="json", exclude_none=True) for r in measured.input_records()]
        outputs = [r.model_dump(mode="json") for r in measured.output_records()]
    except (VerificationError, ValueError):
        return ""
    document["inputs"] = cast(Json, inputs)
    document["outputs"] = cast(Json, outputs)
    run = cast(dict[str, Json], document["run"])
    run["exit_code"] = measured.result.exit_code
    run["duration_ms"] = measured.result.duration_ms
    run["finished_at"] = measured.result.finished_at
    run["id"] = measured.runtime.run_id
    run["started_at"] = measured.runtime.started_at
    run["runtime_version"] = measured.runtime.runtime_version
    if measured.project is not None:
        run["project"] = measured.project
    return " (inputs, outputs and run fixed to match)"


def _events_done(b: Builder, description: str) -> Mutant:
    if b.rng.random() < 0.5:
        description += _fix_claims(b.document)
    return b.done(description)


def _events_move(b: Builder) -> Mutant:
    events = cast(list[Json], b.document["event_log"])
    i = b.turn % len(events)
    j = b.rng.choice([k for k in range(len(events)) if k != i])
    events.insert(j, events.pop(i))
    return _events_done(b, f"event {i} moved to {j}")


def _events_swap(b: Builder) -> Mutant:
    events = cast(list[Json], b.document["event_log"])
    i = b.turn % len(events)
    j = b.rng.choice([k for k in range(len(events)) if k != i])
    events[i], events[j] = events[j], events[i]
    return _events_done(b, f"events {i} and {j} swapped")


def _events_drop(b: Builder) -> Mutant:
    events = cast(list[Json], b.document["event_log"])
    i = b.turn % len(events)
    del events[i]
    return _events_done(b, f"event {i} dropped")


def _events_duplicate(b: Builder) -> Mutant:
    events = cast(list[Json], b.document["event_log"])
    i = b.turn % len(events)
    j = b.rng.randint(0, len(events))
    events.insert(j, copy.deepcopy(events[i]))
    return _events_done(b, f"event {i} duplicated at {j}")


def _events_change_pcr(b: Builder) -> Mutant:
    events = cast(list[dict[str, Json]], b.document["event_log"])
    i = b.turn % len(events)
    old = events[i]["pcr"]
    new = b.rng.choice([29 - cast(int, old), 29 - cast(int, old), 0, 9, 16, 23])
    events[i]["pcr"] = new
    return _events_done(b, f"event {i} moved from PCR {old} to PCR {new}")


def _events_data_edit(b: Builder) -> Mutant:
    path = cast(
        JsonPath,
        b.pick_target(lambda p, _v: len(p) >= 3 and p[0] == "event_log" and p[2] == "data"),
    )
    value = _get_at(b.document, path)
    choice = b.rng.randrange(4)
    if choice == 0 and isinstance(path[-1], str):
        _delete_at(b.document, path)
        how = "removed"
    elif choice == 1:
        new, how = _change_type(b.rng, value)
        _set_at(b.document, path, new)
    else:
        new = _rng_variant(b.rng, value)
        _set_at(b.document, path, new)
        how = f"set to {json.dumps(new)[:50]}"
    return _events_done(b, f"{_show(path)} {how}")


def _events_type_edit(b: Builder) -> Mutant:
    events = cast(list[dict[str, Json]], b.document["event_log"])
    i = b.turn % len(events)
    new = b.rng.choice(
        [
            "aicert.runtime",
            "aicert.runtime.channel-key",
            "aicert.input.config",
            "aicert.input.image",
            "aicert.input.source",
            "aicert.input.resource",
            "aicert.input.package",
            "aicert.output.file",
            "aicert.output.result",
            "aicert.input.unknown",
        ]
    )
    events[i]["type"] = new
    return _events_done(b, f"event {i} retyped as {new}")


def _boot_log_for(b: Builder) -> tuple[SeedDocument, TcgEventLog, bytes]:
    """The seed's boot log, or a donor's when the seed has none (local)."""
    source = (
        b.seed
        if b.seed.boot_log is not None
        else b.rng.choice([d for d in b.context.donors if d.boot_log is not None])
    )
    return source, cast(TcgEventLog, source.boot_log), cast(bytes, source.boot_log_raw)


def _events_into_boot_log(b: Builder) -> Mutant:
    """Application events moved into the boot log (as events of their own PCR, with their
    real digests), removed from the application log: the PCR 14/15 chains are unchanged."""
    events = cast(list[dict[str, Json]], b.document["event_log"])
    # Only a prefix of each PCR's chain can move (the boot log replays first): the first k
    # events of PCR 14 or PCR 15.
    pcr = b.rng.choice([14, 15])
    positions = [i for i, e in enumerate(events) if e["pcr"] == pcr]
    count = 1 + (b.turn // 2) % min(3, len(positions))
    moved = positions[:count]
    _source, log, raw = _boot_log_for(b)
    header, _ = split_header(raw)
    added = []
    for position in moved:
        event = AppEvent.model_validate(events[position])
        digest = event_digest(event)
        data = canonical_json(event.model_dump(mode="json"))
        tcg = _measured_event(pcr, b.rng.choice([EV_EVENT_TAG, EV_IPL]), data, log.banks)
        added.append(replace(tcg, digests={**tcg.digests, "sha256": digest}))
    for position in reversed(moved):
        del events[position]
    b.set_b64(("boot_event_log",), marshal_event_log(header, [*log.events, *added], log.banks))
    description = f"first {count} PCR {pcr} event(s) moved into the boot log"
    if b.seed.boot_log is None:
        description += " (a donor's boot log attached)"
    return _events_done(b, description)


# -- binary structure mutations --------------------------------------------------------------

B64_PATHS = {
    "attest": ("attestation", "quote", "attest"),
    "signature": ("attestation", "quote", "signature"),
    "public": ("attestation", "ak", "public"),
    "nonce": ("attestation", "nonce"),
}


def _edit_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Byte flips, truncation, extension, insertion, deletion."""
    if not data:
        return bytes([rng.randrange(256)]), "one byte given"
    choice = rng.randrange(6)
    if choice in (0, 1):
        out = bytearray(data)
        positions = sorted({rng.randrange(len(out)) for _ in range(rng.randint(1, 3))})
        for position in positions:
            out[position] ^= 1 << rng.randrange(8)
        return bytes(out), f"bits flipped at {positions}"
    if choice == 2:
        cut = rng.randrange(len(data))
        return data[:cut], f"truncated to {cut} bytes"
    if choice == 3:
        extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        return data + extra, f"{len(extra)} bytes appended"
    position = rng.randrange(len(data))
    if choice == 4:
        return data[:position] + bytes([rng.randrange(256)]) + data[
            position:
        ], f"byte inserted at {position}"
    return data[:position] + data[position + 1 :], f"byte {position} deleted"


def _bytes_mutation(name: str) -> Callable[[Builder], Mutant]:
    def mutation(b: Builder) -> Mutant:
        path = B64_PATHS[name]
        original = base64.b64decode(cast(str, _get_at(b.document, path)))
        data, how = _edit_bytes(b.rng, original)
        b.set_b64(path, data)
        return b.done(f"{_show(path)}: {how}")

    mutation.__name__ = f"{name}_bytes"
    return mutation


def _length_field_edit(
    rng: random.Random, data: bytes, offsets: list[tuple[int, int, str]]
) -> tuple[bytes, str]:
    """Set one big-endian size field (offset, width, name) to a boundary value."""
    offset, width, name = rng.choice(offsets)
    (current,) = struct.unpack_from(">H" if width == 2 else ">I", data, offset)
    top = (1 << (8 * width)) - 1
    value = rng.choice([0, 1, current - 1, current + 1, top, top // 2 + 1])
    value = max(0, min(top, value))
    out = bytearray(data)
    struct.pack_into(">H" if width == 2 else ">I", out, offset, value)
    return bytes(out), f"{name} {current} -> {value}"


def _attest_offsets(data: bytes) -> list[tuple[int, int, str]]:
    """The size fields of a quote's TPMS_ATTEST: (offset, width, name)."""
    offsets = [(6, 2, "qualifiedSigner.size")]
    (signer,) = struct.unpack_from(">H", data, 6)
    extra = 8 + signer
    offsets.append((extra, 2, "extraData.size"))
    (extra_size,) = struct.unpack_from(">H", data, extra)
    select = extra + 2 + extra_size + 8 + 4 + 4 + 1 + 8
    offsets.append((select, 4, "pcrSelect.count"))
    return offsets


def _attest_length(b: Builder) -> Mutant:
    path = B64_PATHS["attest"]
    data = b.seed.b64("attest")
    mutated, how = _length_field_edit(b.rng, data, _attest_offsets(data))
    b.set_b64(path, mutated)
    return b.done(f"TPMS_ATTEST {how}")


def _with_selections(attest: TpmsAttest, selections: list[TpmsPcrSelection]) -> TpmsAttest:
    quote = cast(TpmsQuoteInfo, attest.quote)
    selection = replace(quote.pcr_select, selections=tuple(selections))
    return replace(attest, quote=replace(quote, pcr_select=selection))


def _attest_reencode(b: Builder) -> Mutant:
    attest = parse_attest(b.seed.b64("attest"))
    quote = attest.quote
    assert quote is not None
    rng = b.rng
    choice = b.turn % 10
    if choice == 0:
        new = replace(attest, magic=attest.magic ^ (1 << rng.randrange(32)))
        how = "magic changed"
    elif choice == 1:
        new = replace(attest, type=TPM_ST_ATTEST_CERTIFY, quote=None, attested=attest.attested)
        how = "type set to ATTEST_CERTIFY (same attested bytes)"
    elif choice == 2:
        nonce = rng.choice(
            [
                attest.extra_data[:-1],
                attest.extra_data + b"\x00",
                bytes(len(attest.extra_data)),
                b"",
            ]
        )
        new = replace(attest, extra_data=nonce)
        how = f"extraData set to {len(nonce)} other bytes"
    elif choice == 3:
        clock = replace(attest.clock_info, clock=attest.clock_info.clock + rng.randint(1, 10**6))
        new = replace(attest, clock_info=clock)
        how = "clock advanced"
    elif choice == 4:
        clock = replace(
            attest.clock_info,
            reset_count=attest.clock_info.reset_count + 1,
            safe=not attest.clock_info.safe,
        )
        new = replace(attest, clock_info=clock)
        how = "resetCount and safe changed"
    elif choice == 5:
        new = replace(attest, firmware_version=attest.firmware_version ^ 1)
        how = "firmwareVersion changed"
    elif choice == 6:
        new = replace(attest, qualified_signer=attest.qualified_signer[:-1] + b"\x00")
        how = "qualifiedSigner changed"
    elif choice == 7:
        selections = list(quote.pcr_select.selections)
        selection = selections[0]
        bitmap = bytearray(selection.pcr_select)
        bitmap[rng.randrange(len(bitmap))] ^= 1 << rng.randrange(8)
        selections[0] = TpmsPcrSelection(selection.hash_alg, bytes(bitmap))
        new = _with_selections(attest, selections)
        how = "one PCR (de)selected"
    elif choice == 8:
        selections = list(quote.pcr_select.selections)
        bank = rng.choice([TPM_ALG_SHA1, TPM_ALG_SHA384, TPM_ALG_SHA512])
        if rng.random() < 0.5:
            selections = [TpmsPcrSelection(bank, s.pcr_select) for s in selections]
            how = f"bank set to 0x{bank:04x}"
        else:
            selections.append(TpmsPcrSelection(bank, selections[0].pcr_select))
            how = f"bank 0x{bank:04x} added"
        new = _with_selections(attest, selections)
    else:
        digest = bytearray(quote.pcr_digest)
        digest[rng.randrange(len(digest))] ^= 1
        new = replace(attest, quote=replace(quote, pcr_digest=bytes(digest)))
        how = "pcrDigest changed"
    b.set_b64(B64_PATHS["attest"], marshal_attest(new))
    return b.done(f"TPMS_ATTEST re-encoded: {how}")


def _signature_length(b: Builder) -> Mutant:
    data = b.seed.b64("signature")
    mutated, how = _length_field_edit(
        b.rng, data, [(0, 2, "sigAlg"), (2, 2, "hash"), (4, 2, "sig.size")]
    )
    b.set_b64(B64_PATHS["signature"], mutated)
    return b.done(f"TPMT_SIGNATURE {how}")


def _nudged(data: bytes, rng: random.Random) -> bytes:
    """The big-endian integer ``data`` plus or minus one, in as many bytes (never negative)."""
    value = int.from_bytes(data, "big")
    step = 1 if value == 0 else rng.choice([1, -1])
    return ((value + step) % (1 << (8 * len(data)))).to_bytes(len(data), "big")


def _key_specific_signature(
    signature: TpmtSignature, choice: int, rng: random.Random
) -> tuple[TpmtSignature, str]:
    """The re-encodings that depend on the seed's signature scheme (RSA for the Azure seed,
    ECDSA for the local and qemu seeds since their AK is ECC P-256)."""
    if signature.sig_alg == TPM_ALG_ECDSA:
        if choice == 0:
            rsa_bytes = signature.ecc_r + signature.ecc_s
            return TpmtSignature(TPM_ALG_RSASSA, TPM_ALG_SHA256, rsa_signature=rsa_bytes), (
                "RSASSA signature made of the ECDSA bytes"
            )
        if choice == 4:
            return replace(signature, ecc_r=signature.ecc_s, ecc_s=signature.ecc_r), "r <-> s"
        if choice == 5:
            return replace(signature, ecc_r=b"\x00" + signature.ecc_r), "r with a leading zero"
        return replace(signature, ecc_s=_nudged(signature.ecc_s, rng)), "s integer +-1"
    if choice == 0:
        other = TPM_ALG_RSAPSS if signature.sig_alg == TPM_ALG_RSASSA else TPM_ALG_RSASSA
        return replace(signature, sig_alg=other), "RSASSA <-> RSAPSS, same signature bytes"
    if choice == 4:
        half = len(signature.rsa_signature) // 2
        return TpmtSignature(
            TPM_ALG_ECDSA,
            TPM_ALG_SHA256,
            ecc_r=signature.rsa_signature[:half],
            ecc_s=signature.rsa_signature[half:],
        ), "ECDSA signature made of the RSA bytes"
    if choice == 5:
        leading = replace(signature, rsa_signature=b"\x00" + signature.rsa_signature)
        return leading, "signature with a leading zero byte"
    nudged = replace(signature, rsa_signature=_nudged(signature.rsa_signature, rng))
    return nudged, "signature integer +-1"


def _signature_reencode(b: Builder) -> Mutant:
    signature = parse_signature(b.seed.b64("signature"))
    rng = b.rng
    choice = b.turn % 7
    if choice == 1:
        new = replace(
            signature,
            hash_alg=rng.choice([TPM_ALG_SHA1, TPM_ALG_SHA384, TPM_ALG_SHA512, TPM_ALG_NULL]),
        )
        how = f"hash set to 0x{new.hash_alg:04x}"
    elif choice == 2:
        new = TpmtSignature(TPM_ALG_NULL, TPM_ALG_NULL)
        how = "NULL signature"
    elif choice == 3:
        new = TpmtSignature(TPM_ALG_HMAC, TPM_ALG_SHA256, hmac_digest=bytes(32))
        how = "HMAC signature"
    else:
        new, how = _key_specific_signature(signature, choice, rng)
    b.set_b64(B64_PATHS["signature"], marshal_signature(new))
    return b.done(f"TPMT_SIGNATURE re-encoded: {how}")


def _public_reencode(b: Builder) -> Mutant:
    public = parse_tpmt_public(b.seed.b64("public"))
    rng = b.rng
    choice = b.turn % 9
    if choice == 0:
        bit = rng.choice([1, 2, 4, 5, 6, 7, 10, 11, 16, 17, 18])
        new = replace(public, object_attributes=public.object_attributes ^ (1 << bit))
        how = f"objectAttributes bit {bit} toggled"
    elif choice == 1:
        new = replace(public, name_alg=rng.choice([TPM_ALG_SHA1, TPM_ALG_SHA384, TPM_ALG_NULL]))
        how = f"nameAlg set to 0x{new.name_alg:04x}"
    elif choice == 2:
        new = replace(public, auth_policy=bytes(32))
        how = "authPolicy set"
    elif choice == 3 and isinstance(public.parameters, TpmsRsaParms):
        scheme = rng.choice(
            [
                TpmtScheme(TPM_ALG_RSAPSS, TPM_ALG_SHA256),
                TpmtScheme(TPM_ALG_NULL),
                TpmtScheme(TPM_ALG_RSASSA, TPM_ALG_SHA1),
            ]
        )
        new = replace(public, parameters=replace(public.parameters, scheme=scheme))
        how = f"scheme set to 0x{scheme.scheme:04x}/0x{scheme.hash_alg:04x}"
    elif choice == 4 and isinstance(public.parameters, TpmsRsaParms):
        exponent = rng.choice([0, 65537, 3]) if public.parameters.exponent in (0, 65537) else 0
        new = replace(public, parameters=replace(public.parameters, exponent=exponent))
        how = f"exponent set to {exponent}"
    elif choice == 5 and isinstance(public.parameters, TpmsRsaParms):
        new = replace(
            public, parameters=replace(public.parameters, key_bits=public.parameters.key_bits + 8)
        )
        how = "keyBits changed"
    elif choice == 6 and isinstance(public.unique, bytes):
        modulus = bytearray(public.unique)
        modulus[-1] ^= 2
        new = replace(public, unique=bytes(modulus))
        how = "modulus changed"
    elif choice == 7 and isinstance(public.parameters, TpmsRsaParms):
        new = replace(
            public,
            parameters=replace(public.parameters, symmetric=TpmtSymDefObject(0x0006, 128, 0x0043)),
        )
        how = "symmetric set to AES-128-CFB"
    else:
        new = replace(public, type=TPM_ALG_ECC if public.type == TPM_ALG_RSA else TPM_ALG_RSA)
        how = "type changed, body kept"
        b.set_b64(B64_PATHS["public"], struct.pack(">H", new.type) + public.raw[2:])
        return b.done(f"TPMT_PUBLIC re-encoded: {how}")
    b.set_b64(B64_PATHS["public"], marshal_public(new))
    return b.done(f"TPMT_PUBLIC re-encoded: {how}")


def _boot_log_bytes(b: Builder) -> Mutant:
    source, _log, raw = _boot_log_for(b)
    data, how = _edit_bytes(b.rng, raw)
    b.set_b64(("boot_event_log",), data)
    return b.done(f"boot_event_log ({source.platform}'s): {how}")


def _event_log_offsets(raw: bytes, log: TcgEventLog) -> list[tuple[int, int, str]]:
    """Offsets of the little-endian fields of a TCG log: (offset, width, name)."""
    header, _ = split_header(raw)
    offsets = [(28, 4, "header EventSize"), (32 + 24, 4, "Spec ID numberOfAlgorithms")]
    position = len(header)
    digest_bytes = (
        sum(2 + len(log.events[0].digests[bank]) for bank in log.banks) if log.events else 0
    )
    for event in log.events:
        offsets += [
            (position, 4, f"event {event.index} PCRIndex"),
            (position + 4, 4, f"event {event.index} EventType"),
            (position + 8, 4, f"event {event.index} Digests.count"),
            (position + 12 + digest_bytes, 4, f"event {event.index} EventSize"),
        ]
        position += 12 + digest_bytes + 4 + len(event.data)
    return offsets


def _boot_log_length(b: Builder) -> Mutant:
    source, log, raw = _boot_log_for(b)
    offset, _width, name = b.rng.choice(_event_log_offsets(raw, log))
    (current,) = struct.unpack_from("<I", raw, offset)
    value = b.rng.choice([0, 1, current + 1, max(0, current - 1), 24, 0xFFFFFFFF, 0x80000000])
    out = bytearray(raw)
    struct.pack_into("<I", out, offset, value)
    b.set_b64(("boot_event_log",), bytes(out))
    return b.done(f"boot_event_log ({source.platform}'s): {name} {current} -> {value}")


def _boot_log_reencode(b: Builder) -> Mutant:
    """A well-formed log with other content: what a forger would write."""
    source, log, raw = _boot_log_for(b)
    header, _ = split_header(raw)
    events = list(log.events)
    rng = b.rng
    extended = [i for i, e in enumerate(events) if e.event_type != EV_NO_ACTION]
    i = extended[b.turn % len(extended)]
    event = events[i]
    choice = (b.turn // len(extended) + rng.randrange(11)) % 11
    if choice == 0:
        same = [j for j in extended if events[j].pcr == event.pcr and j != i]
        j = rng.choice(same) if same else rng.choice(extended)
        events[i], events[j] = events[j], events[i]
        how = f"events {event.index} and {events[i].index} swapped"
    elif choice == 1:
        del events[i]
        how = f"event {event.index} dropped"
    elif choice == 2:
        events.insert(rng.randint(0, len(events)), event)
        how = f"event {event.index} duplicated"
    elif choice == 3:
        pcr = rng.choice([p for p in (0, 1, 2, 4, 5, 7, 8, 9, 14, 15) if p != event.pcr])
        events[i] = replace(event, pcr=pcr)
        how = f"event {event.index} moved from PCR {event.pcr} to PCR {pcr}"
    elif choice == 4:
        data, how_data = _edit_bytes(rng, event.data)
        events[i] = replace(event, data=data)
        how = f"event {event.index} data edited, digests kept ({how_data})"
    elif choice == 5:
        bank = rng.choice(log.banks)
        digest = bytearray(event.digests[bank])
        digest[0] ^= 1
        events[i] = replace(event, digests={**event.digests, bank: bytes(digest)})
        how = f"event {event.index} {bank} digest changed"
    elif choice == 6:
        events.insert(
            i, _measured_event(event.pcr, EV_NO_ACTION, _random_text(rng).encode(), log.banks)
        )
        how = f"EV_NO_ACTION inserted before event {event.index}"
    elif choice == 7:
        events.insert(
            0,
            _measured_event(
                0, EV_NO_ACTION, b"StartupLocality\x00" + bytes([rng.choice([0, 3, 4])]), log.banks
            ),
        )
        how = "StartupLocality event inserted first"
    elif choice == 8:
        new_type = rng.choice(
            [EV_NO_ACTION, EV_SEPARATOR, EV_IPL, EV_EFI_BOOT_SERVICES_APPLICATION]
        )
        events[i] = replace(event, event_type=new_type)
        how = f"event {event.index} retyped 0x{new_type:08x}"
    elif choice == 9:
        # Same per-PCR order, another interleaving: the replay is unchanged.
        j = rng.choice([k for k in range(len(events)) if events[k].pcr != event.pcr] or [i])
        moved = events.pop(i)
        events.insert(j, moved)
        how = f"event {event.index} moved to position {j}"
    else:
        data = event.data + b"\x00"
        events[i] = _measured_event(event.pcr, event.event_type, data, log.banks)
        how = f"event {event.index} data edited and re-measured"
    b.set_b64(("boot_event_log",), marshal_event_log(header, events, log.banks))
    return b.done(f"boot_event_log ({source.platform}'s) re-encoded: {how}")


def _chain_edit(b: Builder) -> Mutant:
    path = ("attestation", "ak", "certificate_chain")
    chain = b.seed.chain
    donor = b.donor().chain
    choice = b.turn % 9
    if choice == 0:
        new, how = list(reversed(chain)), "reversed"
    elif choice == 1:
        new, how = chain[1:], "leaf dropped"
    elif choice == 2:
        new, how = chain[:1], "leaf only"
    elif choice == 3:
        new, how = [chain[0], *chain], "leaf duplicated"
    elif choice == 4:
        new, how = donor, "swapped for another platform's chain"
    elif choice == 5:
        new, how = [donor[0], *chain[1:]], "leaf swapped for another platform's leaf"
    elif choice == 6:
        new, how = [*chain, *donor[1:]], "another platform's CAs appended"
    elif choice == 7:
        new, how = [chain[0], *donor[1:]], "CAs swapped for another platform's"
    else:
        position = b.rng.randrange(len(chain))
        pem, how_text = _edit_string(b.rng, chain[position])
        new = list(chain)
        new[position] = pem
        how = f"PEM {position} edited ({how_text})"
    _set_at(b.document, path, cast(Json, new))
    return b.done(f"certificate_chain: {how}")


SPLICE_PATHS: tuple[JsonPath, ...] = (
    ("run",),
    ("run", "id"),
    ("run", "provider"),
    ("run", "finished_at"),
    ("inputs",),
    ("outputs",),
    ("event_log",),
    ("boot_event_log",),
    ("platform",),
    ("platform", "kind"),
    ("platform", "reference_values"),
    ("attestation",),
    ("attestation", "quote"),
    ("attestation", "quote", "attest"),
    ("attestation", "quote", "signature"),
    ("attestation", "quote", "pcrs"),
    ("attestation", "nonce"),
    ("attestation", "ak"),
    ("attestation", "ak", "public"),
    ("attestation", "ak", "certificate_chain"),
    ("attestation", "ek"),
)


def _splice(b: Builder) -> Mutant:
    """A field of another platform's certificate at the same place in this one."""
    donor = b.donor()
    candidates = [p for p in SPLICE_PATHS if _has(donor.document, p)]
    # Also every common leaf path, so a long run splices everything once.
    common = [p for p in b.context.paths if _has(donor.document, p)]
    pool = candidates + common
    path = pool[(b.turn // max(1, len(b.context.donors))) % len(pool)]
    _set_at(b.document, path, copy.deepcopy(_get_at(donor.document, path)))
    return b.done(f"{_show(path)} taken from the {donor.platform} certificate")


def _splice_pair(b: Builder) -> Mutant:
    """Two related fields of another platform at once (the attestation with its event log,
    the event log with its claims, the boot log with the quote)."""
    donor = b.donor()
    pairs: tuple[tuple[JsonPath, ...], ...] = (
        (("attestation",), ("event_log",)),
        (("attestation",), ("boot_event_log",)),
        (("event_log",), ("inputs",), ("outputs",), ("run",)),
        (("attestation",), ("event_log",), ("inputs",), ("outputs",)),
        (("attestation", "quote"), ("attestation", "nonce")),
        (("boot_event_log",), ("platform",)),
        (("attestation", "ak"), ("attestation", "quote")),
    )
    group = pairs[b.turn % len(pairs)]
    for path in group:
        if _has(donor.document, path):
            _set_at(b.document, path, copy.deepcopy(_get_at(donor.document, path)))
        elif _has(b.document, path):
            _delete_at(b.document, path)
    return b.done(
        f"{', '.join(_show(p) for p in group)} taken from the {donor.platform} certificate"
    )


def _has(document: Json, path: JsonPath) -> bool:
    try:
        _get_at(document, path)
    except (KeyError, IndexError, TypeError):
        return False
    return True


CATEGORIES: dict[str, Callable[[Builder], Mutant]] = {
    "json.replace": _json_replace,
    "json.remove": _json_remove,
    "json.duplicate-key": _json_duplicate_key,
    "json.type-change": _json_type_change,
    "json.string-edit": _json_string_edit,
    "json.key-rename": _json_key_rename,
    "json.number-boundary": _json_number_boundary,
    "json.list-reorder": _json_list_reorder,
    "json.list-truncate": _json_list_truncate,
    "json.list-extend": _json_list_extend,
    "json.add-key": _json_add_key,
    "json.raw-bytes": _raw_bytes,
    "events.move": _events_move,
    "events.swap": _events_swap,
    "events.drop": _events_drop,
    "events.duplicate": _events_duplicate,
    "events.change-pcr": _events_change_pcr,
    "events.data-edit": _events_data_edit,
    "events.type-edit": _events_type_edit,
    "events.into-boot-log": _events_into_boot_log,
    "attest.bytes": _bytes_mutation("attest"),
    "attest.length-field": _attest_length,
    "attest.re-encode": _attest_reencode,
    "signature.bytes": _bytes_mutation("signature"),
    "signature.length-field": _signature_length,
    "signature.re-encode": _signature_reencode,
    "public.bytes": _bytes_mutation("public"),
    "public.re-encode": _public_reencode,
    "nonce.bytes": _bytes_mutation("nonce"),
    "boot-log.bytes": _boot_log_bytes,
    "boot-log.length-field": _boot_log_length,
    "boot-log.re-encode": _boot_log_reencode,
    "chain.edit": _chain_edit,
    "splice.field": _splice,
    "splice.group": _splice_pair,
}


def mutate(context: Context, index: int) -> Mutant:
    """The ``index``-th mutant of ``context.seed`` (deterministic in the run seed)."""
    names = list(CATEGORIES)
    category = names[index % len(names)]
    rng = random.Random(f"{context.run_seed}/{context.seed.platform}/{index}")
    builder = Builder(context, category, index // len(names), rng)
    return CATEGORIES[category](builder)
